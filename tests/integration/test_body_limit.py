"""Request bodies past `max_request_body_bytes` get 413 (OpenAI error shape) without being read
whole, and the event loop keeps answering /health meanwhile."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

FOUR_MB = 4 * 1024 * 1024


def _prompt_body(size: int) -> bytes:
    return b'{"model": "m", "prompt": "' + b"a" * size + b'"}'


def test_a_large_body_gets_413_by_its_length_and_by_its_bytes(orchestrator_for):
    url, _ = orchestrator_for([], max_request_body_bytes=1024 * 1024)
    # Declared too large: refused before reading.
    resp = httpx.post(f"{url}/v1/completions", content=_prompt_body(FOUR_MB),
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"

    # Chunked, no length: refused once the bytes pass the limit.
    def chunks():
        for _ in range(64):
            yield b"a" * 65536

    resp = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                      timeout=30)
    assert resp.status_code == 413
    assert "exceeds" in resp.json()["error"]["message"]
    # Under the limit, the same route still answers (here: 404 for the unknown model, not 413).
    ok = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=30)
    assert ok.status_code == 404


def test_health_stays_fast_while_4mb_prompts_are_refused(orchestrator_for):
    url, _ = orchestrator_for([])

    async def main() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(timeout=30) as client:
            stop = asyncio.Event()
            idle = []  # the machine's own /health latency, nothing being refused
            for _ in range(30):
                start = time.perf_counter()
                await client.get(f"{url}/health")
                idle.append(time.perf_counter() - start)
                await asyncio.sleep(0.01)

            async def big() -> None:
                while not stop.is_set():
                    resp = await client.post(f"{url}/v1/completions", content=_prompt_body(FOUR_MB + 10),
                                             headers={"content-type": "application/json"})
                    assert resp.status_code == 413

            senders = [asyncio.create_task(big()) for _ in range(2)]
            latencies = []
            await asyncio.sleep(0.2)
            for _ in range(60):
                start = time.perf_counter()
                resp = await client.get(f"{url}/health")
                latencies.append(time.perf_counter() - start)
                assert resp.status_code == 200
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*senders)
            return latencies, idle

    latencies, idle = asyncio.run(main())
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    # 50 ms on a quiet machine; on one loaded by other jobs, no worse than 3x its own idle p99.
    limit = max(0.05, 3 * sorted(idle)[int(0.99 * (len(idle) - 1))])
    assert p99 < limit, f"/health p99 {p99 * 1e3:.1f} ms (median {statistics.median(latencies) * 1e3:.1f} ms)"
