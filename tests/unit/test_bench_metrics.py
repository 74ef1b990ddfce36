"""The runner's metrics on a scripted fake stream are exact."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bench.metrics import RequestRecord, percentile, summarize
from bench.runner import parse_sse_line, send_one
from bench.workloads import BenchRequest


def _sse(chunks: list[dict | str]) -> bytes:
    out = []
    for c in chunks:
        out.append("data: " + (c if isinstance(c, str) else json.dumps(c)) + "\n\n")
    return "".join(out).encode()


class ScriptedClock:
    """A clock that advances by scripted steps each time it is read."""

    def __init__(self, times: list[float]) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def _transport(body: bytes, status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        assert payload["ignore_eos"] is True and payload["stream"] is True
        assert payload["max_tokens"] == 4
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def _chunk(text: str, finish: str | None = None, usage: dict | None = None) -> dict:
    d: dict = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        d["usage"] = usage
    return d


async def _run(body: bytes, clock: ScriptedClock, status: int = 200) -> RequestRecord:
    req = BenchRequest("r1", 0.0, 8, 4, prompt="a b c d e f g h")
    rec = RequestRecord(id="r1", prompt_tokens=8, expected_output_tokens=4)
    async with httpx.AsyncClient(transport=_transport(body, status)) as client:
        return await send_one(client, "http://x/v1", req, "m", rec, clock=clock)


def test_scripted_stream_metrics_are_exact():
    body = _sse([
        _chunk(" a"), _chunk(" b"), _chunk(" c"), _chunk(" d", "length"),
        {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 4}}, "[DONE]",
    ])  # fmt: skip
    # reads: sent, 4 token chunks, the usage chunk, end of stream
    clock = ScriptedClock([10.0, 10.25, 10.30, 10.45, 10.50, 10.51, 10.60])
    rec = asyncio.run(_run(body, clock))
    assert rec.error is None
    assert rec.output_tokens == 4
    assert rec.finish_reason == "length"
    assert rec.ttft_s == pytest.approx(0.25)
    assert rec.gaps_s == pytest.approx([0.05, 0.15, 0.05])
    assert rec.tpot_s == pytest.approx((10.50 - 10.25) / 3)
    assert rec.jct_s == pytest.approx(0.60)
    d = rec.to_dict(t0=10.0)
    s = summarize([d], instances=2)
    assert s["completed"] == 1 and s["errors"] == 0
    assert s["mean_ttft_ms"] == pytest.approx(250.0)
    assert s["mean_tpot_ms"] == pytest.approx(250.0 / 3)
    assert s["mean_jct_ms"] == pytest.approx(600.0)
    assert s["max_itl_ms"] == pytest.approx(150.0)
    assert s["makespan_s"] == pytest.approx(0.60)
    assert s["throughput_rps"] == pytest.approx(1 / 0.60)
    assert s["instance_seconds"] == pytest.approx(1.2)


def test_usage_count_wins_over_chunk_count():
    # two chunks carry two tokens each: usage says 4 tokens, TPOT divides by 3
    body = _sse([_chunk(" a b"), _chunk(" c d", "length"), {"choices": [], "usage": {"completion_tokens": 4}}])
    clock = ScriptedClock([0.0, 1.0, 1.3, 1.4, 1.5])
    rec = asyncio.run(_run(body, clock))
    assert rec.output_tokens == 4
    assert rec.tpot_s == pytest.approx(0.3 / 3)


def test_http_error_is_recorded():
    clock = ScriptedClock([0.0, 0.1])
    rec = asyncio.run(_run(b'{"error": {"message": "busy"}}', clock, status=503))
    assert rec.status == 503
    assert rec.error is not None and "503" in rec.error
    s = summarize([rec.to_dict()], 1)
    assert s["errors"] == 1 and s["completed"] == 0


def test_summary_percentiles_exact():
    recs = [
        {"ttft_s": t, "tpot_s": 0.01, "jct_s": 1.0 + t, "finish": 1.0 + t, "arrival": 0.0, "error": None,
         "output_tokens": 10}  # fmt: skip
        for t in (0.1, 0.2, 0.3, 0.4)
    ]
    s = summarize(recs, 1)
    assert s["mean_ttft_ms"] == pytest.approx(250.0)
    assert s["p50_ttft_ms"] == pytest.approx(250.0)
    assert s["p99_ttft_ms"] == pytest.approx(397.0)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert s["output_tokens_per_s"] == pytest.approx(40 / 1.4)


def test_parse_sse_line():
    assert parse_sse_line("data: [DONE]") == "DONE"
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
