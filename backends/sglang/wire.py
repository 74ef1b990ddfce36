"""SGLang's wire format: request bodies (`sampling_params`), rid and bootstrap-room minting, the
prefill/decode pair check, and reassembly of `/generate` stream chunks.

Protocol reference: ../shared/reference/sglang.md."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.base import BackendError, SamplingParams
from backends.http import parse_sse_payload

DEFAULT_BOOTSTRAP_PORT = 8998
MAX_ROOM = 2**63 - 1


def map_finish(reason: Any) -> tuple[str | None, str | None]:
    """SGLang's `meta_info.finish_reason` → (our finish reason, error message)."""
    if reason is None:
        return None, None
    if isinstance(reason, str):  # defensive: some builds/routes send a plain string
        kind, reason = reason, {}
    else:
        kind = reason.get("type")
    if kind in ("stop", "length"):
        return kind, None
    if kind == "abort":
        message = reason.get("message") or "aborted"
        status = reason.get("status_code")
        if status is None:
            return "abort", str(message)
        retry = " (retryable)" if status == 503 else ""
        return "error", f"{message} [status {status}]{retry}"
    return "error", f"unknown finish reason {reason!r}"


@dataclass
class ChunkState:
    """Reassembles one SGLang output from stream chunks, in cumulative mode (the default) or
    with `--incremental-streaming-output` (detected: cumulative chunks carry as many
    `output_ids` as `meta_info.completion_tokens`)."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    status: int | None = None  # the engine's status code of an abort/error, if any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int | None:
        """`meta_info.cached_tokens`: the prompt tokens SGLang's radix cache held."""
        value = self.meta.get("cached_tokens")
        return value if isinstance(value, int) else None

    @property
    def retryable_error(self) -> bool:
        """An in-stream 503 (a retraction): another instance can continue the request."""
        return self.finish == "error" and self.status == 503

    def failure(self, who: str) -> BackendError:
        """This output's error as a BackendError (5xx: retryable on another instance)."""
        status = self.status or 502
        return BackendError(f"{who}: {self.error}", status=status, retryable=status >= 500)

    def feed_batch(self, payloads: Sequence[bytes]) -> None:
        """Feed one network read's `data:` payloads, up to a finish. In cumulative mode each chunk
        holds everything before it, so when the last one extends what is held by at least one
        token and none before it finishes, only it is parsed: a burst of n tokens costs one JSON
        parse, not n."""
        if len(payloads) > 1 and self.ids and self.finish is None and all(map(_unfinished, payloads[:-1])):
            last = parse_sse_payload(payloads[-1])
            if last is not None and self._extends(last):
                self.feed(last)
                return
        for payload in payloads:
            chunk = parse_sse_payload(payload)
            if chunk is not None:
                self.feed(chunk)
                if self.finish is not None:
                    return  # nothing after a finish belongs to the request

    def _extends(self, chunk: dict[str, Any]) -> bool:
        """A cumulative chunk that holds what is held and more: as many `output_ids` as its
        `completion_tokens`, more than held (never so for an incremental chunk once ids are held),
        starting with the ids and text held."""
        ids, meta = chunk.get("output_ids"), chunk.get("meta_info")
        if "error" in chunk or not isinstance(ids, list) or not isinstance(meta, dict):
            return False
        held = self.ids
        return (
            len(ids) == meta.get("completion_tokens") and len(ids) > len(held) and ids[: len(held)] == held
            and str(chunk.get("text") or "").startswith(self.text)
        )

    def feed(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk and "meta_info" not in chunk:
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            code = err.get("code") if isinstance(err, dict) else None
            self.finish, self.error = "error", f"{msg} [status {code}]" if code else str(msg)
            self.status = int(code) if isinstance(code, int) else 400
            return
        meta = chunk.get("meta_info") or {}
        self.meta.update(meta)
        out_ids = chunk.get("output_ids")
        text = chunk.get("text") or ""
        completion = meta.get("completion_tokens")
        if out_ids is not None:
            cumulative = (completion is None or len(out_ids) == completion) and out_ids[: len(self.ids)] == self.ids
            if cumulative:
                self.ids, self.text = list(out_ids), text
            else:
                self.ids.extend(out_ids)
                self.text += text
        elif text.startswith(self.text):  # no ids (not seen on /generate): cumulative text
            self.text = text
        else:
            self.text += text
        finish, error = map_finish(meta.get("finish_reason"))
        if finish is not None:
            self.finish, self.error = finish, error
            reason = meta.get("finish_reason")
            if finish == "error" and isinstance(reason, dict) and isinstance(reason.get("status_code"), int):
                self.status = reason["status_code"]


def _unfinished(payload: bytes) -> bool:
    """Whether a chunk says plainly that it does not finish (orjson's or json's spacing)."""
    return b'"finish_reason":null' in payload or b'"finish_reason": null' in payload


def sampling_params(sp: SamplingParams, seed_field: str | None = "sampling_seed") -> dict[str, Any]:
    """Our SamplingParams → SGLang `sampling_params` (unknown keys are rejected from 0.5.22 on,
    so only known keys, and optional ones only when set). Temperature and top_p only when the
    client gave them: otherwise SGLang applies the model's generation_config.json defaults."""
    out: dict[str, Any] = {"max_new_tokens": sp.max_tokens}
    if sp.temperature is not None:
        out["temperature"] = sp.temperature
    if sp.top_p is not None:
        out["top_p"] = sp.top_p
    out["ignore_eos"] = sp.ignore_eos
    if sp.stop:
        out["stop"] = list(sp.stop)
    if sp.seed is not None and seed_field:
        out[seed_field] = sp.seed
    return out


def new_rid() -> str:
    """Fixed-length unique rid: SGLang aborts by rid prefix, so no rid may prefix another. 128
    random bits, not a cryptographic secret (uuid4's urandom call costs more than the rest)."""
    return f"{random.getrandbits(128):032x}"


def new_room() -> int:
    """A bootstrap room: 63 random bits, as SGLang's routers draw them."""
    return random.getrandbits(63)


def check_pd_pair(prefill_info: dict[str, Any], decode_info: dict[str, Any]) -> None:
    """Refuse a prefill/decode pair SGLang would fail at bootstrap (page size, KV dtype)."""
    for key in ("page_size", "kv_cache_dtype"):
        p, d = prefill_info.get(key), decode_info.get(key)
        if p is not None and d is not None and p != d:
            raise BackendError(
                f"SGLang prefill {prefill_info.get('instance_id')} and decode {decode_info.get('instance_id')} "
                f"differ in {key} ({p!r} vs {d!r}); KV cannot move between them",
                status=409,
            )
    pb = prefill_info.get("transfer_backend")
    db = decode_info.get("transfer_backend")
    if pb and db and pb != db:
        raise BackendError(f"SGLang prefill and decode use different transfer backends ({pb} vs {db})", status=409)
