"""A request's life in the orchestrator: record, predict (beside queueing), place, run
co-located or disaggregated, relay tokens, and write the outcome off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from backends.base import BackendBusy, BackendError, GenRequest, Role, SamplingParams, TokenEvent
from kvbridge.base import HandoffStats, strategy_for
from orchestrator import metrics
from orchestrator.cluster import Cluster, Instance
from orchestrator.config import Settings
from orchestrator.placement import Overloaded, Placement
from orchestrator.policies.types import RequestView
from orchestrator.prediction import PredictionBatcher, Predictor

log = logging.getLogger("tetri.serving")
_MAX_ATTEMPTS = 3
# How long placement waits for a prediction it needs (HPHD test, decode dispatch). The model takes
# 2-4 ms; the rest is the thread hop, which on a loaded machine alone can exceed 10 ms.
_PREDICTION_WAIT_S = 0.05


@dataclass
class Job:
    """One accepted request, tokenized, as the API layer hands it to the server."""

    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_text: str = ""
    # A prompt given as token ids: how to get its text, called only when something needs it.
    detokenize: Callable[[list[int]], str] | None = field(default=None, repr=False)
    id: str = field(default_factory=lambda: f"cmpl-{random.getrandbits(128):032x}")
    arrival: float = field(default_factory=time.time)
    # Observed by the API layer for usage and by the store for the record.
    completion_tokens: int = 0
    finish_reason: str | None = None
    predicted_bucket: int | None = None
    prefill_instance: str | None = None
    decode_instance: str | None = None
    backend: str | None = None
    first_token_at: float | None = None
    # Every token id sent so far: after a failure mid-stream the request continues from them.
    generated_ids: list[int] = field(default_factory=list)
    migrations: int = 0
    # The end of the text sent so far (as long as the longest stop string), and after a migration
    # the text sent just before it and just after it: the new engine cannot see a stop string that
    # straddles the break, so the orchestrator looks for it there.
    text_tail: str = ""
    break_before: str = ""
    break_after: str = ""
    # The request's OpenTelemetry spans (orchestrator/tracing.py); None when tracing is off.
    trace: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The prompt's text (decoded from its ids on first use when it came as ids)."""
        if not self.prompt_text and self.detokenize is not None:
            self.prompt_text = self.detokenize(self.prompt_ids)
        return self.prompt_text

    @cached_property
    def stop_window(self) -> int:
        """Characters of sent text a stop string could still need: the longest stop string."""
        return max((len(s) for s in self.sampling.stop), default=0)

    @property
    def attempt_prompt_ids(self) -> list[int]:
        """What the next attempt prefills: the prompt, plus the tokens already sent after a migration."""
        return self.prompt_ids + self.generated_ids if self.generated_ids else self.prompt_ids

    @property
    def remaining_tokens(self) -> int:
        return max(1, self.sampling.max_tokens - self.completion_tokens)


@dataclass(frozen=True)
class Route:
    """How one attempt runs: disaggregated, or co-located on a `colocated` instance (`host` None:
    the global scheduler picks it) or on the given decode instance."""

    mode: Literal["colocated", "disaggregated"]
    role: Role = "colocated"
    host: Instance | None = None
    reason: str = ""  # co-located because: "mode" (no P/D pair, or mode=colocated), "hphd", "backlog"


class Server:
    def __init__(
        self,
        settings: Settings,
        cluster: Cluster,
        placement: Placement,
        store: Any,
        predictor: Any,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.placement = placement
        self.store = store
        self.predictions = PredictionBatcher(predictor)
        self._served = 0
        self.on_finished = on_finished
        self.active = 0
        self.tracing: Any = None  # orchestrator.tracing.Tracing when otel_endpoint is set

    # ---- entry point ---------------------------------------------------------------------------
    async def run(self, job: Job) -> AsyncIterator[TokenEvent]:
        """Yield the request's token events. Raises Overloaded / BackendError before the first
        token when it cannot be served; afterwards failures arrive as an error event."""
        if self.active >= self.settings.max_queued_requests:
            raise Overloaded(f"{self.active} requests in flight; try again shortly", retry_after=1.0)
        self.active += 1
        if self.tracing is not None:
            job.trace = self.tracing.start(job)
        self._save(job, state="queued", arrival=job.arrival, model=job.model, prompt_tokens=len(job.prompt_ids))
        prediction = self._start_prediction(job)
        state = "failed"
        error: str | None = None
        try:
            async for event in self._attempts(job, prediction):
                if event.finish_reason in ("error", "abort"):  # the record says why it failed
                    error = event.error or f"the engine ended the request ({event.finish_reason})"
                yield event
            state = "finished" if job.finish_reason not in ("error", "abort") else "failed"
        except (asyncio.CancelledError, GeneratorExit):
            state = "cancelled"
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
            self._save(
                job, state=state, finished_at=time.time(), completion_tokens=job.completion_tokens,
                finish_reason=job.finish_reason, error=error, backend=job.backend,
                predicted_bucket=job.predicted_bucket, predictor_granularity=self.settings.predictor_granularity,
            )
            metrics.REQUESTS.labels(outcome=state).inc()
            if state == "finished":
                _observe_latency(job)
            if job.trace is not None:
                job.trace.finish(job, state, error)
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

    def _colocated_role(self, job: Job, backend: str | None, failed: set[str]) -> Role | None:
        """Where the co-located path runs: the `colocated` pool if usable, else decode instances
        (`colocate_on_decode`, engines that run whole requests there), else nowhere."""
        if self.cluster.usable("colocated", job.model, backend):
            return "colocated"
        if self.settings.colocate_on_decode and self.placement.decode_hosts(job.model, backend, failed):
            return "decode"
        return None

    async def _mode(
        self, job: Job, backend: str | None, prediction: asyncio.Task[int | None], failed: set[str]
    ) -> Route:
        """Disaggregated, or co-located on a `colocated` instance (picked by the global scheduler)
        or on a given decode instance (conditional disaggregation: HPHD, a backlogged prefill pool)."""
        mode = self.settings.mode
        model = job.model
        if mode == "disaggregated":
            return Route("disaggregated")
        # A prefill instance this request already failed on does not count (one that just died looks
        # healthy until the monitor's next polls, and acquire_prefill never retries it): with no other,
        # the retry runs co-located. Decode instances do count (acquire_decode falls back to them).
        pd = any(i.id not in failed for i in self.cluster.usable("prefill", model, backend)) and bool(
            self.cluster.usable("decode", model, backend))
        if mode == "colocated" or not pd:
            if self._colocated_role(job, backend, failed) == "decode":
                host = self.placement.pick_decode_host(self._view(job, None), model, backend, failed, test=None)
                return Route("colocated", "decode", host, "mode")
            return Route("colocated", reason="mode")  # no colocated instance either: acquire answers 503
        role = self._colocated_role(job, backend, failed)
        if (
            role is not None
            and self.settings.colocate_heavy_heavy
            and len(job.attempt_prompt_ids) > self.settings.heavy_prefill_threshold
        ):
            bucket = await _result_or_none(prediction, timeout_s=_PREDICTION_WAIT_S)
            if bucket is not None and self._view(job, bucket).heavy_decode:
                job.predicted_bucket = bucket
                if role == "colocated":
                    return Route("colocated", reason="hphd")
                # On a decode instance only where decode admission would take it anyway.
                view = self._view(job, bucket)
                host = self.placement.pick_decode_host(view, model, backend, failed, test="admit")
                if host is not None:
                    return Route("colocated", "decode", host, "hphd")
        threshold = self.settings.colocate_backlog_tokens
        if threshold > 0 and self.settings.colocate_on_decode:
            backlog = self.placement.prefill_backlog(model, backend, failed)
            if backlog is not None and backlog > threshold:
                # Never waits for the predictor: use the prediction only if it is already there.
                bucket = job.predicted_bucket
                if bucket is None and prediction.done() and not prediction.cancelled():
                    bucket = prediction.result()
                host = self.placement.pick_decode_host(self._view(job, bucket), model, backend, failed, test="room")
                if host is not None:
                    job.predicted_bucket = bucket
                    return Route("colocated", "decode", host, "backlog")
        return Route("disaggregated")

    async def _one_attempt(
        self, job: Job, prediction: asyncio.Task[int | None], failed: set[str]
    ) -> AsyncIterator[TokenEvent]:
        view = self._view(job, None)
        backend = self._pick_backend(job.model)
        route = await self._mode(job, backend, prediction, failed)
        if route.mode == "colocated":
            metrics.COLOCATED.labels(role=route.role, reason=route.reason).inc()
            if route.host is None:
                inst = await self.placement.acquire_prefill(view, "colocated", job.model, failed, backend)
                reservation = None
            else:
                # A decode instance: hold its KV for the request until the engine shows it.
                reservation = self._view(job, job.predicted_bucket)
                inst = route.host
                self.placement.reserve_kv(inst, reservation)
                try:
                    got = await self.placement.acquire_at(inst, reservation, failed)
                except BaseException:
                    self.placement.release_decode_reservation(inst, reservation)
                    raise
                if got is not inst:  # late binding: a peer with room took it; the KV hold moves too
                    self.placement.release_decode_reservation(inst, reservation)
                    self.placement.reserve_kv(got, reservation)
                    inst = got
            async for event in self._colocated(job, inst, failed, reservation):
                yield event
            return
        prefill = await self.placement.acquire_prefill(view, "prefill", job.model, failed, backend)
        try:
            # The predictor has run beside the queue wait; give it a moment if it is still going.
            job.predicted_bucket = await _result_or_none(prediction, timeout_s=_PREDICTION_WAIT_S)
            view = self._view(job, job.predicted_bucket)
            decode = await self.placement.acquire_decode(
                view, job.model, self.settings.request_timeout_s, backend=prefill.spec.backend, avoid=failed
            )
        except BaseException:
            self.placement.release_prefill(prefill)
            raise
        async for event in self._disaggregated(job, view, prefill, decode, failed):
            yield event

    async def _colocated(
        self, job: Job, inst: Instance, failed: set[str], reservation: RequestView | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Prefill and decode on one instance: a `colocated` one, or a decode instance
        (`reservation`: the KV the orchestrator holds there until the first token)."""
        job.prefill_instance = job.decode_instance = inst.id
        job.backend = inst.spec.backend
        self._save(job, state="prefilling", prefill_instance=inst.id, decode_instance=inst.id,
                   prefill_started_at=time.time(), backend=job.backend, predicted_bucket=job.predicted_bucket,
                   predictor_granularity=self.settings.predictor_granularity)
        if job.trace is not None:
            job.trace.mark("prefill")
        view = self._view(job, job.predicted_bucket)
        released = False
        try:
            stream = _raise_retryable_errors(inst.backend.generate(self._gen_request(job, view)))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if not released:
                        released = True
                        self.placement.release_prefill(inst)
                        if reservation is not None:
                            self.placement.release_decode_reservation(inst, reservation)
                        self._first_token(job)
                    yield event
        except BackendBusy:
            raise
        except BackendError:
            failed.add(inst.id)
            raise
        finally:
            if not released:
                self.placement.release_prefill(inst)
                if reservation is not None:
                    self.placement.release_decode_reservation(inst, reservation)

    async def _disaggregated(
        self, job: Job, view: RequestView, prefill: Instance, decode: Instance, failed: set[str]
    ) -> AsyncIterator[TokenEvent]:
        job.prefill_instance, job.decode_instance = prefill.id, decode.id
        job.backend = prefill.spec.backend
        self._save(job, state="prefilling", prefill_instance=prefill.id, decode_instance=decode.id,
                   prefill_started_at=time.time(), backend=job.backend,
                   predicted_bucket=job.predicted_bucket,
                   predictor_granularity=self.settings.predictor_granularity)
        if job.trace is not None:
            job.trace.mark("prefill")
        stats = HandoffStats()
        strategy = strategy_for(prefill.spec.backend, self.settings.kv_lease_s, self.settings.migrate_on_failure)
        prefill_done = decode_started = False
        try:
            handoff = strategy.run(self._gen_request(job, view), prefill.backend, decode.backend, stats)
            async with contextlib.aclosing(_raise_retryable_errors(handoff)) as events:
                async for event in events:
                    if event.phase == "prefill" and not prefill_done:
                        prefill_done = True
                        self.placement.release_prefill(prefill)
                        self._first_token(job)
                        self._save(job, state="transferring")
                    elif event.phase == "decode" and not decode_started:
                        decode_started = True
                        self.placement.release_decode_reservation(decode, view)
                        self._save(job, state="decoding", decode_started_at=time.time(),
                                   kv_bytes=stats.kv_bytes, kv_transfer_s=stats.transfer_s)
                        if job.trace is not None:
                            job.trace.mark("decode")
                        if stats.kv_bytes:
                            metrics.KV_BYTES.inc(stats.kv_bytes)
                    yield event
        except BackendBusy:
            raise
        except BackendError as exc:
            # 507: the decode worker refused the pushed KV (its pool is full). The prefill call
            # carries that error, but the prefill instance is not at fault: excluding it would leave
            # a single-prefill cluster with nowhere to retry (503 to the client).
            # Adapters that know which side failed say so (exc.instance_id).
            if prefill_done and not decode_started:
                # Between the first token and the decode's first output: the KV hand-off failed.
                metrics.HANDOFF_FAILURES.labels(backend=job.backend or "", status=str(exc.status)).inc()
            named = getattr(exc, "instance_id", None)
            if named in (prefill.id, decode.id):
                failed.add(named)
            else:
                failed.add(decode.id if prefill_done or exc.status == 507 else prefill.id)
            raise
        finally:
            if not prefill_done:
                self.placement.release_prefill(prefill)
            if not decode_started:
                self.placement.release_decode_reservation(decode, view)

    # ---- helpers -------------------------------------------------------------------------------
    def _view(self, job: Job, bucket: int | None) -> RequestView:
        return RequestView(
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

    @property
    def predictor(self) -> Predictor | None:
        return self.predictions.predictor

    @predictor.setter
    def predictor(self, predictor: Predictor | None) -> None:
        self.predictions = PredictionBatcher(predictor)

    def _start_prediction(self, job: Job) -> asyncio.Future[int | None]:
        """Predict the output length beside the queue wait when a decision may turn on it; otherwise
        only every `predictor_sample_every`-th request, for the live accuracy figures."""
        self._served += 1
        if self._prediction_matters(job) or self._served % max(1, self.settings.predictor_sample_every) == 0:
            return asyncio.ensure_future(self._predict(job))
        skipped: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        skipped.set_result(None)
        return skipped

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

    async def _predict(self, job: Job) -> int | None:
        meta = {"output_len": job.sampling.max_tokens} if job.sampling.ignore_eos else {}
        return await self.predictions.predict(job.text, len(job.prompt_ids), meta)

    def _first_token(self, job: Job) -> None:
        if job.first_token_at is not None:  # a migrated request's next attempt
            return
        job.first_token_at = time.time()
        metrics.TTFT.observe(job.first_token_at - job.arrival)
        self._save(job, first_token_at=job.first_token_at)

    @staticmethod
    def _count(job: Job, event: TokenEvent) -> None:
        job.completion_tokens += len(event.token_ids)
        job.generated_ids.extend(event.token_ids)
        if job.stop_window and event.text:
            job.text_tail = (job.text_tail + event.text)[-job.stop_window :]
        if event.finish_reason is not None:
            job.finish_reason = event.finish_reason

    def _save(self, job: Job, **fields: Any) -> None:
        if self.store is not None:
            self.store.save_request(job.id, **fields)


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


async def _raise_retryable_errors(events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """Engines report some failures after their first token as a last "error" event marked
    `retryable` (a broken stream, an SGLang 503 retraction). Raise those as BackendError, after
    passing on any tokens the event carries, so the attempt fails over and the request migrates."""
    async with contextlib.aclosing(events) as inner:
        async for event in inner:
            if event.finish_reason == "error" and event.retryable:
                if event.token_ids or event.text:
                    yield TokenEvent(event.token_ids, event.text, None, event.phase)
                raise BackendError(event.error or "engine failed mid-stream", status=503, retryable=True)
            yield event


async def _result_or_none(task: asyncio.Task[int | None], timeout_s: float) -> int | None:
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        return None
