"""The SGLang adapter: the client (`client.py`) and SGLang's wire format (`wire.py`)."""

from backends.common import RestartRequired
from backends.sglang.client import SGLangBackend
from backends.sglang.wire import (
    DEFAULT_BOOTSTRAP_PORT,
    MAX_ROOM,
    ChunkState,
    check_pd_pair,
    map_finish,
    new_rid,
    new_room,
    sampling_params,
)

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "MAX_ROOM",
    "ChunkState",
    "RestartRequired",
    "SGLangBackend",
    "check_pd_pair",
    "map_finish",
    "new_rid",
    "new_room",
    "sampling_params",
]
