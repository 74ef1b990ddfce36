"""The built-in PyTorch engine: paged KV pool, chunked prefill, continuous batching.

`NativeEngine` (backends.engines.native.engine) implements `backends.engines.api.EngineCore`. Imported
lazily so that `import backends.engines.native` stays cheap (no torch import).
"""

from __future__ import annotations

from typing import Any

__all__ = ["NativeEngine", "load_model", "profile_knee", "resolve_chunk_size"]


def __getattr__(name: str) -> Any:
    if name == "NativeEngine":
        from backends.engines.native.engine import NativeEngine

        return NativeEngine
    if name == "load_model":
        from backends.engines.native.model_source import load_model

        return load_model
    if name in ("profile_knee", "resolve_chunk_size"):
        from backends.engines.native import profile

        return getattr(profile, name)
    raise AttributeError(name)
