"""The SGLang adapter: the client (`client.py`), SGLang's wire format (`wire.py`) and one P/D request
over a prefill and a decode server (`pair.py`)."""

from backends.common import RestartRequired
from backends.sglang.client import SGLangBackend
from backends.sglang.pair import disaggregate
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
    "disaggregate",
    "map_finish",
    "new_rid",
    "new_room",
    "sampling_params",
]
