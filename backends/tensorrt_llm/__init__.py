"""The TensorRT-LLM adapter: the client (`client.py`) and trtllm-serve's wire format (`wire.py`)."""

from backends.tensorrt_llm.client import TensorRTLLMBackend
from backends.tensorrt_llm.wire import (
    AUTH_HEADER,
    PLACEHOLDER_ID,
    ContextResult,
    disagg_auth_header,
    new_disagg_request_id,
)

__all__ = [
    "AUTH_HEADER",
    "PLACEHOLDER_ID",
    "ContextResult",
    "TensorRTLLMBackend",
    "disagg_auth_header",
    "new_disagg_request_id",
]
