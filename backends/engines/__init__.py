"""The worker side of the wire, kept apart from the orchestrator's adapters: the engine protocol
(`api.py`), the engine's thread (`runner.py`), the worker's HTTP server (`server.py`), the KV wire
format (`kv_codec.py`) and socket channel (`kv_socket.py`), and the built-in engine (`native/`).
Nothing here imports kvbridge or the adapters."""
