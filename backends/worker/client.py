"""Adapter for tetri's own worker processes (`tetri worker --backend native|sim`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import httpx
import orjson

from backends.base import (
    BackendError,
    GenRequest,
    Handoff,
    KVHandle,
    LoadReport,
    PrefillResult,
    Role,
    TokenEvent,
)
from backends.http import HTTPBackend, PoolLimits, error_message

# tetri's own workers keep their own limits (the GPU engines' are backends.http.ENGINE_TIMEOUT).
_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=10.0)


def _body(request: GenRequest, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "prompt_ids": request.prompt_ids,
        "sampling": request.sampling.to_dict(),
        "predicted_output_lo": request.predicted_output_lo,
        "heavy_decode": request.heavy_decode,
        **extra,
    }


class WorkerBackend(HTTPBackend):
    kind = "native"
    generates_on_decode = True  # the built-in engine's decode role runs full requests (hybrid batches)
    health_timeout_s = 2.0

    def __init__(self, url: str, instance_id: str, role: Role, model: str | None = None, kind: str = "native",
                 pool: PoolLimits | None = None):
        super().__init__(url, instance_id, role, model, timeout=_TIMEOUT, pool=pool)
        self.kind = kind
        # The last prefix-cache event this adapter saw (0: none yet, the worker answers a reset).
        self._kv_seq = 0

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """A control call (abort, drain, role): on the control pool, never queued behind streams."""
        try:
            resp = await self._control.post(path, json=body, timeout=timeout or _TIMEOUT)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.instance_id}: {exc!r}", status=503, retryable=True) from exc
        if resp.status_code >= 400:
            raise BackendError(error_message(resp), status=resp.status_code, retryable=resp.status_code >= 500)
        return resp.json()

    async def load(self) -> LoadReport:
        resp = await self.poll_get(f"/load?kv_since={self._kv_seq}", 2.0)
        if resp.status_code >= 400:
            raise BackendError(f"{self.instance_id}: load failed: HTTP {resp.status_code}", status=503)
        report = LoadReport.from_dict(resp.json())
        if report.kv_events is not None:
            self._kv_seq = report.kv_events.seq
        return report

    async def info(self) -> dict[str, Any]:
        resp = await self._control.get("/info", timeout=5.0)
        resp.raise_for_status()
        return resp.json()

    async def prefill(self, request: GenRequest, handoff: Handoff) -> PrefillResult:
        answers = [d async for d in self._lines("/prefill", _body(request, handoff=asdict(handoff)))]
        data = answers[-1] if answers else {}
        kv = KVHandle(**data["kv"]) if data.get("kv") else None
        return PrefillResult(first=TokenEvent(**data["first"]), kv=kv)

    async def prefill_stream(self, request: GenRequest, handoff: Handoff) -> AsyncIterator[TokenEvent | KVHandle]:
        """The streamed /prefill: the first token arrives before the worker pushes the KV."""
        async for data in self._lines("/prefill", _body(request, handoff=asdict(handoff), stream=True)):
            if "error" in data:  # the push failed after the first token went out
                status = int(data.get("status") or 502)
                message = str(data["error"].get("message", data["error"]))
                raise BackendError(message, status=status, retryable=status >= 500)
            if "first" in data:
                yield TokenEvent(**data["first"])
            if data.get("kv"):
                yield KVHandle(**data["kv"])

    def decode(self, request: GenRequest, kv: KVHandle) -> AsyncIterator[TokenEvent]:
        body = _body(request, first_token=kv.first_token_id, lease_id=kv.lease_id)
        return self._stream("/decode", body)

    def generate(self, request: GenRequest) -> AsyncIterator[TokenEvent]:
        return self._stream("/generate", _body(request))

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[TokenEvent]:
        async for data in self._lines(path, body):
            yield TokenEvent(**data)

    async def _lines(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects of an NDJSON answer, read to the end of the body; HTTP errors and broken
        streams as BackendError (a broken stream is the instance failing: retry elsewhere, or
        migrate mid-stream)."""
        async with self.slot():
            resp = await self.stream_post(path, orjson.dumps(body))
            try:
                if resp.status >= 400:
                    raise BackendError(await resp.message(), status=resp.status, retryable=resp.status >= 500)
                async for line in resp.lines():
                    if line.strip():
                        yield orjson.loads(line)
            finally:
                resp.close()

    async def abort(self, request_id: str) -> None:
        await self._post("/abort", {"request_id": request_id}, timeout=5.0)

    async def drain(self, accepting: bool = False) -> dict[str, Any]:
        return await self._post("/drain", {"accepting": accepting})

    async def set_role(self, role: Role) -> dict[str, Any]:
        data = await self._post("/role", {"role": role})
        self.role = role
        return data
