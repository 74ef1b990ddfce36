"""Hold load: `tetri serve` over two SGLang fakes (separate processes), 5,000 streamed requests at
64-way concurrency, one in ten left by its client after the first chunk. Afterwards the orchestrator
holds no more connections than its pool, no instance was ever marked unhealthy, every request that
was not left finished, every bootstrap room reached both servers, and the servers hold nothing."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter

import aiohttp
import httpx
import pytest

from bench import router as bench
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("TETRI_LOAD_TEST_REQUESTS", "5000"))
CLIENTS = 64
POOL = 32  # backend_max_connections: smaller than the clients, so the pool's bound is exercised


def test_5000_requests_with_aborts_at_64_clients_leak_nothing(tmp_path):
    procs: list[bench.Proc] = []
    try:
        prefill = bench.start_fake("prefill", tmp_path)
        procs.append(prefill)
        decode = bench.start_fake("decode", tmp_path)
        procs.append(decode)
        tetri = bench.start_tetri(prefill, decode, tmp_path, admin_token=ADMIN_TOKEN, backend_max_connections=POOL)
        procs.append(tetri)
        rng = random.Random(7)
        aborts = {i for i in range(REQUESTS) if rng.random() < 0.1}

        async def load() -> list[bench.Sample]:
            connector = aiohttp.TCPConnector(limit=CLIENTS * 2)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
                ids = iter(range(REQUESTS))
                samples: list[bench.Sample] = []

                async def worker() -> None:
                    for i in ids:
                        samples.append(await bench._openai(client, tetri.url, i, 16, 64, abort=i in aborts))

                await asyncio.gather(*(worker() for _ in range(CLIENTS)))
                return samples

        samples = asyncio.run(load())
        errors = Counter(s.error for s in samples if s.error)
        assert not errors, errors.most_common(3)
        assert sum(s.aborted for s in samples) == len(aborts)

        fake_ports = {int(prefill.url.rsplit(":", 1)[1]), int(decode.url.rsplit(":", 1)[1])}
        deadline = time.monotonic() + 10
        while True:  # aborted pairs finish their aborts in the background
            stats = [httpx.get(f"{p.url}/_fake_stats", timeout=10).json() for p in (prefill, decode)]
            if all(s["live"] == 0 for s in stats) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [s["live"] for s in stats] == [0, 0], "a server still holds requests (KV)"
        p_rooms, d_rooms = (set(s["rooms"]) for s in stats)
        assert p_rooms == d_rooms and len(d_rooms) >= REQUESTS - len(aborts), "lopsided P/D pairs"
        # Aborted requests were aborted on the servers, not run to their end.
        assert stats[1]["aborted"] >= 0.5 * len(aborts)

        held = bench.connections_to(tetri.pid, fake_ports)
        assert held <= 2 * POOL, f"{held} connections held after the run (pool: {POOL} per instance)"
        unhealthy = httpx.get(f"{tetri.url}/admin/events", params={"kind": "unhealthy"},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).json()["events"]
        assert unhealthy == [], "an instance was marked unhealthy under load"
        health = httpx.get(f"{tetri.url}/health", timeout=10).json()
        assert health["healthy"] == 2
    finally:
        bench.stop(procs)
