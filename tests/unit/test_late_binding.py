"""Late binding: a prompt queued for a busy instance moves to a peer of its pool that has room.

The policy object, the live Placement (futures resolve with the thief; exclusions, model, role and
decode admission respected) and the simulator (deterministic, every request finishes once, and the
moved prompts wait less)."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import LoadReport
from orchestrator.cluster import Cluster
from orchestrator.config import InstanceSpec, Settings
from orchestrator.placement import Placement
from orchestrator.policies.late_binding import make_late_binding
from orchestrator.policies.prefill_queue import PrefillQueue
from orchestrator.policies.types import RequestView
from tests.conftest import TINY


def test_busiest_peer_is_the_victim_and_none_never_moves():
    busiest = make_late_binding("busiest")
    assert busiest.victim("a", {"a": 900, "b": 300, "c": 500}) == "c"
    assert busiest.victim("a", {"b": 500, "c": 500}) == "b"  # ties by id
    assert busiest.victim("a", {"a": 900, "b": 0}) is None  # its own queue and empty peers never count
    assert make_late_binding("none").victim("a", {"b": 500}) is None
    with pytest.raises(ValueError, match="busiest"):
        make_late_binding("random")


def test_peek_is_what_pop_ready_releases_next():
    q = PrefillQueue("sjf", sched_batch=2)
    for i, n in enumerate((300, 100, 50)):
        q.push(RequestView(id=f"r{i}", arrival=float(i), prompt_tokens=n, max_tokens=4), 0.0)
    order = []
    while len(q):
        nxt = q.peek()
        (got,) = q.pop_ready(1.0, 0, 1)
        assert nxt is not None and got.id == nxt.id
        order.append(got.id)
    assert order == ["r1", "r0", "r2"] and q.peek() is None  # SJF within batches of two


class _Fake:
    generates_on_decode = True

    def __init__(self, role: str) -> None:
        self.role = role


def _cluster(members: list[tuple[str, str, str]]) -> Cluster:
    cluster = Cluster()
    for iid, role, model in members:
        inst = cluster.add(InstanceSpec(url=f"http://{iid}.invalid", role=role, model=model, id=iid))
        inst.backend = _Fake(role)  # type: ignore[assignment]
        inst.state = "healthy"
        inst.load = LoadReport(role=role, free_kv_tokens=4000, total_kv_tokens=4000)  # type: ignore[arg-type]
    return cluster


def _req(i: int, prompt: int = 100) -> RequestView:
    return RequestView(id=f"r{i}", arrival=float(i), prompt_tokens=prompt, max_tokens=8)


def _run_queued(late_binding: str, members, target: str, reqs, exclude=None, setup=None, after=None):
    """Queue `reqs` at `target` (engine backlog 1); return ({request id: instance id} of the
    releases, the Placement). `setup(cluster)` runs before the first request, `after(placement,
    cluster)` once everything is queued."""
    settings = Settings(database_url="sqlite://", model=TINY, prefill_engine_backlog=1, late_binding=late_binding)
    cluster = _cluster(members)
    if setup is not None:
        setup(cluster)
    placement = Placement(settings, cluster, seed=0)

    async def go() -> dict[str, str]:
        tasks = {r.id: asyncio.ensure_future(placement.acquire_at(cluster.instances[target], r, exclude))
                 for r in reqs}  # fmt: skip
        await asyncio.sleep(0)
        if after is not None:
            after(placement, cluster, {rid: t.result() for rid, t in tasks.items() if t.done()})
            await asyncio.sleep(0)
        got = {rid: t.result().instance.id for rid, t in tasks.items() if t.done()}
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return got

    return asyncio.run(go()), placement


def test_idle_peer_takes_the_next_queued_prompt_and_more_once_it_has_room():
    members = [("p1", "prefill", TINY), ("p2", "prefill", TINY)]
    reqs = [_req(0), _req(1), _req(2)]

    def finish_on_p2(placement, cluster, slots):
        for slot in slots.values():
            if slot.instance.id == "p2":
                slot.release()  # p2's engine is done: it takes r2 too

    got, placement = _run_queued("busiest", members, "p1", reqs, after=finish_on_p2)
    assert got == {"r0": "p1", "r1": "p2", "r2": "p2"} and placement.steals == 2
    assert not len(placement.queue_of(placement.cluster.instances["p1"]))

    got, placement = _run_queued("none", members, "p1", reqs, after=finish_on_p2)
    assert got == {"r0": "p1"} and placement.steals == 0  # the paper's binding: r1, r2 wait for p1


def test_no_move_to_an_excluded_instance_another_role_or_another_model():
    reqs = [_req(0), _req(1)]
    got, _ = _run_queued("busiest", [("p1", "prefill", TINY), ("p2", "prefill", TINY)], "p1", reqs)
    assert got == {"r0": "p1", "r1": "p2"}  # the control: with nothing in the way, r1 moves
    got, _ = _run_queued("busiest", [("p1", "prefill", TINY), ("p2", "prefill", TINY)], "p1", reqs, exclude={"p2"})
    assert got == {"r0": "p1"}  # r1 once failed on p2
    got, _ = _run_queued("busiest", [("p1", "prefill", TINY), ("d1", "decode", TINY)], "p1", reqs)
    assert got == {"r0": "p1"}
    got, _ = _run_queued("busiest", [("p1", "prefill", TINY), ("p2", "prefill", "other-model")], "p1", reqs)
    assert got == {"r0": "p1"}


def test_a_decode_host_takes_a_colocated_prompt_only_if_admission_lets_it():
    members = [("d1", "decode", TINY), ("d2", "decode", TINY)]
    reqs = [_req(i, prompt=500) for i in range(6)]  # a decode host holds 4 x backlog = 4 in its engine
    got, _ = _run_queued("busiest", members, "d1", reqs)
    assert sorted(got.values()) == ["d1"] * 4 + ["d2"] * 2

    def d2_full(cluster: Cluster) -> None:
        cluster.instances["d2"].load = LoadReport(role="decode", free_kv_tokens=100, total_kv_tokens=4000)

    got, _ = _run_queued("busiest", members, "d1", reqs, setup=d2_full)
    assert sorted(got.values()) == ["d1"] * 4  # no KV on d2 for a 500-token prompt


# ---- the simulator: the same policy object, at engine-iteration granularity ----------------------
@pytest.fixture(scope="module")
def h100():
    from backends.engines.simulated.profiles import get_timing

    return get_timing("h100-llama-2-7b")


def test_sim_idle_decode_host_takes_a_prompt_queued_behind_a_long_prefill(h100):
    from bench.workloads import BenchRequest
    from orchestrator.sim import simulate

    # All co-located on two decode instances, placed by request count: s2 ties and lands behind the
    # 6,000-token prompt on i0. With late binding i1 takes it at its next iteration.
    reqs = [BenchRequest("long", 0.0, 6000, 10), BenchRequest("s1", 0.001, 50, 200),
            BenchRequest("s2", 0.002, 50, 200)]  # fmt: skip
    got = {}
    for lb in ("none", "busiest"):
        res = simulate(f"tetri+pd_ratio=0:2,predictor=oracle,colocate_pick=outstanding,late_binding={lb}",
                       h100, 2, reqs)  # fmt: skip
        got[lb] = ({r["id"]: r for r in res.requests}, res.extra["steals"])
    (plain, n0), (late, n1) = got["none"], got["busiest"]
    assert n0 == 0 and n1 == 1
    assert plain["s2"]["d_inst"] == plain["long"]["d_inst"] and late["s2"]["d_inst"] != late["long"]["d_inst"]
    assert late["s2"]["ttft_s"] < plain["s2"]["ttft_s"] / 3
    assert all(r["error"] is None for r in late.values())


def test_sim_late_binding_in_a_prefill_pool_finishes_everything_once_and_is_deterministic(h100):
    from orchestrator.sim import simulate
    from tests.unit.test_sim import _requests

    reqs = _requests(400, rate=60.0)
    runs = [simulate("tetri+pd_ratio=2:2,fallback=none", h100, 4, reqs, seed=3) for _ in range(2)]
    a, b = runs
    assert a.extra["steals"] > 0 and a.extra["steals"] == b.extra["steals"]
    assert [(r["id"], r["ttft_s"], r["p_inst"]) for r in a.requests] == [
        (r["id"], r["ttft_s"], r["p_inst"]) for r in b.requests
    ]
    assert sorted(r["id"] for r in a.requests if r["error"] is None) == sorted(q.id for q in reqs)
    assert {r["p_inst"] for r in a.requests} == {0, 1}  # only the prefill pool prefills


def test_serving_moves_the_kv_reservation_with_a_stolen_colocated_request():
    """Through the request path (Server.run): a request co-located on decode host d1, whose engine
    backlog is full, is taken by idle d2; it runs on d2, d2 holds its KV reservation until the first
    token, and d1 holds none."""
    from backends.base import SamplingParams, TokenEvent
    from orchestrator.serving import Job, Server
    from tests.conftest import fake_cluster

    seen: dict[str, tuple[int, int]] = {}

    class Host:
        role = "decode"
        generates_on_decode = True

        def __init__(self, iid: str) -> None:
            self.iid = iid

        async def generate(self, request):
            d1, d2 = cluster.instances["d1"], cluster.instances["d2"]
            seen[self.iid] = (d1.reserved_kv_tokens, d2.reserved_kv_tokens)
            yield TokenEvent([7], "x", finish_reason="length")

    settings = Settings(database_url="sqlite://", model=TINY, prefill_engine_backlog=1, decode_admission="greedy")
    cluster = fake_cluster([("d1", "decode", Host("d1")), ("d2", "decode", Host("d2"))])
    d1, d2 = cluster.instances["d1"], cluster.instances["d2"]
    # d2 looks busier (prompt tokens waiting in its engine), so the request is placed on d1, whose
    # engine already holds its 4 co-located prompts: it queues there, and idle-queued d2 takes it.
    d2.load = LoadReport(role="decode", free_kv_tokens=4096, total_kv_tokens=4096, queued_prompt_tokens=900)
    d1.inflight_prefills = 4
    placement = Placement(settings, cluster, seed=0)
    server = Server(settings, cluster, placement, None, None)
    job = Job(TINY, [5, 6, 7], SamplingParams(max_tokens=1, temperature=0))

    async def run() -> list:
        return [e async for e in server.run(job)]

    events = asyncio.run(run())
    assert [t for e in events for t in e.token_ids] == [7]
    assert placement.steals == 1 and job.decode_instance == "d2" and list(seen) == ["d2"]
    assert seen["d2"][0] == 0 and seen["d2"][1] > 0  # the reservation moved to d2 before it ran
    assert d1.reserved_kv_tokens == 0 and d2.reserved_kv_tokens == 0  # released at the first token


def test_prompts_queued_at_a_dead_prefill_instance_run_co_located_on_a_decode_instance():
    """The only prefill instance dies with prompts queued behind its engine: they are not refused
    but re-placed, as new requests would be, on the decode instance with room (co-located)."""
    from backends.base import SamplingParams, TokenEvent
    from orchestrator.serving import Job, Server
    from tests.conftest import fake_cluster

    class Prefill:
        role = "prefill"
        generates_on_decode = False

    class Host:
        role = "decode"
        generates_on_decode = True
        ran: list[str] = []

        async def generate(self, request):
            Host.ran.append(request.request_id)
            yield TokenEvent([7], "x", finish_reason="length")

    settings = Settings(database_url="sqlite://", model=TINY, prefill_engine_backlog=1, colocate_backlog_tokens=0)
    cluster = fake_cluster([("p", "prefill", Prefill()), ("d", "decode", Host())])
    placement = Placement(settings, cluster, seed=0)
    server = Server(settings, cluster, placement, None, None)
    cluster.instances["p"].inflight_prefills = 1  # its engine is busy: new prompts queue in our queue
    jobs = [Job(TINY, [5, 6, 7, i], SamplingParams(max_tokens=1, temperature=0)) for i in range(4)]

    async def run() -> list[list[TokenEvent]]:
        async def one(job: Job) -> list[TokenEvent]:
            return [e async for e in server.run(job)]

        tasks = [asyncio.ensure_future(one(job)) for job in jobs]
        await asyncio.sleep(0.05)
        assert len(placement.queues["p"]) == 4  # all four wait at the prefill instance
        cluster.instances["p"].state = "unhealthy"  # what the monitor's state change does next
        placement.replace_queued(cluster.instances["p"])
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(r[-1].finish_reason == "length" for r in results)
    assert sorted(Host.ran) == sorted(j.id for j in jobs)
    assert all(j.prefill_instance == j.decode_instance == "d" for j in jobs)
