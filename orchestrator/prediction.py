"""Output-length predictions for the request path, off the event loop and in batches.

The learned model costs a fraction of a millisecond per prompt, but a thread hop per request costs
as much again and serialises on the GIL. Requests that arrive while a batch runs wait for the next
one: one hop and one tree walk serve them all. Cheap predictors (oracle, constant) answer inline,
and recent prompts are answered from a small cache (retries, migrations, repeated prompts).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger("tetri.prediction")

Meta = dict[str, Any]


class Predictor(Protocol):
    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: Meta | None = None) -> int: ...


class PredictionBatcher:
    def __init__(self, predictor: Predictor | None, max_batch: int = 64, cache_size: int = 4096) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int, int | None], int] = OrderedDict()
        self._pending: list[tuple[str, int, Meta, asyncio.Future[int | None]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.predicted = 0
        # Predictors with no model to run (oracle, constant) answer on the loop itself.
        self._inline = getattr(predictor, "name", "") in ("oracle", "constant")

    async def predict(self, text: str, prompt_tokens: int, meta: Meta) -> int | None:
        """The prompt's output-length bucket, or None if the predictor failed (never raises)."""
        if self.predictor is None:
            return None
        key = (hash(text), prompt_tokens, meta.get("output_len"))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self._inline:
            return self._remember(key, self._safe_one(text, prompt_tokens, meta))
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((text, prompt_tokens, meta, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        result = await future
        return self._remember(key, result)

    def _remember(self, key: tuple[int, int, int | None], bucket: int | None) -> int | None:
        if bucket is not None:
            self._cache[key] = bucket
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return bucket

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                results = await asyncio.to_thread(self._run, [(t, n, m) for t, n, m, _ in batch])
            except Exception as exc:  # noqa: BLE001 - a predictor failure must not fail requests
                log.debug("prediction batch failed: %s", exc)
                results = [None] * len(batch)
            self.batches += 1
            self.predicted += len(batch)
            for (_, _, _, future), bucket in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(bucket)

    def _run(self, items: Sequence[tuple[str, int, Meta]]) -> list[int | None]:
        batched = getattr(self.predictor, "predict_buckets", None)
        if batched is not None and len(items) > 1:
            try:
                return list(batched([t for t, _, _ in items], [m for _, _, m in items]))
            except Exception as exc:  # noqa: BLE001 - fall back to one at a time
                log.debug("batched prediction failed (%s); one at a time", exc)
        return [self._safe_one(t, n, m) for t, n, m in items]

    def _safe_one(self, text: str, prompt_tokens: int, meta: Meta) -> int | None:
        assert self.predictor is not None
        try:
            return int(self.predictor.predict_bucket(text, prompt_tokens, meta))
        except Exception as exc:  # noqa: BLE001 - a predictor failure must not fail the request
            log.debug("predictor failed: %s", exc)
            return None
