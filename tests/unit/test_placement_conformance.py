"""Conformance: the live control plane's Placement (over fake backends) and the simulator's
SimPlacement, fed the same cluster state and the same events, make the same decisions: each
arrival's route (disaggregated, HPHD or backlog co-location) and instance, which queued prompts an
engine that frees up takes (its own queue in policy order, then late-binding steals), and where
each prefilled request decodes, with the same KV reservations. A change to either driver's
decision breaks the match (checked below by changing each driver)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from backends.base import LoadReport
from backends.engines.simulated.profiles import get_timing
from bench.workloads import BenchRequest
from orchestrator.cluster import Cluster
from orchestrator.config import InstanceSpec, Settings
from orchestrator.placement import Overloaded, Placement, PrefillSlot
from orchestrator.policies.config import PolicyConfig
from orchestrator.sim.config import SystemConfig
from orchestrator.sim.loop import ClusterSim
from orchestrator.sim.state import SimRequest

CHUNK = 256
CAP = 20_000
ROLES = {"i0": "prefill", "i1": "prefill", "i2": "decode", "i3": "decode"}
POLICY = PolicyConfig(
    global_scheduler="least_loaded", prefill_policy="sjf", prefill_sched_batch=4, late_binding="busiest",
    dispatch_policy="power_of_two", decode_admission="reserve_static", predictor="oracle",
    colocate_heavy_heavy=True, colocate_backlog_tokens=900, colocate_pick="prefill_load",
)  # fmt: skip
# (id, prompt tokens, output tokens): HPHD prompts (>512 tokens, output >= 400: predicted heavy),
# light ones, and enough prompt work that the prefill pool's backlog passes 900 tokens.
REQUESTS = [
    ("r0", 300, 50), ("r1", 700, 900), ("r2", 200, 20), ("r3", 450, 60), ("r4", 120, 300),
    ("r5", 800, 100), ("r6", 350, 40), ("r7", 90, 10), ("r8", 640, 30), ("r9", 260, 700),
]  # fmt: skip
# Engines whose prefills finish, in order (each time everything in that engine).
EVENTS = ("i1", "i1", "i1", "i1", "i0", "i3", "i2")
# Decode engines' state: (free KV tokens, running decodes, heavy among them).
DECODES = {"i2": (9_000, 6, 2), "i3": (14_000, 3, 1)}


@dataclass
class Log:
    arrivals: list[tuple[str, str, str, str]] = field(default_factory=list)  # id, mode, reason, instance
    released: list[tuple[str, str]] = field(default_factory=list)  # event, sorted "rid@inst" list
    decodes: list[tuple[str, str | None]] = field(default_factory=list)
    reserved: dict[str, int] = field(default_factory=dict)


# ---- the simulator's driver ------------------------------------------------------------------------
def run_sim(mutate: Callable[[ClusterSim], None] | None = None) -> Log:
    cfg = SystemConfig("conformance", layout="disaggregated", batching="sarathi", policy=POLICY, pd_ratio="2:2")
    reqs = [BenchRequest(rid, i * 0.001, p, o) for i, (rid, p, o) in enumerate(REQUESTS)]
    sim = ClusterSim(cfg, get_timing("h100-llama-2-7b"), 4, reqs, seed=3, kv_tokens=CAP)
    sim.chunk = CHUNK
    sim.placement.chunk_tokens = CHUNK
    sim.placement.core.colocate_backlog_tokens = 900
    if mutate is not None:
        mutate(sim)
    by_id = {r.id: r for r in sim.reqs}
    busy = {}  # every engine holds one prompt of a chunk's worth: new work queues
    for inst in sim.insts:
        assert inst.id in ROLES and inst.role == ROLES[inst.id]
        inst.busy = True
        hold = SimRequest(99, f"hold-{inst.id}", 0.0, CHUNK, 1, "")
        busy[inst.id] = hold
        if inst.role == "prefill":
            inst.in_engine.append(hold)
            inst.in_engine_tokens = CHUNK
        else:
            inst.prefilling.append(hold)
            free, running, heavy = DECODES[inst.id]
            for k in range(running):
                inst.running[1000 + k] = SimRequest(1000 + k, f"run-{k}", 0.0, 1, 1, "")
            inst.running_kv = CAP - free - CHUNK
            inst.kv_staged = CHUNK
            inst.heavy_decodes = heavy
    log = Log()
    for r in sim.reqs:
        sim.now = r.arrival
        route, inst = sim.placement.route(r)
        _sim_arrive(sim, r, route, inst)
        mode = "disaggregated" if route == "prefill" else "colocated"
        reason = "" if route == "prefill" else _sim_reason(sim, r)
        log.arrivals.append((r.id, mode, reason, inst.id))

    def where(rid: str) -> str:
        return sim.insts[by_id[rid].prefill_at].id

    def in_engine() -> set[str]:
        return {r.id for r in sim.reqs if r.id not in sim.placement.queued and r.prefill_at >= 0}

    def finish(iid: str) -> None:
        """Everything in this instance's engine finishes its prefill: it takes the next prompts."""
        inst = next(i for i in sim.insts if i.id == iid)
        before = in_engine()
        if inst.role == "prefill":
            inst.in_engine.clear()
            inst.in_engine_tokens = 0
            sim.batcher.form_prefill(inst, sim.now)
        else:
            inst.prefilling.clear()
            inst.kv_staged = 0
            inst.waiting.clear()
            sim.batcher._next_waiting(inst, sim.now)
        log.released.append((iid, sorted(f"{rid}@{where(rid)}" for rid in in_engine() - before)))

    for iid in EVENTS:
        sim.now += 0.01
        finish(iid)
    sim.placement.rng.seed(7)
    for rid in ("r0", "r2", "r3", "r6", "r9"):
        sim.now += 1.0  # past the monitor interval: fresh views
        dst = sim.placement.pick_decode(by_id[rid], sim.now)
        log.decodes.append((rid, dst.id if dst is not None else None))
    log.reserved = {i.id: i.reserved_kv for i in sim.insts if i.role == "decode"}
    return log


def _sim_arrive(sim: ClusterSim, r: SimRequest, route: str, inst) -> None:
    """What the simulator's loop does with a route (ClusterSim._on_arrival after asking placement)."""
    orig = sim.placement.route
    sim.placement.route = lambda _r: (route, inst)  # type: ignore[method-assign]
    try:
        sim._on_arrival(r)
    finally:
        sim.placement.route = orig  # type: ignore[method-assign]


def _sim_reason(sim: ClusterSim, r: SimRequest) -> str:
    p = POLICY
    assert r.view is not None
    return "hphd" if r.prompt_tokens > p.heavy_prefill_threshold and r.view.heavy_decode else "backlog"


# ---- the live driver ------------------------------------------------------------------------------
class _Fake:
    generates_on_decode = True

    def __init__(self, role: str) -> None:
        self.role = role


def run_live(views_of: Callable[[Placement], None] | None = None) -> Log:
    settings = Settings(database_url="sqlite://", model="m", **POLICY.to_dict())
    cluster = Cluster()
    for iid, role in ROLES.items():
        inst = cluster.add(InstanceSpec(url=f"http://{iid}.invalid", role=role, model="m", id=iid))
        inst.backend = _Fake(role)  # type: ignore[assignment]
        inst.state = "healthy"
        if role == "prefill":
            inst.load = LoadReport(role="prefill", total_kv_tokens=CAP, free_kv_tokens=CAP, chunk_size=CHUNK,
                                   running=1, running_prompt_tokens=CHUNK)  # fmt: skip
        else:
            free, running, heavy = DECODES[iid]
            inst.load = LoadReport(role="decode", total_kv_tokens=CAP, free_kv_tokens=free, chunk_size=CHUNK,
                                   running=running + 1, running_prompt_tokens=CHUNK, heavy_decodes=heavy,
                                   light_decodes=running - heavy)  # fmt: skip
        inst.inflight_prefills, inst.inflight_prefill_tokens = 1, CHUNK  # one prompt of a chunk's worth
    placement = Placement(settings, cluster, seed=0)
    if views_of is not None:
        views_of(placement)
    # The same requests, with the simulator's views of them (oracle buckets).
    cfg = SystemConfig("conformance", layout="disaggregated", batching="sarathi", policy=POLICY, pd_ratio="2:2")
    sim = ClusterSim(cfg, get_timing("h100-llama-2-7b"), 4,
                     [BenchRequest(rid, i * 0.001, p, o) for i, (rid, p, o) in enumerate(REQUESTS)], kv_tokens=CAP)
    views = {r.id: r.view for r in sim.reqs}
    log = Log()

    async def go() -> None:
        tasks: dict[str, asyncio.Task[PrefillSlot]] = {}
        holds = {}
        for rid, _, _ in REQUESTS:
            view = views[rid]
            assert view is not None
            route = placement.route(view, "m", None, set())
            if route.mode == "disaggregated":
                inst = placement.pick_prefill(view, "prefill", "m", set())
                tasks[rid] = asyncio.ensure_future(placement.acquire_at(inst, view))
                log.arrivals.append((rid, "disaggregated", "", inst.id))
            else:
                host = cluster.instances[route.host or ""]
                holds[rid] = placement.reserve(host, view)
                tasks[rid] = asyncio.ensure_future(placement.acquire_at(host, view, None, holds[rid]))
                log.arrivals.append((rid, "colocated", route.reason, host.id))
            await asyncio.sleep(0)
        released: dict[str, PrefillSlot] = {}
        for iid in EVENTS:
            inst = cluster.instances[iid]
            fields = {**inst.load.__dict__, "running": inst.load.running - 1, "running_prompt_tokens": 0}
            inst.load = LoadReport(**fields)  # its held prompt is done too
            if inst.inflight_prefills and not any(sl.instance is inst for sl in released.values()):
                placement._slot_done(inst, CHUNK)  # the prompt every engine held at the start
            for slot in [sl for sl in released.values() if sl.instance is inst and not sl.released]:
                slot.release()
            await asyncio.sleep(0)
            new = {rid: t.result() for rid, t in tasks.items() if t.done() and rid not in released}
            released.update(new)
            log.released.append((iid, sorted(f"{rid}@{slot.instance.id}" for rid, slot in new.items())))
        for hold in holds.values():
            hold.release()  # co-located holds end at their first token; only dispatch is compared below
        placement.rng.seed(7)
        for rid in ("r0", "r2", "r3", "r6", "r9"):
            try:
                inst, _ = await placement.acquire_decode(views[rid], "m", 0.0)
                log.decodes.append((rid, inst.id))
            except Overloaded:
                log.decodes.append((rid, None))
        log.reserved = {iid: cluster.instances[iid].reserved_kv_tokens for iid in ("i2", "i3")}
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    asyncio.run(go())
    return log


def test_live_and_simulated_placement_decide_alike():
    live, sim = run_live(), run_sim()
    assert live.arrivals == sim.arrivals
    # The scenario exercises every decision: both routes and both co-location reasons, queues on
    # both prefill instances, releases in policy order, a steal and dispatches with reservations.
    modes = {(m, why) for _, m, why, _ in live.arrivals}
    assert modes == {("disaggregated", ""), ("colocated", "hphd"), ("colocated", "backlog")}
    assert live.released == sim.released and any(r for _, r in live.released)
    stolen = [rid for iid, got in live.released for rid in got if rid.endswith(f"@{iid}")]
    assert any(rid.split("@")[0] in {a[0] for a in live.arrivals if a[3] != "i1"} for rid in stolen if "@i1" in rid)
    assert live.decodes == sim.decodes and any(d for _, d in live.decodes)
    assert live.reserved == sim.reserved and any(live.reserved.values())


def test_a_changed_simulator_decision_breaks_the_match():
    def no_queue_in_views(sim: ClusterSim) -> None:
        unfolded = sim.placement.prefill_view  # the driver no longer counts its queues in the views
        sim.placement.prefill_view = lambda inst: replace(unfolded(inst), queued_prompt_tokens=0)  # type: ignore[method-assign]

    assert run_sim(no_queue_in_views).arrivals != run_live().arrivals


def test_a_changed_live_decision_breaks_the_match():
    def no_queue_in_views(placement: Placement) -> None:
        placement.queues = _Unfolded()  # the driver no longer folds its queues into the views

    live, sim = run_live(no_queue_in_views), run_sim()
    assert (live.arrivals, live.released) != (sim.arrivals, sim.released)


class _Unfolded(dict):
    """A queue table whose lookups for views find nothing (queues still work for enqueueing)."""

    def get(self, key, default=None):  # type: ignore[override]
        return default
