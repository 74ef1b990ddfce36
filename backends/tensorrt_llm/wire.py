"""TensorRT-LLM's wire format (`trtllm-serve`, OpenAI `/v1/completions`): disaggregated request
ids, the `x-trtllm-disagg-auth` header, the context step's result, and stream-chunk helpers.

Protocol reference: ../shared/reference/tensorrt-llm.md."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from backends.base import GenRequest, KVHandle, TokenEvent

PLACEHOLDER_ID = -1
AUTH_HEADER = "x-trtllm-disagg-auth"

# ---- disagg_request_id: unique ints in [2^40, 2^63) ----------------------------------------
# Worker-local request ids live below 2^40, so ours never collide with them. Snowflake layout:
# 2^40 + (milliseconds since 2025-01-01 << 22 | node << 14 | sequence): unique within a process
# (sequence, waits for the next millisecond when 16384 ids were minted in one), and across
# orchestrator replicas unless two draw the same random 8-bit node in the same millisecond.
_EPOCH_MS = 1_735_689_600_000
_ID_FLOOR = 1 << 40
_NODE = secrets.randbelow(256)
_id_lock = threading.Lock()
_id_state = {"ms": 0, "seq": 0}


def new_disagg_request_id(node: int | None = None) -> int:
    node = _NODE if node is None else node & 0xFF
    with _id_lock:
        while True:
            now = int(time.time() * 1000) - _EPOCH_MS
            if now > _id_state["ms"]:
                _id_state["ms"], _id_state["seq"] = now, 0
                break
            if _id_state["seq"] < (1 << 14) - 1:
                _id_state["seq"] += 1
                now = _id_state["ms"]
                break
            time.sleep(0.0005)
        value = _ID_FLOOR + ((now << 22) | (node << 14) | _id_state["seq"])
    assert _ID_FLOOR <= value < 1 << 63
    return value


def disagg_auth_header(key: str, params: dict[str, Any]) -> str:
    """`x-trtllm-disagg-auth` of newest trtllm-serve: HMAC-SHA256 over the sorted compact JSON of
    {ctx_info_endpoint (first element if a list), encoded_opaque_state}."""
    endpoint = params.get("ctx_info_endpoint")
    if isinstance(endpoint, list):
        endpoint = endpoint[0] if endpoint else None
    payload = json.dumps(
        {"ctx_info_endpoint": endpoint, "encoded_opaque_state": params.get("encoded_opaque_state")},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return "sha256=" + hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()


@dataclass
class ContextResult:
    first: TokenEvent
    params: dict[str, Any] | None
    prompt_token_ids: list[int]
    usage: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    # finished, yet the context server holds the KV for a generation server (finish `length`)
    kv_pending: bool = False

    def kv_handle(self, request: GenRequest, disagg_request_id: int, **extra: Any) -> KVHandle:
        """What a generation-only request needs of this context step."""
        return KVHandle(
            request.request_id,
            len(self.prompt_token_ids),
            self.first.token_ids[0],
            extra={
                "disaggregated_params": self.params,
                "prompt_token_ids": self.prompt_token_ids,
                "first_text": self.first.text,
                "ctx_usage": self.usage,
                "disagg_request_id": disagg_request_id,
                **extra,
            },
        )


def first_error(chunk: dict[str, Any]) -> str | None:
    err = chunk.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def is_duplicate(ids: list[int] | None, piece: str, first_ids: list[int], first_text: str) -> bool:
    """Whether a chunk's leading tokens are the context's first token(s) again."""
    if ids is not None:
        return list(ids[: len(first_ids)]) == first_ids[: len(ids)]
    if piece and first_text:
        return piece.startswith(first_text) or first_text.startswith(piece)
    return True  # no text to compare (e.g. a partial UTF-8 character): trust the count


def map_finish(reason: Any) -> str | None:
    if reason is None or reason == "not_finished":
        return None
    if reason in ("stop", "length"):
        return reason
    if reason in ("abort", "cancelled"):
        return "abort"
    if reason == "tool_calls":
        return "stop"
    return "error"


async def closing_iter(agen):
    """Iterate a stream and close it however the loop ends (a break, an exception)."""
    async with contextlib.aclosing(agen):
        async for item in agen:
            yield item
