"""The adapter for tetri's own workers (`tetri worker`, served by backends/engines/server.py)."""

from backends.worker.client import WorkerBackend

__all__ = ["WorkerBackend"]
