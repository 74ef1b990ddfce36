"""Optional OpenTelemetry tracing (off unless `otel_endpoint` is set; `pip install tetri[otel]`).

One span per request (`tetri.request`) with child spans for its phases: `queue` (arrival to the
prefill's start), `prefill` (to the first token), `kv_handoff` (first token to the decode's first
output, disaggregated only) and `decode` (to the end). The children are recorded when the request
ends, from the times the server notes as it goes (a few `time.time()` calls), so a request's path
does no tracing work beyond `if job.trace is not None`. The W3C `traceparent` of the request's
span goes to the engines on every generation call (`TRACEPARENT`, backends/tracing.py, read by backends/http.py
and the TensorRT-LLM adapter), so an engine that traces (our workers, SGLang, TensorRT-LLM, vLLM)
can join the trace.

The SDK is imported only when tracing is configured: the default install does not need it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

from backends.tracing import TRACEPARENT  # the adapters read it: defined on their side

log = logging.getLogger(__name__)

# The traceparent a client sent with its request (set by the app's middleware when tracing is on):
# our request span then continues the client's trace.
INCOMING: contextvars.ContextVar[str | None] = contextvars.ContextVar("tetri_incoming_traceparent", default=None)


def _ns(t: float) -> int:
    return int(t * 1e9)


class RequestTrace:
    """The spans of one request; `mark` notes a phase's start, `finish` records everything."""

    __slots__ = ("span", "traceparent", "_tracer", "_marks")

    def __init__(self, tracer: Any, job: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        propagator = TraceContextTextMapPropagator()
        incoming = INCOMING.get()
        parent = propagator.extract({"traceparent": incoming}) if incoming else None
        self._tracer = tracer
        self._marks: dict[str, float] = {}
        self.span = tracer.start_span(
            "tetri.request", context=parent, kind=trace.SpanKind.SERVER, start_time=_ns(job.arrival),
            attributes={"tetri.request_id": job.id, "gen_ai.request.model": job.model,
                        "gen_ai.usage.input_tokens": len(job.prompt_ids),
                        "gen_ai.request.max_tokens": job.sampling.max_tokens},
        )
        carrier: dict[str, str] = {}
        propagator.inject(carrier, context=trace.set_span_in_context(self.span))
        self.traceparent = carrier.get("traceparent")

    def mark(self, phase: str) -> None:
        """A phase starts now ("prefill", "decode"); the first attempt's times count, and a later
        attempt (a retry or a migration) is an event on the request's span."""
        now = time.time()
        if phase in self._marks:
            self.span.add_event(f"retry.{phase}", timestamp=_ns(now))
            return
        self._marks[phase] = now

    def finish(self, job: Any, state: str, error: str | None) -> None:
        try:
            self._finish(job, state, error)
        except Exception:  # noqa: BLE001 - tracing must never fail a request's bookkeeping
            log.exception("tracing: could not record the spans of %s", job.id)

    def _finish(self, job: Any, state: str, error: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        end = time.time()
        prefill = self._marks.get("prefill")
        first = job.first_token_at
        decode = self._marks.get("decode")
        phases: list[tuple[str, float, float | None]] = [("queue", job.arrival, prefill)]
        if prefill is not None:
            phases.append(("prefill", prefill, first or end))
        if first is not None:
            if decode is not None and job.prefill_instance != job.decode_instance:
                phases += [("kv_handoff", first, decode), ("decode", decode, end)]
            else:
                phases.append(("decode", first, end))
        from opentelemetry import trace

        ctx = trace.set_span_in_context(self.span)
        for name, start, stop in phases:
            child = self._tracer.start_span(name, context=ctx, start_time=_ns(start))
            if name == "prefill" and job.prefill_instance:
                child.set_attribute("tetri.instance", job.prefill_instance)
            elif name == "decode" and job.decode_instance:
                child.set_attribute("tetri.instance", job.decode_instance)
            child.end(end_time=_ns(stop if stop is not None else end))
        span = self.span
        span.set_attribute("tetri.state", state)
        span.set_attribute("gen_ai.usage.output_tokens", job.completion_tokens)
        for key, value in (("tetri.backend", job.backend), ("tetri.prefill_instance", job.prefill_instance),
                           ("tetri.decode_instance", job.decode_instance), ("tetri.finish_reason", job.finish_reason)):
            if value:
                span.set_attribute(key, value)
        if job.migrations:
            span.set_attribute("tetri.migrations", job.migrations)
        if state != "finished":
            span.set_status(Status(StatusCode.ERROR, error or state))
        span.end(end_time=_ns(end))


class Tracing:
    """A tracer of our own provider (not the process-global one: several apps may run in one
    process, as in the tests)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("tetri")

    def start(self, job: Any) -> RequestTrace:
        trace = RequestTrace(self.tracer, job)
        TRACEPARENT.set(trace.traceparent)
        return trace

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup_tracing(endpoint: str | None, service_name: str = "tetri", exporter: Any = None) -> Tracing | None:
    """None when tracing is off (no endpoint and no exporter). `exporter`: an SDK span exporter to
    use instead of OTLP over HTTP to `endpoint` (tests pass the in-memory one)."""
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError("otel_endpoint is set but the OpenTelemetry SDK is not installed: "
                           "pip install 'tetri[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = endpoint.rstrip("/")  # type: ignore[union-attr]
        # OTLP/HTTP: a collector's base URL (http://collector:4318) gets the traces path added.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=url if url.endswith("/v1/traces") else f"{url}/v1/traces")))
        log.info("tracing: OTLP/HTTP spans to %s", url)
    return Tracing(provider)


class TraceContextMiddleware:
    """ASGI: a client's `traceparent` header becomes the parent of our request span (installed only
    when tracing is on)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"traceparent":
                    INCOMING.set(value.decode("latin-1"))
                    break
        await self.app(scope, receive, send)
