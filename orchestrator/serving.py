"""A request's life in the orchestrator: record, predict (beside queueing), place, run
co-located or disaggregated, relay tokens, and write the outcome off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from backends.base import BackendBusy, BackendError, GenRequest, TokenEvent
from backends.prefix import block_hashes
from kvbridge.base import HandoffStats
from kvbridge.factory import strategy_for
from orchestrator import metrics
from orchestrator.cluster import Cluster
from orchestrator.config import Settings
from orchestrator.placement import Overloaded, Placement, PrefillSlot
from orchestrator.policies.core import RouteChoice
from orchestrator.policies.ledger import Hold
from orchestrator.policies.types import RequestView
from orchestrator.prediction import PredictionBatcher, Predictor
from orchestrator.request import Job, RecordSink, RequestState
from orchestrator.tracing import Tracing

log = logging.getLogger("tetri.serving")
_MAX_ATTEMPTS = 3
# How long placement waits for a prediction it needs (HPHD test, decode dispatch). The model takes
# 2-4 ms; the rest is the thread hop, which on a loaded machine alone can exceed 10 ms.
_PREDICTION_WAIT_S = 0.05


class Server:
    def __init__(
        self,
        settings: Settings,
        cluster: Cluster,
        placement: Placement,
        store: RecordSink | None,
        predictor: Predictor | None,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.placement = placement
        self.store = store
        self.predictions = PredictionBatcher(predictor)
        self._served = 0
        self._next_sample_at = 0.0  # monotonic: the earliest time of the next accuracy-only sample
        self.on_finished = on_finished
        self.active = 0
        self.tracing: Tracing | None = None  # when otel_endpoint is set

    # ---- entry point ---------------------------------------------------------------------------
    async def run(self, job: Job) -> AsyncIterator[TokenEvent]:
        """Yield the request's token events. Raises Overloaded / BackendError before the first
        token when it cannot be served; afterwards failures arrive as an error event."""
        if self.active >= self.settings.max_queued_requests:
            raise Overloaded(f"{self.active} requests in flight; try again shortly", retry_after=1.0)
        self.active += 1
        if self.tracing is not None:
            job.trace = self.tracing.start(job)
        job.sink = self.store
        job.record(state=job.state.value, arrival=job.arrival, model=job.model, prompt_tokens=len(job.prompt_ids))
        prediction = self._start_prediction(job)
        end = RequestState.FAILED
        error: str | None = None
        try:
            async for event in self._attempts(job, prediction):
                if event.finish_reason in ("error", "abort"):  # the record says why it failed
                    error = event.error or f"the engine ended the request ({event.finish_reason})"
                yield event
            end = RequestState.FINISHED if job.finish_reason not in ("error", "abort") else RequestState.FAILED
        except (asyncio.CancelledError, GeneratorExit):
            end = RequestState.CANCELLED
            raise
        except (Overloaded, BackendError) as exc:
            error = str(exc)
            raise
        except Exception as exc:  # not an engine fault (a bug): the record still says what failed
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.active -= 1
            if job.predicted_bucket is None and prediction.done() and not prediction.cancelled():
                job.predicted_bucket = prediction.result()
            prediction.cancel()
            job.transition(
                end, finished_at=time.time(), completion_tokens=job.completion_tokens,
                finish_reason=job.finish_reason, error=error, backend=job.backend, cached_tokens=job.cached_tokens,
                predicted_bucket=job.predicted_bucket, predictor_granularity=self.settings.predictor_granularity,
            )
            metrics.REQUESTS.labels(outcome=end.value).inc()
            if end is RequestState.FINISHED:
                _observe_latency(job)
            if job.trace is not None:
                job.trace.finish(job, end.value, error)
            if self.on_finished is not None:
                self.on_finished(job)

    async def _attempts(self, job: Job, prediction: asyncio.Task[int | None]) -> AsyncIterator[TokenEvent]:
        """Try up to _MAX_ATTEMPTS instances. Before the first token a failed attempt is simply
        re-placed; after it, the request migrates (`migrate_on_failure`): the next attempt prefills
        the prompt plus the tokens already sent and generates only the rest, so the client's stream
        goes on where it stopped (as NVIDIA Dynamo's request migration does)."""
        failed: set[str] = set()
        for attempt in range(_MAX_ATTEMPTS):
            try:
                async with contextlib.aclosing(self._one_attempt(job, prediction, failed)) as events:
                    async for event in events:
                        cut = bool(job.break_before) and _stop_straddles_break(job, event.text)
                        if cut:
                            event = TokenEvent([], "", "stop", event.phase)
                        self._count(job, event)
                        yield event
                        if cut:
                            return  # leaving the attempt closes it: the engine aborts the rest
                return
            except BackendBusy as exc:
                # Every connection to the instance is in use (load, not a fault): nothing was sent.
                if job.completion_tokens == 0:
                    raise Overloaded(str(exc), retry_after=1.0) from exc
                job.finish_reason = "error"
                yield TokenEvent([], "", finish_reason="error", error=str(exc))
                return
            except BackendError as exc:
                last = not exc.retryable or attempt == _MAX_ATTEMPTS - 1
                if job.completion_tokens == 0:
                    if last:
                        raise
                    log.warning("request %s: attempt %d failed (%s); re-placing", job.id, attempt + 1, exc)
                    continue
                # Token ids must account for every token sent (not placeholders of an engine that
                # streams text only), or the continuation would skip or garble some.
                resumable = (
                    self.settings.migrate_on_failure
                    and len(job.generated_ids) == job.completion_tokens
                    and all(t >= 0 for t in job.generated_ids)
                )
                if last or not resumable:
                    job.finish_reason = "error"
                    yield TokenEvent([], "", finish_reason="error", error=str(exc))
                    return
                job.migrations += 1
                job.break_before, job.break_after = job.text_tail, ""
                metrics.MIGRATIONS.inc()
                log.warning("request %s: failed after %d tokens (%s); migrating", job.id, job.completion_tokens, exc)

    def _pick_backend(self, model: str) -> str | None:
        """A/B split (`ab_split`: backend -> weight) over the backends serving this model now."""
        weights = {b: w for b, w in self.settings.ab_split.items() if w > 0 and b in self.cluster.backends(model)}
        if not weights:
            return None
        return self.placement.rng.choices(list(weights), weights=list(weights.values()))[0]

    async def _route(
        self, job: Job, backend: str | None, prediction: asyncio.Future[int | None], failed: set[str]
    ) -> RouteChoice:
        """Ask the placement core. A heavy prompt that could run co-located waits briefly for its
        prediction (the HPHD rule turns on it); otherwise a prediction is used only if it is there."""
        bucket = job.predicted_bucket
        if bucket is None:
            if self.placement.core.hphd_candidate(len(job.attempt_prompt_ids)) and self.placement.could_colocate(
                job.model, backend, failed
            ):
                bucket = await _result_or_none(prediction, timeout_s=_PREDICTION_WAIT_S)
            elif prediction.done() and not prediction.cancelled():
                bucket = prediction.result()
        route = self.placement.route(self._view(job, bucket), job.model, backend, failed)
        if route.reason in ("hphd", "backlog"):
            job.predicted_bucket = bucket
        return route

    async def _one_attempt(
        self, job: Job, prediction: asyncio.Future[int | None], failed: set[str]
    ) -> AsyncIterator[TokenEvent]:
        if job.state is not RequestState.QUEUED:
            job.transition(RequestState.QUEUED)  # a retry or a migration starts over
        backend = self._pick_backend(job.model)
        route = await self._route(job, backend, prediction, failed)
        if route.mode == "colocated":
            metrics.COLOCATED.labels(role=route.role, reason=route.reason).inc()
            view = self._view(job, job.predicted_bucket)
            if route.host is None:
                slot = await self.placement.acquire_prefill(view, "colocated", job.model, failed, backend)
                async for event in self._colocated(job, slot, None, failed):
                    yield event
                return
            # A decode instance: hold its KV for the request until the engine shows it (the hold
            # moves with the request if a peer with room takes it first: late binding).
            host = self.cluster.instances[route.host]
            with self.placement.reserve(host, view) as hold:
                slot = await self.placement.acquire_at(host, view, failed, hold)
                async for event in self._colocated(job, slot, hold, failed):
                    yield event
            return
        view = self._view(job, None)
        with await self.placement.acquire_prefill(view, "prefill", job.model, failed, backend) as slot:
            if job.predicted_bucket is None:
                job.predicted_bucket = await self._decode_prediction(job, prediction)
            view = self._view(job, job.predicted_bucket)
            decode, hold = await self.placement.acquire_decode(
                view, job.model, self.settings.request_timeout_s, backend=slot.instance.spec.backend, avoid=failed
            )
            with hold:
                async for event in self._disaggregated(job, view, slot, hold, decode.id, failed):
                    yield event

    async def _colocated(
        self, job: Job, slot: PrefillSlot, hold: Hold | None, failed: set[str]
    ) -> AsyncIterator[TokenEvent]:
        """Prefill and decode on one instance: a `colocated` one, or a decode instance (`hold`: the
        KV the orchestrator holds there until the first token)."""
        inst = slot.instance
        job.prefill_instance = job.decode_instance = inst.id
        job.backend = inst.spec.backend
        job.transition(RequestState.PREFILLING, prefill_instance=inst.id, decode_instance=inst.id,
                       prefill_started_at=time.time(), backend=job.backend, predicted_bucket=job.predicted_bucket,
                       predictor_granularity=self.settings.predictor_granularity)
        if job.trace is not None:
            job.trace.mark("prefill")
        view = self._view(job, job.predicted_bucket)
        try:
            async with contextlib.aclosing(inst.backend.generate(self._gen_request(job, view))) as events:
                async for event in events:
                    failure = None
                    if event.retryable and event.finish_reason == "error":
                        event, failure = _retryable_failure(event)  # raises if it carries no tokens
                    if not slot.released:
                        slot.release()
                        if hold is not None:
                            hold.release()
                        job.transition(RequestState.DECODING, decode_started_at=time.time(), **self._first_token(job))
                    yield event
                    if failure is not None:
                        raise failure
        except BackendBusy:
            raise
        except BackendError:
            failed.add(inst.id)
            raise

    async def _disaggregated(
        self, job: Job, view: RequestView, slot: PrefillSlot, hold: Hold, decode_id: str, failed: set[str]
    ) -> AsyncIterator[TokenEvent]:
        prefill, decode = slot.instance, self.cluster.instances[decode_id]
        job.prefill_instance, job.decode_instance = prefill.id, decode.id
        job.backend = prefill.spec.backend
        job.transition(RequestState.PREFILLING, prefill_instance=prefill.id, decode_instance=decode.id,
                       prefill_started_at=time.time(), backend=job.backend, predicted_bucket=job.predicted_bucket,
                       predictor_granularity=self.settings.predictor_granularity)
        if job.trace is not None:
            job.trace.mark("prefill")
        stats = HandoffStats()
        strategy = strategy_for(prefill.spec.backend, self.settings.kv_lease_s, self.settings.migrate_on_failure)
        try:
            handoff = strategy.run(self._gen_request(job, view), prefill.backend, decode.backend, stats)
            async with contextlib.aclosing(handoff) as events:
                async for event in events:
                    failure = None
                    if event.retryable and event.finish_reason == "error":
                        event, failure = _retryable_failure(event)  # raises if it carries no tokens
                    if event.phase == "prefill" and not slot.released:
                        slot.release()
                        job.transition(RequestState.TRANSFERRING, **self._first_token(job))
                    elif event.phase == "decode" and not hold.released:
                        hold.release()
                        job.transition(RequestState.DECODING, decode_started_at=time.time(),
                                       kv_bytes=stats.kv_bytes, kv_transfer_s=stats.transfer_s)
                        if job.trace is not None:
                            job.trace.mark("decode")
                        if stats.kv_bytes:
                            metrics.KV_BYTES.inc(stats.kv_bytes)
                    yield event
                    if failure is not None:
                        raise failure
        except BackendBusy:
            raise
        except BackendError as exc:
            # 507: the decode worker refused the pushed KV (its pool is full). The prefill call
            # carries that error, but the prefill instance is not at fault: excluding it would leave
            # a single-prefill cluster with nowhere to retry (503 to the client).
            # Adapters that know which side failed say so (exc.instance_id).
            if slot.released and not hold.released:
                # Between the first token and the decode's first output: the KV hand-off failed.
                metrics.HANDOFF_FAILURES.labels(backend=job.backend or "", status=str(exc.status)).inc()
            named = getattr(exc, "instance_id", None)
            if named in (prefill.id, decode.id):
                failed.add(named)
            else:
                failed.add(decode.id if slot.released or exc.status == 507 else prefill.id)
            raise

    # ---- helpers -------------------------------------------------------------------------------
    def _view(self, job: Job, bucket: int | None) -> RequestView:
        return RequestView(
            prefix_hashes=self._prefix_hashes(job),
            id=job.id, arrival=job.arrival, prompt_tokens=len(job.attempt_prompt_ids),
            max_tokens=job.remaining_tokens, predicted_bucket=bucket,
            granularity=self.settings.predictor_granularity,
            heavy_decode_threshold=self.settings.heavy_decode_threshold,
        )

    def _gen_request(self, job: Job, view: RequestView | None = None) -> GenRequest:
        sampling = job.sampling
        if job.generated_ids:  # a migrated request: generate only what the client has not had yet
            sampling = replace(sampling, max_tokens=job.remaining_tokens)
        return GenRequest(
            request_id=job.id, prompt_ids=job.attempt_prompt_ids, sampling=sampling, prompt_text=job.prompt_text,
            predicted_output_lo=view.predicted_output_lo if view and view.predicted_bucket is not None else None,
            heavy_decode=view.heavy_decode if view and view.predicted_bucket is not None else None,
        )

    def _prefix_hashes(self, job: Job) -> tuple[int, ...]:
        """The attempt's prompt block hashes, when the global scheduler reads cache contents."""
        if not self.placement.core.global_scheduler.uses_prefix:
            return ()
        ids = job.attempt_prompt_ids
        if job.prefix_hashes is None or job.prefix_hashes[0] != len(ids):
            job.prefix_hashes = (len(ids), tuple(block_hashes(ids, job.model)))
        return job.prefix_hashes[1]

    @property
    def predictor(self) -> Predictor | None:
        return self.predictions.predictor

    @predictor.setter
    def predictor(self, predictor: Predictor | None) -> None:
        self.predictions = PredictionBatcher(predictor)

    def _start_prediction(self, job: Job) -> asyncio.Future[int | None]:
        """Predict the output length beside the queue wait when a decision may turn on it; otherwise
        only every `predictor_sample_every`-th request (at most `predictor_sample_max_per_s` a
        second), for the live accuracy figures."""
        self._served += 1
        if self._prediction_matters(job) or self._sample_for_accuracy():
            return asyncio.ensure_future(self._predict(job))
        skipped: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        skipped.set_result(None)
        return skipped

    def _sample_for_accuracy(self) -> bool:
        settings = self.settings
        if self._served % max(1, settings.predictor_sample_every):
            return False
        if settings.predictor_sample_max_per_s <= 0:
            return True
        now = time.monotonic()
        if now < self._next_sample_at:
            return False
        self._next_sample_at = now + 1.0 / settings.predictor_sample_max_per_s
        return True

    def _prediction_matters(self, job: Job) -> bool:
        """Whether a placement decision can turn on the request's predicted length: the HPHD rule
        (a heavy prompt), a choice among several decode instances (the dispatcher's classes, and
        the loads it reads later), or one decode instance whose free KV could not hold the request
        at its longest (admission). One decode instance with room, or none, decides the same
        whatever the prediction says."""
        settings = self.settings
        if settings.colocate_heavy_heavy and len(job.prompt_ids) > settings.heavy_prefill_threshold:
            return True
        decodes = self.cluster.usable("decode", job.model)
        if len(decodes) != 1:
            return len(decodes) > 1
        view = decodes[0].view()
        return view.free_kv_tokens - view.reserved_kv_tokens < len(job.prompt_ids) + job.sampling.max_tokens

    async def _decode_prediction(self, job: Job, prediction: asyncio.Future[int | None]) -> int | None:
        """The prediction for the decode choice: it has run beside the queue wait; give it a moment
        if it is still going and the choice turns on it. One sampled only for the accuracy figures
        holds up no one (it is recorded if it lands before the request ends)."""
        if prediction.done() or self._prediction_matters(job):
            return await _result_or_none(prediction, timeout_s=_PREDICTION_WAIT_S)
        return None

    async def _predict(self, job: Job) -> int | None:
        meta = {"output_len": job.sampling.max_tokens} if job.sampling.ignore_eos else {}
        return await self.predictions.predict(job.text, len(job.prompt_ids), meta)

    def _first_token(self, job: Job) -> dict[str, float]:
        """Note the first token (once: a migrated request's next attempt has had it); the fields
        to record, with the transition that comes with it."""
        if job.first_token_at is not None:
            return {}
        job.first_token_at = time.time()
        metrics.TTFT.observe(job.first_token_at - job.arrival)
        return {"first_token_at": job.first_token_at}

    @staticmethod
    def _count(job: Job, event: TokenEvent) -> None:
        if event.cached_tokens is not None and job.migrations == 0:
            job.cached_tokens = event.cached_tokens  # of the client's prompt: the first attempt's
        job.completion_tokens += len(event.token_ids)
        job.generated_ids.extend(event.token_ids)
        if job.stop_window and event.text:
            job.text_tail = (job.text_tail + event.text)[-job.stop_window :]
        if event.finish_reason is not None:
            job.finish_reason = event.finish_reason



def _observe_latency(job: Job) -> None:
    """End-to-end latency and the mean gap between tokens after the first, once per request."""
    now = time.time()
    metrics.E2E.observe(now - job.arrival)
    if job.first_token_at is not None and job.completion_tokens > 1:
        metrics.ITL.observe((now - job.first_token_at) / (job.completion_tokens - 1))


def _stop_straddles_break(job: Job, text: str) -> bool:
    """Whether a stop string starts in the text sent before a migration and ends in `text`, the
    continuation's output (the continuation's engine only sees its own output)."""
    before, after = job.break_before, job.break_after + text
    joined = before + after
    # A straddling match starts in the last len(stop) - 1 characters of `before`.
    hit = any(0 <= joined.find(stop, max(0, len(before) - len(stop) + 1)) < len(before) for stop in job.sampling.stop)
    job.break_after = after
    if len(after) >= job.stop_window:
        job.break_before = ""  # no stop string can straddle the break any more
    return hit


def _retryable_failure(event: TokenEvent) -> tuple[TokenEvent, BackendError]:
    """Engines report some failures after their first token as a last "error" event marked
    `retryable` (a broken stream, an SGLang 503 retraction): the tokens it carries, to pass on, and
    the BackendError to raise after them (at once when it carries none), so the attempt fails over
    and the request migrates."""
    error = BackendError(event.error or "engine failed mid-stream", status=503, retryable=True)
    if not event.token_ids and not event.text:
        raise error
    return TokenEvent(event.token_ids, event.text, None, event.phase), error


async def _result_or_none(task: asyncio.Task[int | None], timeout_s: float) -> int | None:
    if task.done():  # no wait_for: its task would cost a pass of a busy event loop (~10 ms at 64 streams)
        return None if task.cancelled() else task.result()
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        return None
