"""OpenTelemetry tracing (orchestrator/tracing.py): off by default and free then; on, one span per
request with its phases as children, continuing a client's trace and passed on to the engines."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from orchestrator.tracing import setup_tracing  # noqa: E402
from tests.adapter_helpers import chat_body  # noqa: E402
from tests.conftest import ADMIN_TOKEN, make_settings, serve_app  # noqa: E402
from tests.fakes.harness import fakes, register  # noqa: E402

MODEL = "toy-trtllm-pd"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def test_off_by_default_and_the_sdk_not_imported():
    code = ("import sys; from orchestrator.app import create_app; from orchestrator.config import Settings; "
            "s = Settings(database_url='sqlite://', predictor='constant'); app = create_app(s); "
            "assert app.state.tetri.tracing is None and app.state.tetri.server.tracing is None; "
            "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'SDK imported'; "
            "assert not any('TraceContext' in str(m.cls) for m in app.user_middleware)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_request_is_one_span_with_its_phases(tmp_path):
    exporter = InMemorySpanExporter()
    with fakes() as group:
        ctx, gen = group.trtllm(model=MODEL), group.trtllm(model=MODEL)
        from orchestrator.app import create_app

        # An endpoint turns tracing on (and the client-context middleware); the spans go to memory.
        app = create_app(make_settings(tmp_path, [], otel_endpoint="http://127.0.0.1:9"))
        state = app.state.tetri
        assert state.tracing is not None
        state.tracing.shutdown()
        state.server.tracing = state.tracing = setup_tracing(None, exporter=exporter)
        with serve_app(app) as url:
            register(url, ADMIN_TOKEN, ctx.url, "tensorrt-llm", "prefill", MODEL, "trt-ctx")
            register(url, ADMIN_TOKEN, gen.url, "tensorrt-llm", "decode", MODEL, "trt-gen")
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(MODEL, "Trace me", stream=True),
                              headers={"traceparent": traceparent}, timeout=30)
            assert resp.status_code == 200, resp.text
            rid = next(line for line in resp.text.splitlines() if line.startswith("data: {"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"tetri.request", "queue", "prefill", "kv_handoff", "decode"}, list(spans)
    root = spans["tetri.request"]
    # It continues the client's trace, under the client's span.
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN
    assert root.attributes["tetri.state"] == "finished" and root.attributes["gen_ai.usage.output_tokens"] == 12
    assert root.attributes["tetri.prefill_instance"] == "trt-ctx"
    assert root.attributes["tetri.decode_instance"] == "trt-gen"
    assert root.attributes["tetri.request_id"] in rid
    order = ["queue", "prefill", "kv_handoff", "decode"]
    for name in order:
        child = spans[name]
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    for a, b in zip(order, order[1:], strict=False):
        assert spans[a].end_time == spans[b].start_time  # phases tile the request
    assert spans["prefill"].attributes["tetri.instance"] == "trt-ctx"
    # The engines got the request span's W3C context.
    sent = [h.get("traceparent") for h in ctx.fake.headers + gen.fake.headers]
    want = f"00-{CLIENT_TRACE}-{root.context.span_id:016x}-01"
    assert sent and all(tp == want for tp in sent), sent


def test_no_traceparent_without_tracing(tmp_path):
    with fakes() as group:
        colo = group.trtllm(model=MODEL)
        from orchestrator.app import create_app

        app = create_app(make_settings(tmp_path, []))
        with serve_app(app) as url:
            register(url, ADMIN_TOKEN, colo.url, "tensorrt-llm", "colocated", MODEL, "trt-colo")
            resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(MODEL, "No trace"),
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, timeout=30)
            assert resp.status_code == 200, resp.text
    assert colo.fake.headers and all("traceparent" not in h for h in colo.fake.headers)
