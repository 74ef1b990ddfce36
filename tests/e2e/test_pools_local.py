"""The local pool provider with real worker processes: a decode pool scaled 1 -> 3 -> 1 through
`PUT /admin/pools/decode` under a steady load. Nothing is lost (every request finishes, none fails,
request migration off so that a worker stopped too early would show), the new workers take traffic,
and each removed worker was drained and deregistered before its process stopped."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.config import InstanceSpec
from orchestrator.launcher import Fleet, process_fleet
from tests.conftest import ADMIN_TOKEN, TINY, make_settings, serve_app

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORKER = {"chunk_size": "16", "kv_tokens": 4096}


@pytest.fixture
def up_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """What `tetri up` does first: one prefill and one decode worker in the process fleet, which
    the local provider then adopts."""
    fleet = process_fleet()
    try:
        fleet.start_worker("prefill", TINY, log_dir=tmp_path / "logs", **WORKER)  # type: ignore[arg-type]
        fleet.start_worker("decode", TINY, log_dir=tmp_path / "logs", **WORKER)  # type: ignore[arg-type]
        fleet.wait_healthy(timeout_s=300)
        yield fleet
    finally:
        fleet.stop()


def test_decode_pool_scales_1_3_1_under_load_and_loses_nothing(up_fleet: Fleet, tmp_path: Path) -> None:
    from bench.scale import measure
    from orchestrator.app import create_app

    specs = [InstanceSpec(url=w.url, backend="native", role=w.role, model=TINY, id=f"{w.role}-{i}")
             for i, w in enumerate(up_fleet.workers)]  # fmt: skip
    settings = make_settings(
        tmp_path, specs, pool_provider="local", local_worker_chunk_size=WORKER["chunk_size"],
        local_worker_kv_tokens=WORKER["kv_tokens"], local_worker_log_dir=str(tmp_path / "logs"),
        migrate_on_failure=False,
    )  # fmt: skip
    app = create_app(settings)
    state = app.state.tetri
    with serve_app(app) as url:
        pools = httpx.get(f"{url}/admin/pools", headers=AUTH).json()
        assert pools["provider"] == "local"
        by_role = {p["role"]: p for p in pools["pools"]}
        assert by_role["decode"]["ready"] == 1 and by_role["prefill"]["ready"] == 1  # `up`'s workers, adopted
        # Beyond local_max_workers: refused, nothing started.
        too_many = httpx.put(f"{url}/admin/pools/decode", json={"replicas": 9}, headers=AUTH)
        assert too_many.status_code == 409, too_many.text
        # A burst of long prompts just before the scale-down: requests routed to a leaving decode
        # instance are still prefilling elsewhere when it starts to drain; their KV must still be
        # taken there (the drain waits for them), or they would fail (migration is off).
        result = measure(url, ADMIN_TOKEN, TINY, role="decode", low=1, peak=3, clients=4, max_tokens=8,
                         prompt_words=30, settle_s=1.5, burst_at_down=6, burst_words=300)  # fmt: skip
        provider = state.pool_provider
        stopped = {m.id: m.worker.stopped_at for m in provider.stopped}
        deregistered = {e["instance_id"]: e["at"] for e in state.store.list_events(kind="deregister", limit=100)}
        state.store.flush()
        records = state.store.list_requests(limit=100_000)
    print(json.dumps(result, indent=1))
    assert result["requests"]["sent"] > 20
    assert result["requests"]["failed"] == 0, result["requests"]
    assert result["requests"]["not_finished"] == 0
    assert all(r["state"] == "finished" for r in records), {r["state"] for r in records}
    added = [n["id"] for n in result["scale_up"]["instances"]]
    assert len(added) == 2 and all(n["requests"] > 0 for n in result["scale_up"]["instances"]), result["scale_up"]
    removed = [r["id"] for r in result["scale_down"]["removed"]]
    assert len(removed) == 2 and result["scale_down"]["failed"] == 0, result["scale_down"]
    for iid in removed:
        # Drained and deregistered first, the process stopped after; nothing it ran ended later.
        assert iid in stopped and iid in deregistered, (iid, stopped, deregistered)
        assert deregistered[iid] <= stopped[iid]
        ran_there = [r for r in records if r["decode_instance"] == iid]
        assert all(r["finished_at"] <= stopped[iid] for r in ran_there)
    assert len(process_fleet().workers) == 2  # back to the prefill worker and one decode worker


def test_provider_reports_follows_a_flip_and_drains_before_it_stops(tmp_path: Path) -> None:
    """The provider alone, with recording callbacks: a worker it starts is reported ready with its
    id, role and model; a flip moves it (and what was asked for) to the other pool; one that dies is
    deregistered and replaced; removing one calls on_leaving while its process still runs, and stops
    the process after. A worker that cannot start is forgotten without a report; asking beyond
    local_max_workers is refused."""
    import asyncio

    from orchestrator.config import Settings
    from orchestrator.pools.base import ReadyInstance, ScaleRefused
    from orchestrator.pools.local import LocalProvider

    settings = Settings(model=TINY, local_worker_chunk_size="16", local_worker_kv_tokens=2048,
                        local_worker_log_dir=str(tmp_path), local_max_workers=2)  # fmt: skip
    fleet = Fleet()
    provider = LocalProvider(settings, fleet)
    ready: list[ReadyInstance] = []
    leaving: list[tuple[str, bool]] = []

    async def on_ready(inst: ReadyInstance) -> None:
        ready.append(inst)

    async def on_leaving(url: str) -> None:
        worker = next(w for w in fleet.workers if w.url == url)
        leaving.append((url, worker.proc.poll() is None))

    async def until(cond: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.1)

    async def pools() -> dict[str, tuple[int, int]]:
        return {p.role: (p.desired, p.ready) for p in await provider.pools()}

    async def run() -> None:
        await provider.start(on_ready, on_leaving)
        try:
            with pytest.raises(ScaleRefused):
                await provider.scale("decode", 3)
            status = await provider.scale("decode", 1)
            assert (status.desired, status.ready) == (1, 0)
            await until(lambda: bool(ready))
            assert ready[0].role == "decode" and ready[0].model == TINY and ready[0].backend == "native"
            assert ready[0].id == "decode-0" and ready[0].url == fleet.workers[0].url
            # The orchestrator flips it: it now counts in the prefill pool.
            httpx.post(f"{ready[0].url}/role", json={"role": "prefill"}, timeout=60).raise_for_status()
            assert (await pools())["prefill"] == (1, 1) and (await pools())["decode"] == (0, 0)
            # It dies: deregistered, and a replacement starts (the pool still asks for one).
            os.killpg(fleet.workers[0].proc.pid, signal.SIGKILL)
            await until(lambda: len(ready) == 2)
            assert leaving == [(ready[0].url, False)]
            assert ready[1].role == "prefill" and ready[1].url != ready[0].url and ready[1].id == "prefill-1"
            worker = fleet.workers[0]
            await provider.scale("prefill", 0)
            await until(lambda: not provider.members)
            assert leaving[1:] == [(ready[1].url, True)]  # drained while it ran ...
            assert worker.proc.poll() is not None and not fleet.workers  # ... and stopped after
            assert worker.stopped_at is not None
        finally:
            await provider.stop()

    async def broken() -> None:
        bad = LocalProvider(settings.model_copy(update={"model": "no-such-model-spec"}), fleet)
        calls: list[ReadyInstance] = []

        async def record(inst: ReadyInstance) -> None:
            calls.append(inst)

        await bad.start(record, on_leaving)
        try:
            await bad.scale("decode", 1)
            await until(lambda: not bad.members)
            assert calls == [] and not fleet.workers
            # Given up: the pool asks for one fewer (no restart loop), and says so in the log.
            assert {p.role: (p.desired, p.ready) for p in await bad.pools()}["decode"] == (0, 0)
        finally:
            await bad.stop()

    try:
        asyncio.run(run())
        asyncio.run(broken())
    finally:
        fleet.stop()


def test_tetri_up_scales_its_decode_pool_and_stops_every_worker(tmp_path: Path) -> None:
    """`tetri up` runs with the local provider: PUT /admin/pools/decode {"replicas": 3} starts two
    more decode workers, registered once ready; stopping `tetri up` stops them too."""
    import subprocess

    from bench.scale import Admin, tetri_up

    with tetri_up(TINY, kv_tokens=2048, chunk_size="16", log_dir=tmp_path) as url:
        admin = Admin(url, "bench")
        assert admin.get("/admin/pools")["provider"] == "local"
        assert admin.scale("decode", 3)["desired"] == 3
        admin.wait_pool("decode", 3, timeout_s=180)
        decode = admin.instances("decode")
        assert len(decode) == 3 and all(i["state"] == "healthy" for i in decode.values())
        up_pid = int(subprocess.run(["pgrep", "-f", f"orchestrator.cli up --port {url.rsplit(':', 1)[1]}"],
                                    capture_output=True, text=True).stdout.split()[0])  # fmt: skip
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(up_pid)], capture_output=True,
                                                  text=True).stdout.split()]  # fmt: skip
        assert len(workers) == 4  # 1 prefill + 3 decode
    time.sleep(0.5)
    assert not [p for p in workers if _alive(p)], "orphan workers"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_leaving_decode_instance_takes_the_kv_of_a_request_routed_to_it_before_its_drain(
    up_fleet: Fleet, tmp_path: Path
) -> None:
    """The decode pool scaled to 0 while a long prompt routed to its one worker is still prefilling
    on the prefill worker: the drain must wait for that request's KV to arrive and its decode to end
    (migration off: a refused KV would fail the request)."""
    import threading

    from orchestrator.app import create_app

    specs = [InstanceSpec(url=w.url, backend="native", role=w.role, model=TINY, id=f"{w.role}-{i}")
             for i, w in enumerate(up_fleet.workers)]  # fmt: skip
    prefill_url = next(w.url for w in up_fleet.workers if w.role == "prefill")
    # Migration off (a refused KV fails the request); no co-located fallback (the prompt prefills
    # on the prefill worker and its KV goes to the decode worker).
    settings = make_settings(
        tmp_path, specs, pool_provider="local", migrate_on_failure=False, colocate_backlog_tokens=0
    )
    app = create_app(settings)
    with serve_app(app) as url:
        answer: dict[str, httpx.Response] = {}
        prompt = "Count: " + ", ".join(str(i) for i in range(300)) + ","  # ~1,400 tokens: ~90 chunks of 16
        body = {"model": TINY, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        sender = threading.Thread(
            target=lambda: answer.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        )
        sender.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{prefill_url}/load", timeout=5).json()["running"] == 0:  # prefilling now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scaled = httpx.put(f"{url}/admin/pools/decode", json={"replicas": 0}, headers=AUTH)
        assert scaled.status_code == 200, scaled.text
        sender.join(timeout=120)
        assert answer["r"].status_code == 200, answer["r"].text
        deadline = time.monotonic() + 30
        while app.state.tetri.cluster.by_url(specs[1].url) is not None:  # drained, then deregistered
            assert time.monotonic() < deadline
            time.sleep(0.05)
