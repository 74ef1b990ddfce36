"""The TetriInfer scheduler end to end with real worker processes (tiny random Llama): an instance
flipped from prefill to decode under load, an unhealthy instance skipped with its queue re-placed,
the `idle` flip policy, and `tetri config show`.

One module-scoped fleet (2 prefill + 1 decode worker) serves every test; each test puts the workers
back into the roles it needs with the worker's own `POST /role`, and the test that kills a worker
runs last.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from orchestrator.config import InstanceSpec
from orchestrator.launcher import Fleet
from tests.conftest import ADMIN_TOKEN, TINY, fake_cluster

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DECODE_KV = 2048  # small on purpose: one long request puts the decode pool over 80% KV
ROLES = ("prefill", "prefill", "decode")
IDS = ("prefill-0", "prefill-1", "decode-2")

ISSUE_KNOBS = (
    "prefill_policy", "prefill_sched_batch", "chunk_size", "dispatch_policy", "power_of_d",
    "decode_admission", "heavy_decode_threshold", "heavy_prefill_threshold", "predictor",
    "predictor_granularity", "monitor_interval_ms", "flip_policy", "flip_idle_s",
)


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet()
    log_dir = tmp_path_factory.mktemp("sched-worker-logs")
    try:
        fleet.start_worker("prefill", TINY, chunk_size="16", kv_tokens=4096, log_dir=log_dir)
        fleet.start_worker("prefill", TINY, chunk_size="16", kv_tokens=4096, log_dir=log_dir)
        fleet.start_worker("decode", TINY, chunk_size="16", kv_tokens=DECODE_KV, log_dir=log_dir)
        fleet.wait_healthy(timeout_s=300)
        yield fleet
    finally:
        fleet.stop()


def specs_in_roles(fleet: Fleet, roles: tuple[str, ...] = ROLES) -> list[InstanceSpec]:
    """Put each worker into its role (the worker's own /role: drains first) and describe them."""
    specs = []
    for worker, role, iid in zip(fleet.workers, roles, IDS, strict=True):
        assert worker.proc.poll() is None, f"{iid} worker died: {worker.log_path.read_text()[-2000:]}"
        resp = httpx.post(f"{worker.url}/role", json={"role": role}, timeout=60)
        assert resp.status_code == 200, resp.text
        specs.append(InstanceSpec(url=worker.url, backend="native", role=role, model=TINY, id=iid))
    return specs


def completion(i: int, prompt_len: int, max_tokens: int) -> dict:
    """A completion with an exact prompt length (token ids) and an exact output length."""
    prompt = [100 + (i * 37 + k * 11) % 20000 for k in range(prompt_len)]
    return {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def post_all(url: str, bodies: list[dict], gap_s: float = 0.0,
                   client: httpx.AsyncClient | None = None) -> list[httpx.Response]:
    async def one(c: httpx.AsyncClient, k: int, body: dict) -> httpx.Response:
        await asyncio.sleep(k * gap_s)
        return await c.post(f"{url}/v1/completions", json=body)

    if client is not None:
        return await asyncio.gather(*(one(client, k, b) for k, b in enumerate(bodies)))
    async with httpx.AsyncClient(timeout=300) as c:
        return await asyncio.gather(*(one(c, k, b) for k, b in enumerate(bodies)))


def assert_all_complete(responses: list[httpx.Response], bodies: list[dict]) -> list[str]:
    ids = []
    for resp, body in zip(responses, bodies, strict=True):
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["usage"]["completion_tokens"] == body["max_tokens"], data["usage"]
        assert data["usage"]["prompt_tokens"] == len(body["prompt"])
        assert data["choices"][0]["finish_reason"] == "length"
        ids.append(data["id"])
    assert len(set(ids)) == len(ids), "a request id was answered twice"
    return ids


def records(state, ids: list[str]) -> dict[str, dict]:
    state.store.flush(timeout=10)
    rows = {rid: state.store.get_request(rid) for rid in ids}
    for rid, row in rows.items():
        assert row is not None, f"no record for {rid}"
    return rows


def events(url: str, kind: str) -> list[dict]:
    resp = httpx.get(f"{url}/admin/events", params={"kind": kind}, headers=AUTH, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]


def instances(url: str) -> dict[str, dict]:
    listed = httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=10).json()["instances"]
    return {i["id"]: i for i in listed}


def detail_of(event: dict) -> dict:
    detail = event.get("detail") or {}
    return json.loads(detail) if isinstance(detail, str) else detail


# --------------------------------------------------------------------------------------------------
def test_config_show_prints_every_knob_env_and_yaml(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    for knob in ISSUE_KNOBS:
        monkeypatch.delenv(f"TETRI_{knob.upper()}", raising=False)
    monkeypatch.delenv("TETRI_CONFIG", raising=False)
    cfg = tmp_path / "tetri.yaml"
    cfg.write_text("prefill_policy: ljf\nchunk_size: 64\nflip_idle_s: 5\npredictor: oracle\n")
    monkeypatch.setenv("TETRI_PREFILL_POLICY", "sjf")  # environment wins over the file
    monkeypatch.setenv("TETRI_POWER_OF_D", "3")
    monkeypatch.setenv("TETRI_DISPATCH_POLICY", "imbalanced")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    missing = [k for k in ISSUE_KNOBS if k not in shown]
    assert not missing, f"config show lacks {missing}"
    assert shown["prefill_policy"] == "sjf"
    assert shown["power_of_d"] == 3 and shown["dispatch_policy"] == "imbalanced"
    assert shown["chunk_size"] == 64 and shown["flip_idle_s"] == 5 and shown["predictor"] == "oracle"
    # defaults of the issue
    assert shown["heavy_decode_threshold"] == 128 and shown["heavy_prefill_threshold"] == 512
    assert shown["predictor_granularity"] == 200 and shown["prefill_sched_batch"] == 16
    assert shown["monitor_interval_ms"] == 100
    # conditional disaggregation (co-located fallback onto decode instances)
    assert shown["colocate_on_decode"] is True and shown["colocate_backlog_tokens"] == 1200

    # TETRI_CONFIG names the file when --config is absent; a bad value is refused, not ignored.
    monkeypatch.setenv("TETRI_CONFIG", str(cfg))
    monkeypatch.delenv("TETRI_PREFILL_POLICY")
    shown = json.loads(CliRunner().invoke(app, ["config", "show"]).output)
    assert shown["prefill_policy"] == "ljf" and shown["chunk_size"] == 64
    monkeypatch.setenv("TETRI_DECODE_ADMISSION", "yolo")
    assert CliRunner().invoke(app, ["config", "show"]).exit_code != 0


def test_flip_prefill_to_decode_under_load_loses_and_duplicates_nothing(fleet3, orchestrator_for):
    url, state = orchestrator_for(specs_in_roles(fleet3), monitor_interval_ms=100)
    n = 24
    bodies = [completion(i, 20 + (i * 29) % 180, 12 + (i * 7) % 29) for i in range(n)]
    flip_result: dict = {}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            stream = asyncio.create_task(post_all(url, bodies, gap_s=0.06, client=client))
            # Flip once a third of the stream is out and requests are in flight on both prefills.
            await asyncio.sleep(n / 3 * 0.06)
            resp = await client.post(f"{url}/admin/instances/prefill-1/flip", headers=AUTH)
            flip_result["status"], flip_result["body"] = resp.status_code, resp.json()
            flip_result["active_at_flip"] = state.server.active
            return await stream

    responses = asyncio.run(main())
    assert flip_result["status"] == 200, flip_result
    flipped = flip_result["body"]
    assert flipped["changed"] is True and flipped["role"] == "decode" and flipped["from"] == "prefill"
    assert flip_result["active_at_flip"] > 0, "the flip did not happen under load"

    # Every request completed exactly once with its exact token count, and is recorded so.
    ids = assert_all_complete(responses, bodies)
    rows = records(state, ids)
    assert all(r["state"] == "finished" for r in rows.values()), [r["state"] for r in rows.values()]
    assert [rows[i]["completion_tokens"] for i in ids] == [b["max_tokens"] for b in bodies]
    assert state.store.request_stats()["finished"] == n
    assert state.server.active == 0

    # The flip is an event row with its duration (and the worker's drain/flip split).
    flips = events(url, "flip")
    assert len(flips) == 1
    ev = flips[0]
    assert ev["instance_id"] == "prefill-1" and ev["duration_s"] is not None and ev["duration_s"] > 0
    detail = detail_of(ev)
    assert detail["from"] == "prefill" and detail["to"] == "decode"
    assert 0 <= detail["flip_s"] <= ev["duration_s"] and detail["drain_s"] >= 0

    # It now reports decode, to us and on its own, and takes decode work.
    listed = instances(url)
    assert listed["prefill-1"]["role"] == "decode" and listed["prefill-1"]["state"] == "healthy"
    assert httpx.get(f"{fleet3.workers[1].url}/health", timeout=5).json()["role"] == "decode"
    after = [completion(100 + i, 30 + 10 * i, 24) for i in range(8)]
    after_ids = assert_all_complete(asyncio.run(post_all(url, after)), after)
    after_rows = records(state, after_ids)
    assert {r["prefill_instance"] for r in after_rows.values()} == {"prefill-0"}
    decoders = [r["decode_instance"] for r in after_rows.values()]
    assert "prefill-1" in decoders, decoders


def test_idle_flip_policy_flips_one_idle_prefill_when_decode_is_loaded(fleet3, orchestrator_for):
    url, state = orchestrator_for(specs_in_roles(fleet3), monitor_interval_ms=100, flip_policy="idle",
                                  flip_idle_s=1.0, flip_min_per_role=1)
    # Idle everywhere: nothing flips, however long the prefills have been idle.
    time.sleep(1.6)
    assert events(url, "flip") == []

    roles_seen: list[dict[str, str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            roles_seen.append({i.id: i.role for i in list(state.cluster.instances.values())})
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # One long request: prompt + output fill > 80% of the decode worker's KV for its whole decode.
    body = completion(7, 1648, 384)
    answer: list[httpx.Response] = []
    try:
        sender = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/v1/completions", json=body, timeout=300))
        )
        sender.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not events(url, "flip"):
            time.sleep(0.1)
        sender.join(timeout=300)
        time.sleep(1.5)  # min_per_role must also hold after the decode pool empties again
    finally:
        stop.set()
        watcher.join()

    assert_all_complete(answer, [body])
    flips = events(url, "flip")
    assert len(flips) == 1, flips
    ev = flips[0]
    detail = detail_of(ev)
    assert detail["from"] == "prefill" and detail["to"] == "decode"
    assert ev["instance_id"] in ("prefill-0", "prefill-1") and ev["duration_s"] > 0
    # min_per_role = 1: of the two idle prefills exactly one went, the other stayed.
    assert roles_seen and all(list(s.values()).count("prefill") >= 1 for s in roles_seen)
    listed = instances(url)
    assert sorted(i["role"] for i in listed.values()) == ["decode", "decode", "prefill"]
    assert listed[ev["instance_id"]]["role"] == "decode"


def test_late_binding_moves_queued_prompts_to_an_idle_prefill_worker(fleet3, orchestrator_for):
    """Real workers: prefill-1's engine is made to look full (one prompt in flight that never
    returns), so what the global scheduler queues there waits; prefill-0 takes those prompts as it
    frees up. Every request completes exactly once, and the store names the worker that ran it."""
    url, state = orchestrator_for(specs_in_roles(fleet3), monitor_interval_ms=100, prefill_engine_backlog=1,
                                  colocate_backlog_tokens=0, colocate_heavy_heavy=False, late_binding="busiest")
    held = state.cluster.instances["prefill-1"]
    held.inflight_prefills, held.inflight_prefill_tokens = 1, 10**9  # a chunk's worth and more waits there
    n = 10
    bodies = [completion(400 + i, 120 + 16 * (i % 4), 4) for i in range(n)]
    try:
        # Without late binding what waits at prefill-1 never starts: fail in a minute, not hang.
        responses = asyncio.run(asyncio.wait_for(post_all(url, bodies), timeout=60))
    finally:
        held.inflight_prefills = held.inflight_prefill_tokens = 0  # the monitor's next tick pumps it
    ids = assert_all_complete(responses, bodies)
    rows = records(state, ids)
    assert all(r["state"] == "finished" for r in rows.values())
    assert state.placement.steals > 0
    assert {r["prefill_instance"] for r in rows.values()} == {"prefill-0"}  # nothing ran on the held one
    assert not len(state.placement.queue_of(held))


def test_unhealthy_prefill_is_skipped_and_its_queue_replaced(fleet3, orchestrator_for):
    """Runs last: it kills a worker of the shared fleet."""
    # No backlog fallback: a re-placed request must go to the surviving prefill instance, not run
    # co-located on the decode worker because the survivor's queue is long (that path has its own tests).
    url, state = orchestrator_for(specs_in_roles(fleet3), monitor_interval_ms=100, prefill_engine_backlog=1,
                                  monitor_failures_unhealthy=3, colocate_backlog_tokens=0)
    victim = fleet3.workers[1]
    n = 16
    bodies = [completion(200 + i, 360 + 8 * (i % 5), 6) for i in range(n)]
    queued_at_kill: list[str] = []

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            stream = asyncio.create_task(post_all(url, bodies, client=client))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                queue = state.placement.queues.get("prefill-1")
                if queue is not None and len(queue) >= 3:
                    break
                await asyncio.sleep(0.005)
            queue = state.placement.queues.get("prefill-1")
            queued_at_kill.extend(r.id for r in queue.items())
            victim.proc.kill()  # SIGKILL: no goodbye, in-flight and queued work must move
            return await stream

    responses = asyncio.run(main())
    assert len(queued_at_kill) >= 3, "no queue formed at the victim"
    ids = assert_all_complete(responses, bodies)
    rows = records(state, ids)
    assert all(r["state"] == "finished" for r in rows.values())
    # What waited in the dead instance's queue was served by the survivor.
    assert all(rows[rid]["prefill_instance"] == "prefill-0" for rid in queued_at_kill), queued_at_kill

    # Marked unhealthy (an event row too), taken out of placement; new requests avoid it.
    deadline = time.monotonic() + 10
    while instances(url)["prefill-1"]["state"] != "unhealthy" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert instances(url)["prefill-1"]["state"] == "unhealthy"
    assert any(e["instance_id"] == "prefill-1" for e in events(url, "unhealthy"))
    assert "prefill-1" not in state.placement.queues
    more = [completion(300 + i, 50, 8) for i in range(6)]
    more_ids = assert_all_complete(asyncio.run(post_all(url, more)), more)
    assert {r["prefill_instance"] for r in records(state, more_ids).values()} == {"prefill-0"}


def test_decode_kv_refusal_does_not_exclude_the_only_prefill_instance():
    """A decode worker that refuses the pushed KV (507, pool full) fails the prefill call; the retry
    must not exclude the (blameless) prefill instance, or a one-prefill cluster answers 503."""
    from backends.base import BackendError, SamplingParams, TokenEvent
    from orchestrator.config import Settings
    from orchestrator.placement import Placement
    from orchestrator.serving import Job, Server

    settings = Settings(database_url="sqlite://", model=TINY, decode_admission="greedy")
    calls: list[str] = []

    class FlakyPrefill:
        role = "prefill"
        url = "http://prefill.invalid"
        instance_id = "prefill-0"
        async def prefill_stream(self, request, handoff):  # the worker adapter's streamed /prefill
            calls.append(handoff.decode_instance_id)
            if len(calls) == 1:
                raise BackendError("decode worker refused KV: KV pool full", status=507, retryable=True)
            yield TokenEvent([7], "x", finish_reason="length")

    class Decode:
        role = "decode"
        url = "http://decode.invalid"
        instance_id = "decode-0"
        generates_on_decode = False  # Backend's attribute: this fake cannot host a co-located request

    cluster = fake_cluster([("prefill-0", "prefill", FlakyPrefill()), ("decode-0", "decode", Decode())])
    server = Server(settings, cluster, Placement(settings, cluster, seed=0), None, None)
    job = Job(TINY, [5, 6, 7], SamplingParams(max_tokens=1, temperature=0))

    async def run() -> list:
        return [e async for e in server.run(job)]

    events = asyncio.run(run())
    assert calls == ["decode-0", "decode-0"] and job.finish_reason == "length"
    assert [t for e in events for t in e.token_ids] == [7]


def test_colocated_fallback_room_test_and_backlog_measure():
    """Placement's pieces of the adaptive fallback: the prefill backlog counts our queue and the load
    report; a decode instance has room only with >= 20% of its pool + the prompt free after
    reservations and nothing waiting; decode servers that cannot run whole requests never host one."""
    from backends.base import LoadReport
    from orchestrator.cluster import Cluster
    from orchestrator.config import Settings
    from orchestrator.placement import Placement
    from orchestrator.policies.hosts import has_room
    from orchestrator.policies.types import RequestView

    class Fake:
        generates_on_decode = True

        def __init__(self, role: str) -> None:
            self.role = role

    class NoGenerate(Fake):
        generates_on_decode = False

    settings = Settings(database_url="sqlite://", model=TINY)
    cluster = Cluster()
    for iid, backend in (("p", Fake("prefill")), ("d1", Fake("decode")), ("d2", Fake("decode")),
                         ("sg", NoGenerate("decode"))):
        inst = cluster.add(InstanceSpec(url=f"http://{iid}.invalid", role=backend.role, model=TINY, id=iid))
        inst.backend = backend  # type: ignore[assignment]
        inst.state = "healthy"
    placement = Placement(settings, cluster, seed=0)
    p, d1, d2, sg = (cluster.instances[i] for i in ("p", "d1", "d2", "sg"))
    p.load = LoadReport(role="prefill", queued_prompt_tokens=300, running_prompt_tokens=100)
    placement.queue_of(p).push(RequestView(id="q", arrival=0.0, prompt_tokens=250, max_tokens=8), 0.0)
    assert placement.view(p).prefill_load == 650  # our queue is folded into the engine's report

    req = RequestView(id="r", arrival=0.0, prompt_tokens=200, max_tokens=8)
    for inst in (d1, d2, sg):
        inst.load = LoadReport(role="decode", free_kv_tokens=900, total_kv_tokens=4000, running=2)
    assert not has_room(placement.view(d1), req)  # 900 < 0.2 * 4000 + 200
    d1.load = LoadReport(role="decode", free_kv_tokens=1000, total_kv_tokens=2000, running=3)
    assert has_room(placement.view(d1), req)  # 1000 >= 400 + 200
    with placement.reserve(d1, RequestView(id="x", arrival=0.0, prompt_tokens=401, max_tokens=8)):
        assert not has_room(placement.view(d1), req)  # reservations count
    d2.load = LoadReport(role="decode", free_kv_tokens=1900, total_kv_tokens=2000, running=0, queued=1)
    assert not has_room(placement.view(d2), req)  # something waits there
    sg.load = LoadReport(role="decode", free_kv_tokens=2000, total_kv_tokens=2000)
    assert [i.id for i in placement.decode_hosts(TINY, None, set())] == ["d1", "d2"]

    def pick(test, exclude=frozenset()):
        views = [placement.view(h) for h in placement.decode_hosts(TINY, None, set(exclude))]
        return placement.core.pick_host(req, views, test)

    assert pick("room") == "d1"
    assert pick("room", {"d1"}) is None
    # Without a test: the least outstanding (d2: 0 running + 1 queued < d1: 3 running).
    assert pick(None) == "d2"
    # ...unless its prefill load is higher: prompt tokens waiting there come first.
    d2.load = LoadReport(role="decode", free_kv_tokens=1900, total_kv_tokens=2000, running=0, queued=1,
                         queued_prompt_tokens=500)  # fmt: skip
    d1.load = LoadReport(role="decode", free_kv_tokens=1000, total_kv_tokens=2000, running=3,
                         running_prompt_tokens=100)  # fmt: skip
    assert pick(None) == "d1"
    placement.queue_of(d1).push(RequestView(id="w", arrival=0.0, prompt_tokens=450, max_tokens=8), 0.0)
    assert pick(None) == "d2"  # 100 + 450 > 500
