"""Discrete-event simulator of a serving cluster, driven by the live orchestrator's policy objects.

Every instance runs an engine scheduler whose forward passes take the time of a calibrated
``TimingModel`` (backends/sim/timing.py). The cluster-level decisions are made by the very objects the
live control plane uses (``orchestrator/policies``): the global scheduler (``LeastLoadedPrefill``), one
``PrefillQueue`` per prefill instance, the decode ``Dispatcher``, ``DecodeAdmission`` and the
``FlipPolicy``. They see ``InstanceView``/``RequestView`` snapshots built the way the live cluster
monitor builds them (decode loads refreshed every ``monitor_interval_s``, plus the reservations the
control plane made since).

Systems (``SYSTEMS``):

* ``colocated-vllm``: every instance prefills and decodes; vLLM-v0 style local scheduling:
  prefill-first whole prompts (≤ ``max_batched_tokens`` per pass, decodes stall meanwhile), greedy KV
  admission with a 1% watermark, preemption by recompute (newest first), ``max_num_seqs`` = 256.
* ``colocated-sarathi``: Sarathi-Serve stall-free batching: running decodes first, then partial
  prefills, then new prompts, within a token budget (= the profile's prefill knee).
* ``disagg-simple``: prefill/decode instances; least-loaded prefill instance, FCFS, whole chunks at the
  knee, least-loaded decode instance, greedy admission, no length prediction.
* ``tetri``: TetriInfer: chunked prefill at the knee, SJF prefill queue (PrefillSchedBatch 16), length
  predictor (oracle or noisy with the paper's 74.9% bucket accuracy), power-of-two dispatch balancing
  heavy/light decodes, reserve-dynamic admission, idle flip, and a co-located fallback: requests with
  a heavy prefill *and* a predicted heavy decode are prefilled on their decode instance in stall-free
  hybrid batches (no KV transfer, no prefill-instance time), where disaggregation cannot pay; and
  so is any prompt that the prefill pool would hold back longer than ``fallback_wait_s`` (30 ms)
  while a decode instance has room ("adaptive": conditional disaggregation, as NVIDIA Dynamo does).
  Co-located prompts go to the decode instance with the least prefill load (the global scheduler's
  rule) and wait there in a ``PrefillQueue`` of the same policy (SJF), as in the live placement.
  Late binding: an instance with room and nothing queued takes the next prompt queued for its
  busiest peer of the same pool (prefill or decode), as the live placement does.
  The split, "no prefill pool" (P = 0, every request co-located) included, is chosen by simulating
  the candidates on a resample of the traffic (``planner.plan_layout``): disaggregation is kept where
  it pays and dropped where the pools it creates could not keep up.

Fast bookkeeping: a decode batch is never iterated per token. Each instance keeps a step counter,
the running KV sum and a heap of finish steps, so an iteration costs O(log n) in the batch size.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from backends.sim.planner import LayoutChoice, plan_layout, plan_split
from backends.sim.timing import TimingModel
from orchestrator.policies.predictors import bucket_of
from orchestrator.policies.prefill_queue import PrefillQueue
from orchestrator.policies.types import InstanceView, RequestView

_ARR, _END, _XFER, _TICK, _FLIP = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
@dataclass
class SystemConfig:
    name: str
    layout: str = "colocated"  # colocated | disaggregated
    batching: str = "vllm"  # co-located local scheduler: vllm | sarathi
    chunk_size: int | None = None  # None: the timing model's prefill knee
    max_num_seqs: int = 256
    max_batched_tokens: int = 4096  # vLLM whole-prompt batches
    watermark: float = 0.01
    prefill_policy: str = "fcfs"
    prefill_sched_batch: int = 16
    dispatch_policy: str = "least_loaded"
    power_of_d: int = 2
    admission: str = "greedy"
    flip_policy: str = "none"
    flip_idle_s: float = 60.0
    flip_cost_s: float = 0.006
    predictor: str = "none"  # none | oracle | noisy
    predictor_accuracy: float = 0.749
    granularity: int = 200
    heavy_decode_threshold: int = 128
    heavy_prefill_threshold: int = 512
    # none | hphd | adaptive (hphd + co-locate while the prefill pool is backlogged) | backlog (the
    # backlog rule only: HPHD is disaggregated like the rest, and the layout planner decides whether
    # there is a prefill pool at all) | all
    fallback: str = "none"
    # Which instance a co-located request goes to: "outstanding" (fewest requests: a plain load
    # balancer, as in front of vLLM) or "prefill_load" (fewest prompt tokens waiting or prefilling,
    # then fewest requests: the global scheduler's least-loaded rule, applied to co-located hosts)
    colocate_pick: str = "outstanding"
    # Late binding (orchestrator/policies/late_binding.py): an instance with room and nothing queued
    # takes the next prompt queued for its busiest peer of the same pool: none | busiest
    late_binding: str = "none"
    fallback_wait_s: float = 0.1  # adaptive: co-locate when the prefill queue would delay a prompt longer
    pd_ratio: str = "auto"  # auto (planned: layout_plan) | "P:D"
    layout_plan: str = "work_share"  # work_share (analytic) | simulated (candidates simulated: planner.py)
    plan_objective: str = "balanced"  # simulated plan: balanced (TTFT x JCT) | ttft | jct | slo
    plan_ttft_slo_ms: float = 200.0  # slo: the p99 TTFT a layout must meet; the least mean JCT among those
    # slo, in full: a layout meets it when plan_slo_share of its requests meet both plan_ttft_slo_ms and
    # plan_tpot_slo_ms (planner.slo_attainment, what `tetri bench goodput` measures); the defaults (TPOT
    # unbounded, 99%) are the p99 TTFT rule
    plan_tpot_slo_ms: float = float("inf")
    plan_slo_share: float = 0.99
    # simulated plan: "fixed" (every candidate runs the system's late_binding) or "choose" (each split is
    # simulated with it and without it, and the best by the objective is kept, late binding included)
    plan_late_binding: str = "fixed"
    # simulated plan: the resample of the traffic spans plan_horizon_s at the workload's rate, within bounds
    plan_horizon_s: float = 60.0
    plan_min_requests: int = 1000
    plan_max_requests: int = 16000
    # When a disaggregated request's first token reaches the client: "prefill" (sampled on the prefill
    # instance: the paper's TTFT) or "handoff" (after the KV transfer: the live native path, SGLang, Dynamo)
    ttft_at: str = "prefill"
    monitor_interval_s: float = 0.1
    retry_interval_s: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SYSTEMS: dict[str, SystemConfig] = {
    "colocated-vllm": SystemConfig("colocated-vllm", layout="colocated", batching="vllm"),
    "colocated-sarathi": SystemConfig("colocated-sarathi", layout="colocated", batching="sarathi"),
    "disagg-simple": SystemConfig(
        "disagg-simple",
        layout="disaggregated",
        prefill_policy="fcfs",
        dispatch_policy="least_loaded",
        admission="greedy",
        predictor="none",
    ),
    "tetri": SystemConfig(
        "tetri",
        layout="disaggregated",
        prefill_policy="sjf",
        dispatch_policy="power_of_two",
        admission="reserve_dynamic",
        flip_policy="idle",
        flip_idle_s=60.0,
        predictor="noisy",
        # Conditional disaggregation: HPHD, and any prompt the prefill pool would hold back > 30 ms
        # while a decode instance has room, runs co-located on a decode instance (docs/reproduction.md).
        fallback="adaptive",
        fallback_wait_s=0.03,
        # The split, no prefill pool included, chosen by simulating the candidates (planner.py).
        layout_plan="simulated",
        colocate_pick="prefill_load",
        # A queued prompt is not bound until its engine starts it: an idle peer takes it first.
        late_binding="busiest",
    ),
}


def system_config(name: str, **overrides: Any) -> SystemConfig:
    """A standard system by name, or ``base+key=value,key=value`` (e.g. ``tetri+predictor=oracle``)."""
    base, _, opts = name.partition("+")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}; known: {', '.join(SYSTEMS)}")
    cfg = replace(SYSTEMS[base], name=name)
    kv: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        k = k.strip().replace("-", "_")
        if not hasattr(cfg, k):
            raise ValueError(f"unknown system option {k!r}")
        cur = getattr(cfg, k)
        kv[k] = type(cur)(v) if cur is not None and not isinstance(cur, bool) else _auto(v)
    kv.update(overrides)
    return check_config(replace(cfg, **kv))


def check_config(cfg: SystemConfig) -> SystemConfig:
    """``cfg``, once every option with a fixed set of values has one of them (ValueError naming the
    option otherwise), so that a bad one is named before anything runs."""
    for key, allowed in _choices().items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, not {getattr(cfg, key)!r}")
    return cfg


def _choices() -> dict[str, tuple[str, ...]]:
    from backends.sim.planner import OBJECTIVES
    from orchestrator.policies import POLICY_NAMES
    from orchestrator.policies.flip import FLIP_POLICY_NAMES

    return {
        "layout": ("colocated", "disaggregated"), "batching": ("vllm", "sarathi"),
        "prefill_policy": POLICY_NAMES["prefill_policy"], "dispatch_policy": POLICY_NAMES["dispatch_policy"],
        "admission": POLICY_NAMES["decode_admission"], "flip_policy": FLIP_POLICY_NAMES,
        "predictor": ("none", "oracle", "noisy"), "fallback": ("none", "hphd", "adaptive", "backlog", "all"),
        "colocate_pick": ("outstanding", "prefill_load"), "late_binding": POLICY_NAMES["late_binding"],
        "layout_plan": ("work_share", "simulated"), "plan_objective": OBJECTIVES, "ttft_at": ("prefill", "handoff"),
        "plan_late_binding": ("fixed", "choose"),
    }  # fmt: skip


def _auto(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


# ---------------------------------------------------------------------------------------------------
# policy objects (the live orchestrator's)
# ---------------------------------------------------------------------------------------------------
class _Policies:
    def __init__(self, cfg: SystemConfig) -> None:
        from orchestrator.policies.admission import make_admission
        from orchestrator.policies.dispatch import make_dispatcher
        from orchestrator.policies.flip import make_flip_policy
        from orchestrator.policies.global_scheduler import make_global_scheduler
        from orchestrator.policies.late_binding import make_late_binding
        from orchestrator.policies.prefill_queue import make_prefill_queue

        self.global_scheduler = make_global_scheduler("least_loaded")
        self.dispatcher = make_dispatcher(
            cfg.dispatch_policy, power_of_d=cfg.power_of_d, heavy_decode_threshold=cfg.heavy_decode_threshold
        )
        self.admission = make_admission(cfg.admission)
        self.flip = (
            make_flip_policy(cfg.flip_policy, idle_s=cfg.flip_idle_s, min_per_role=1)
            if cfg.flip_policy != "none"
            else None
        )
        self.late_binding = make_late_binding(cfg.late_binding)
        self._mkq = lambda: make_prefill_queue(cfg.prefill_policy, sched_batch=cfg.prefill_sched_batch)

    def new_queue(self):
        return self._mkq()


# ---------------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------------
class Req:
    __slots__ = (
        "idx", "id", "arrival", "prompt", "output", "cls", "view", "pred_lo", "heavy", "eff", "done",
        "gen", "gen0", "kvb", "s0", "epoch", "t_first", "t_finish", "t_dispatch", "t_decode",
        "p_inst", "d_inst", "preempt", "colocated", "need", "failed",
    )  # fmt: skip

    def __init__(self, idx: int, rid: str, arrival: float, prompt: int, output: int, cls: str) -> None:
        self.idx = idx
        self.id = rid
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.cls = cls
        self.view: RequestView | None = None
        self.pred_lo = 0
        self.heavy = False
        self.eff = prompt  # tokens to prefill (prompt, or prompt+generated after a recompute)
        self.done = 0
        self.gen = 0
        self.gen0 = 0
        self.kvb = 0
        self.s0 = 0
        self.epoch = 0
        self.t_first = -1.0
        self.t_finish = -1.0
        self.t_dispatch = -1.0
        self.t_decode = -1.0
        self.p_inst = -1
        self.d_inst = -1
        self.preempt = 0
        self.colocated = False
        self.need = 0
        self.failed = False


class Inst:
    __slots__ = (
        "i", "id", "role", "cap", "busy", "cur", "step", "run_kv", "kv_other", "running", "heap",
        "waiting", "prefilling", "incoming", "queue", "engine", "eng_tokens", "held", "link_free",
        "n_heavy", "inflight_res", "draining", "to_role", "busy_s", "last_busy_end", "iters",
        "pending_prompt", "view_cache", "hseq", "flips", "kheap", "cq",
    )  # fmt: skip

    def __init__(self, i: int, role: str, cap: int) -> None:
        self.i = i
        self.id = f"{role[0]}{i}"
        self.role = role
        self.cap = cap
        self.busy = False
        self.cur: tuple[list, int] | None = None
        self.step = 0
        self.run_kv = 0
        self.kv_other = 0
        self.running: dict[int, Req] = {}
        self.heap: list[tuple[int, int, int, Req]] = []
        self.waiting: deque[Req] = deque()  # need a (re)prefill here (co-located, fallback, recompute)
        # decode role: co-located prompts not yet taken into `waiting`, in the prefill policy's order
        self.cq = None
        self.prefilling: list[Req] = []  # admitted, partially prefilled (chunked)
        self.incoming: deque[Req] = deque()  # KV arrived (decode role), joins at the next pass
        self.queue = None  # PrefillQueue (prefill role)
        self.engine: list[Req] = []  # prefill role: released by the queue, in scheduler order
        self.eng_tokens = 0
        self.held: deque[Req] = deque()  # prefilled, waiting for a decode instance
        self.link_free = 0.0
        self.n_heavy = 0
        self.inflight_res = 0
        self.draining = False
        self.to_role: str | None = None
        self.busy_s = 0.0
        self.last_busy_end = 0.0
        self.iters = 0
        self.pending_prompt = 0  # queued prompt tokens (co-located / prefill queue)
        self.view_cache: InstanceView | None = None
        self.hseq = 0
        self.flips = 0
        # (predicted_lo - gen0 + s0, seq, epoch, req) of running decodes: remaining = key - step
        self.kheap: list[tuple[int, int, int, Req]] = []

    @property
    def kv_used(self) -> int:
        return self.run_kv + self.kv_other

    def has_work(self) -> bool:
        return bool(
            self.running or self.waiting or self.prefilling or self.incoming or self.engine
            or (self.queue is not None and len(self.queue)) or (self.cq is not None and len(self.cq))
        )  # fmt: skip

    @property
    def n_waiting(self) -> int:
        return len(self.waiting) + (len(self.cq) if self.cq is not None else 0)


@dataclass
class SimResult:
    system: str
    config: dict[str, Any]
    timing: dict[str, Any]
    instances: int
    split: dict[str, int]
    requests: list[dict[str, Any]]
    makespan_s: float
    busy_instance_s: float
    wall_s: float
    events: int
    flips: int
    preemptions: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# the simulator
# ---------------------------------------------------------------------------------------------------
class ClusterSim:
    def __init__(
        self,
        cfg: SystemConfig,
        timing: TimingModel,
        instances: int,
        requests: Sequence[Any],
        seed: int = 0,
        kv_tokens: int | None = None,
        exact_views: bool = False,
    ) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.plan: LayoutChoice | None = None
        # Views carry decode_remaining as its minimum only (all reserve_dynamic reads, with `running`
        # for the count) unless exact_views: the full per-request tuple, O(batch) per view.
        self.exact_views = exact_views
        self._need_remaining = cfg.admission != "greedy"
        self.tm = timing
        self.n = instances
        self.seed = seed
        self.rng = random.Random(seed)
        self.prng = random.Random(seed + 7919)
        self.cap = kv_tokens or timing.total_kv_tokens
        self.chunk = cfg.chunk_size or timing.knee()
        self._tput = self.chunk / timing.prefill_s(self.chunk)  # prefill tokens/s at the knee
        self.reqs: list[Req] = []
        for k, r in enumerate(sorted(requests, key=lambda x: x.arrival)):
            q = Req(k, str(getattr(r, "id", k)), float(r.arrival), int(r.prompt_tokens), int(r.output_tokens),
                    str(getattr(r, "cls", "")))  # fmt: skip
            self.reqs.append(q)
        self._predict()
        self.pol = _Policies(cfg)
        disagg = cfg.layout == "disaggregated"
        mask = [self._wants_colocated(r) for r in self.reqs] if cfg.fallback != "none" else None
        if disagg:
            span = self.reqs[-1].arrival - self.reqs[0].arrival if self.reqs else 0.0
            rate = (len(self.reqs) - 1) / span if span > 0 else None
            prompts, outputs = [r.prompt for r in self.reqs], [r.output for r in self.reqs]
            p, d = plan_split(instances, prompts, outputs, timing, self.chunk, cfg, mask, rate=rate)
            if cfg.pd_ratio == "auto" and cfg.layout_plan == "simulated" and rate and instances > 1:
                self.plan = plan_layout(instances, prompts, outputs, timing, cfg, p, rate, seed=seed,
                                        colocated_mask=mask)
                p, d = self.plan.prefill, self.plan.decode
                if self.plan.late_binding not in (None, cfg.late_binding):  # the planner chose it too
                    self.cfg = cfg = replace(cfg, late_binding=self.plan.late_binding)
                    self.pol = _Policies(cfg)
        else:
            p, d = 0, instances
        self.split = {"prefill": p, "decode": d} if disagg else {"colocated": instances}
        self.insts: list[Inst] = []
        for i in range(instances):
            role = "colocated" if not disagg else ("prefill" if i < p else "decode")
            inst = Inst(i, role, self.cap)
            inst.id = f"i{i}"
            if role == "prefill":
                inst.queue = self.pol.new_queue()
            self.insts.append(inst)
        self.ev: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.unfinished = len(self.reqs)
        self.events = 0
        self.preemptions = 0
        self.steals = 0  # late binding: prompts taken from a peer's queue
        self.flips = 0
        self._views_at = -1.0
        self._dviews: dict[str, InstanceView] = {}
        self._tick_n = 0
        self.flip_log: list[dict[str, Any]] = []
        self._qreq: dict[str, Req] = {}

    # ---- setup ------------------------------------------------------------------------------------
    def _predict(self) -> None:
        cfg = self.cfg
        g = cfg.granularity
        for r in self.reqs:
            bucket: int | None
            if cfg.predictor == "none":
                bucket = None
            else:
                true_b = bucket_of(r.output, g)  # what the oracle predictor answers
                bucket = true_b
                if cfg.predictor == "noisy" and self.prng.random() >= cfg.predictor_accuracy:
                    # a miss lands on a neighbouring bucket (the classifier's usual error)
                    bucket = true_b + 1 if true_b == 0 or self.prng.random() < 0.5 else true_b - 1
            r.view = RequestView(
                id=r.id,
                arrival=r.arrival,
                prompt_tokens=r.prompt,
                max_tokens=r.output,
                predicted_bucket=bucket,
                granularity=g,
                heavy_decode_threshold=cfg.heavy_decode_threshold,
            )
            r.pred_lo = r.view.predicted_output_lo
            r.heavy = r.view.heavy_decode
            r.need = r.view.kv_need

    def _wants_colocated(self, r: Req) -> bool:
        cfg = self.cfg
        if cfg.layout != "disaggregated" or cfg.fallback == "none":
            return False
        if cfg.fallback in ("hphd", "adaptive"):
            return r.prompt > cfg.heavy_prefill_threshold and r.heavy
        if cfg.fallback == "backlog":
            return False
        if cfg.fallback == "all":
            return True
        raise ValueError(f"unknown fallback {cfg.fallback!r}")

    # ---- event plumbing ---------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: Any) -> None:
        self.seq += 1
        heapq.heappush(self.ev, (t, self.seq, kind, obj))

    def run(self, until: float | None = None) -> SimResult:
        wall = time.perf_counter()
        for r in self.reqs:
            if r.prompt + r.output > self.cap or r.prompt <= 0 or r.output <= 0:
                r.failed = True
                self.unfinished -= 1
                continue
            self._push(r.arrival, _ARR, r)
        if self.cfg.layout == "disaggregated":
            self._push(0.0, _TICK, None)
        ev = self.ev
        pop = heapq.heappop
        while ev:
            t, _, kind, obj = pop(ev)
            if until is not None and t > until:
                break
            self.now = t
            self.events += 1
            if kind == _END:
                self._on_end(obj)
            elif kind == _ARR:
                self._on_arrival(obj)
            elif kind == _XFER:
                self._on_xfer(obj)
            elif kind == _TICK:
                self._on_tick()
            elif kind == _FLIP:
                self._on_flip_done(obj)
        makespan = max((r.t_finish for r in self.reqs if r.t_finish >= 0), default=0.0)
        return SimResult(
            system=self.cfg.name,
            config=self.cfg.to_dict() | {"chunk_size": self.chunk, "kv_tokens_per_instance": self.cap},
            timing=self.tm.describe(),
            instances=self.n,
            split=self.split,
            requests=[self._record(r) for r in self.reqs],
            makespan_s=makespan,
            busy_instance_s=sum(i.busy_s for i in self.insts),
            wall_s=time.perf_counter() - wall,
            events=self.events,
            flips=self.flips,
            preemptions=self.preemptions,
            extra={
                "flip_log": self.flip_log,
                "steals": self.steals,
                "final_roles": [i.role for i in self.insts],
                "plan": self.plan.to_dict() if self.plan is not None else None,
            },
        )

    @staticmethod
    def _record(r: Req) -> dict[str, Any]:
        ok = r.t_finish >= 0 and not r.failed
        return {
            "id": r.id,
            "cls": r.cls,
            "arrival": r.arrival,
            "prompt_tokens": r.prompt,
            "output_tokens": r.output,
            "ttft_s": (r.t_first - r.arrival) if r.t_first >= 0 else None,
            "jct_s": (r.t_finish - r.arrival) if ok else None,
            "tpot_s": ((r.t_finish - r.t_first) / (r.output - 1)) if ok and r.output > 1 else None,
            "finish": r.t_finish if ok else None,
            "error": None if ok else "not finished",
            "preemptions": r.preempt,
            "colocated": r.colocated,
            "predicted_lo": r.pred_lo,
            "p_inst": r.p_inst,
            "d_inst": r.d_inst,
            "decode_wait_s": (r.t_decode - r.t_first) if r.t_decode >= 0 and r.t_first >= 0 else None,
        }

    # ---- views ------------------------------------------------------------------------------------
    def _gen(self, inst: Inst, r: Req) -> int:
        return r.gen0 + inst.step - r.s0

    def _decode_view(self, inst: Inst) -> InstanceView:
        step = inst.step
        rem: tuple[int, ...] = ()
        if self._need_remaining and inst.running:
            if self.exact_views:
                rem = tuple(max(0, r.pred_lo - (r.gen0 + step - r.s0)) for r in inst.running.values())
            else:
                kh = inst.kheap
                running = inst.running
                while kh and (kh[0][2] != kh[0][3].epoch or kh[0][3].idx not in running):
                    heapq.heappop(kh)
                if kh:
                    rem = (max(0, kh[0][0] - step),)
        nrun = len(inst.running)
        return InstanceView(
            id=inst.id,
            role=inst.role,  # type: ignore[arg-type]
            total_kv_tokens=inst.cap,
            free_kv_tokens=max(0, inst.cap - inst.kv_used),
            healthy=True,
            accepting=not inst.draining,
            queued_prompt_tokens=inst.pending_prompt,
            running_prompt_tokens=sum(r.eff - r.done for r in inst.prefilling),
            running=nrun,
            queued=inst.n_waiting + len(inst.incoming),
            heavy_decodes=inst.n_heavy,
            light_decodes=nrun - inst.n_heavy,
            decode_remaining=rem,
            reserved_kv_tokens=inst.inflight_res,
        )

    def _prefill_view(self, inst: Inst) -> InstanceView:
        return InstanceView(
            id=inst.id,
            role=inst.role,  # type: ignore[arg-type]
            total_kv_tokens=inst.cap,
            free_kv_tokens=max(0, inst.cap - inst.kv_used),
            healthy=True,
            accepting=not inst.draining,
            queued_prompt_tokens=inst.pending_prompt,
            running_prompt_tokens=inst.eng_tokens,
            running=len(inst.engine),
            queued=len(inst.queue) if inst.queue is not None else inst.n_waiting,
        )

    def _decode_views(self) -> dict[str, InstanceView]:
        """The cluster monitor's broadcast: refreshed every monitor interval."""
        if self.now - self._views_at >= self.cfg.monitor_interval_s or not self._dviews:
            self._views_at = self.now
            self._dviews = {i.id: self._decode_view(i) for i in self.insts if i.role == "decode"}
        return self._dviews

    # ---- arrivals and level-1 placement -----------------------------------------------------------
    def _on_arrival(self, r: Req) -> None:
        cfg = self.cfg
        if cfg.layout == "colocated":
            best = self._pick_colocated(self.insts)
            assert best is not None
            r.p_inst = r.d_inst = best.i
            best.waiting.append(r)
            best.pending_prompt += r.eff
            self._kick(best)
            return
        prefills = [i for i in self.insts if i.role == "prefill" and not i.draining]
        if not prefills:
            prefills = [i for i in self.insts if i.role == "prefill"]
        backlog_rule = cfg.fallback in ("adaptive", "backlog")
        backlogged = backlog_rule and bool(prefills) and self._prefill_backlogged(prefills, r)
        if not prefills or self._wants_colocated(r) or backlogged:
            # Co-located fallback: prefill and decode on one decode instance (stall-free hybrid
            # batches, no KV transfer), placed like the co-located baselines: least outstanding.
            inst = self._pick_colocated([i for i in self.insts if i.role == "decode" and not i.draining])
            if inst is None and not prefills:
                inst = self._pick_colocated([i for i in self.insts if i.role == "decode"])
            if inst is not None:
                r.colocated = True
                r.p_inst = r.d_inst = inst.i
                if inst.cq is None:
                    inst.cq = self.pol.new_queue()
                inst.cq.push(r.view, self.now)  # SJF for tetri: the prefill pool's policy, here too
                self._qreq[r.id] = r
                inst.pending_prompt += r.eff
                self._kick(inst)
                self._wake_thieves(inst)
                return
        views = [self._prefill_view(i) for i in prefills]
        pick = self.pol.global_scheduler.pick(views, r.view)
        inst = self.insts[int(pick[1:])] if pick is not None else prefills[0]
        r.p_inst = inst.i
        inst.queue.push(r.view, self.now)
        inst.pending_prompt += r.prompt
        self._qreq[r.id] = r
        self._kick(inst)
        self._wake_thieves(inst)

    def _prefill_backlogged(self, prefills: Sequence[Inst], r: Req) -> bool:
        """Adaptive fallback: the least-loaded prefill instance would start this prompt only after
        `fallback_wait_s` (its queued + in-engine prompt tokens at the knee's tokens/s), while a
        decode instance has room for it now."""
        backlog = min(i.pending_prompt + i.eng_tokens for i in prefills)
        if backlog / self._tput < self.cfg.fallback_wait_s:
            return False
        for i in self.insts:
            if i.role != "decode" or i.draining or i.n_waiting or i.incoming:
                continue
            used = i.kv_used + i.inflight_res + r.need
            if used <= 0.8 * i.cap:  # the decode side has memory and no queue of its own
                return True
        return False

    def _pick_colocated(self, insts: Sequence[Inst]) -> Inst | None:
        if self.cfg.colocate_pick == "prefill_load":
            def load(i: Inst) -> tuple[int, int, int]:
                prompt = i.pending_prompt + sum(q.eff - q.done for q in i.prefilling)
                return prompt, len(i.running) + i.n_waiting + len(i.incoming), i.i

            return min(insts, key=load, default=None)
        return self._least_outstanding(insts)

    @staticmethod
    def _least_outstanding(insts: Sequence[Inst]) -> Inst | None:
        """Co-located placement (a plain load balancer): fewest outstanding requests, then index."""
        best = None
        best_load = 0
        for inst in insts:
            load = len(inst.running) + inst.n_waiting + len(inst.prefilling) + len(inst.incoming)
            if best is None or load < best_load:
                best, best_load = inst, load
        return best

    # ---- iteration formation ----------------------------------------------------------------------
    def _kick(self, inst: Inst) -> None:
        if inst.busy:
            return
        role = inst.role
        if role == "prefill":
            batch = self._form_prefill(inst)
        elif role == "colocated" and self.cfg.batching == "vllm":
            batch = self._form_vllm(inst)
        else:
            batch = self._form_hybrid(inst)
        if batch is None:
            if (
                inst.to_role is not None and not inst.has_work() and not inst.held
                and inst.kv_other == 0 and inst.inflight_res == 0
            ):  # fmt: skip
                self._push(self.now + self.cfg.flip_cost_s, _FLIP, inst)
                inst.busy = True
            return
        pf, ndec, ctx = batch
        ptok = 0
        units = 0.0
        for r, c in pf:
            ptok += c
            units += c * c + 2.0 * c * r.done
        dt = self.tm.iter_s(ptok, units, len(pf), ndec, ctx)
        inst.busy = True
        inst.cur = (pf, ndec)
        inst.busy_s += dt
        inst.iters += 1
        self._push(self.now + dt, _END, inst)

    def _preempt_for(self, inst: Inst, extra: int) -> None:
        """Free KV (newest running first, recompute later) until `extra` new tokens fit."""
        while inst.running and inst.run_kv + inst.kv_other + extra > inst.cap:
            rid = next(reversed(inst.running))
            r = inst.running.pop(rid)
            gen = r.gen0 + inst.step - r.s0
            inst.run_kv -= r.kvb + inst.step - r.s0
            if r.heavy:
                inst.n_heavy -= 1
            r.epoch += 1
            r.gen = gen
            r.eff = r.prompt + gen
            r.done = 0
            r.preempt += 1
            self.preemptions += 1
            inst.waiting.appendleft(r)
            inst.pending_prompt += r.eff
            extra -= 1

    def _form_vllm(self, inst: Inst):
        cfg = self.cfg
        if inst.waiting:
            budget = cfg.max_batched_tokens
            limit = inst.cap * (1.0 - cfg.watermark)
            pf = []
            nseq = len(inst.running)
            while inst.waiting and nseq < cfg.max_num_seqs:
                r = inst.waiting[0]
                if r.eff > budget or inst.run_kv + inst.kv_other + r.eff > limit:
                    break
                inst.waiting.popleft()
                inst.pending_prompt -= r.eff
                inst.kv_other += r.eff
                budget -= r.eff
                nseq += 1
                inst.prefilling.append(r)
                pf.append((r, r.eff))
            if pf:
                return pf, 0, 0
        if not inst.running:
            return None
        self._preempt_for(inst, len(inst.running))
        if not inst.running:
            return self._form_vllm(inst) if inst.waiting else None
        return [], len(inst.running), inst.run_kv

    def _form_hybrid(self, inst: Inst):
        """Stall-free batching (Sarathi): decodes, then partial prefills, then new prompts, all within
        the token budget. Decode instances use it for incoming KV, fallbacks and recomputes."""
        cfg = self.cfg
        while inst.incoming and len(inst.running) < cfg.max_num_seqs:
            self._join(inst, inst.incoming.popleft())
        nrun = len(inst.running)
        if nrun:
            self._preempt_for(inst, nrun)
            nrun = len(inst.running)
        budget = self.chunk - nrun
        pf = []
        for r in inst.prefilling:
            if budget <= 0:
                break
            c = min(r.eff - r.done, budget)
            pf.append((r, c))
            budget -= c
        gate = inst.role == "decode"
        while budget > 0 and self._next_waiting(inst) and nrun + len(inst.prefilling) < cfg.max_num_seqs:
            r = inst.waiting[0]
            if inst.run_kv + inst.kv_other + r.eff + nrun > inst.cap:
                break
            if gate and r.preempt == 0 and not self.pol.admission.admits(self._decode_view(inst), r.view):
                break  # a co-located fallback passes the same decode admission as a dispatched request
            inst.waiting.popleft()
            inst.pending_prompt -= r.eff
            inst.kv_other += r.eff
            inst.prefilling.append(r)
            c = min(r.eff, budget)
            pf.append((r, c))
            budget -= c
        if not pf and not nrun:
            return None
        return pf, nrun, inst.run_kv

    def _next_waiting(self, inst: Inst) -> bool:
        """Recomputes first (in `waiting`), then co-located prompts released by the instance's queue,
        then (late binding) the next co-located prompt queued for the busiest peer, if it fits here."""
        if not inst.waiting:
            if inst.cq is not None and len(inst.cq):
                for v in inst.cq.pop_ready(self.now, 0, 1):
                    inst.waiting.append(self._qreq.pop(v.id))
            elif inst.role == "decode" and not inst.draining:
                self._steal_colocated(inst)
        return bool(inst.waiting)

    # ---- late binding -----------------------------------------------------------------------------
    def _victim(self, thief: Inst, queue_of: Callable[[Inst], PrefillQueue | None]) -> Inst | None:
        """The peer of the thief's pool whose queue (`queue_of`) it takes from, by the policy."""
        if self.cfg.late_binding == "none":
            return None
        queued: dict[str, int] = {}
        for j in self.insts:
            q = queue_of(j) if j.role == thief.role else None
            if q is not None and len(q):
                queued[j.id] = q.queued_prompt_tokens
        pick = self.pol.late_binding.victim(thief.id, queued) if queued else None
        return self.insts[int(pick[1:])] if pick is not None else None

    def _steal_colocated(self, inst: Inst) -> None:
        victim = self._victim(inst, lambda j: j.cq)
        if victim is None:
            return
        r = self._qreq[victim.cq.peek().id]
        nrun = len(inst.running)
        if inst.run_kv + inst.kv_other + r.eff + nrun > inst.cap:
            return
        if r.preempt == 0 and not self.pol.admission.admits(self._decode_view(inst), r.view):
            return
        victim.cq.pop_ready(self.now, 0, 1)
        del self._qreq[r.id]
        victim.pending_prompt -= r.eff
        inst.pending_prompt += r.eff
        r.p_inst = r.d_inst = inst.i
        inst.waiting.append(r)
        self.steals += 1

    def _steal_prefill(self, inst: Inst) -> None:
        victim = self._victim(inst, lambda j: j.queue)
        if victim is None:
            return
        (v,) = victim.queue.pop_ready(self.now, 0, 1)
        r = self._qreq.pop(v.id)
        victim.pending_prompt -= r.prompt
        r.p_inst = inst.i
        inst.engine.append(r)
        inst.eng_tokens += r.eff
        self.steals += 1

    def _wake_thieves(self, inst: Inst) -> None:
        """A prompt queued behind a busy instance: idle peers of its pool may take it now."""
        if self.cfg.late_binding == "none" or not inst.busy:
            return
        for j in self.insts:
            if j is not inst and j.role == inst.role and not j.busy and not j.draining:
                self._kick(j)

    def _form_prefill(self, inst: Inst):
        q = inst.queue
        # Release from the policy queue into the engine until a chunk's worth of tokens is waiting.
        while len(q) and inst.eng_tokens < self.chunk:
            got = q.pop_ready(self.now, len(inst.engine), len(inst.engine) + 1)
            if not got:
                break
            for v in got:
                r = self._qreq.pop(v.id)
                inst.pending_prompt -= r.prompt
                inst.engine.append(r)
                inst.eng_tokens += r.eff
        while not len(q) and inst.eng_tokens < self.chunk and not inst.draining:
            n = len(inst.engine)
            self._steal_prefill(inst)
            if len(inst.engine) == n:
                break
        budget = self.chunk
        pf = []
        free = inst.cap - inst.kv_used
        for r in inst.engine:
            if budget <= 0:
                break
            if r.done == 0:
                if r.eff > free:
                    break  # KV of this prompt does not fit until transfers drain
                free -= r.eff
                inst.kv_other += r.eff
            c = min(r.eff - r.done, budget)
            pf.append((r, c))
            budget -= c
        if not pf:
            return None
        return pf, 0, 0

    # ---- iteration end ----------------------------------------------------------------------------
    def _on_end(self, inst: Inst) -> None:
        now = self.now
        pf, ndec = inst.cur  # type: ignore[misc]
        inst.cur = None
        inst.busy = False
        if ndec:
            inst.step += 1
            inst.run_kv += ndec
            heap = inst.heap
            step = inst.step
            while heap and heap[0][0] <= step:
                _, _, ep, r = heapq.heappop(heap)
                if ep != r.epoch or r.idx not in inst.running:
                    continue
                self._finish(inst, r)
        for r, c in pf:
            r.done += c
            if inst.role == "prefill":
                inst.eng_tokens -= c
            if r.done >= r.eff:
                self._prefilled(inst, r, now)
        if inst.role == "prefill" and inst.held:
            self._retry_held(inst)
        self._kick(inst)

    def _finish(self, inst: Inst, r: Req) -> None:
        del inst.running[r.idx]
        inst.run_kv -= r.kvb + inst.step - r.s0
        if r.heavy:
            inst.n_heavy -= 1
        r.gen = r.output
        r.t_finish = self.now
        self.unfinished -= 1

    def _join(self, inst: Inst, r: Req) -> None:
        """r starts decoding on inst (its KV, `r.eff` tokens, is already allocated in kv_other)."""
        inst.kv_other -= r.eff
        inst.run_kv += r.eff
        r.kvb = r.eff
        r.s0 = inst.step
        r.gen0 = r.gen
        if r.t_decode < 0:
            r.t_decode = self.now
        inst.running[r.idx] = r
        if r.heavy:
            inst.n_heavy += 1
        inst.hseq += 1
        heapq.heappush(inst.heap, (inst.step + r.output - r.gen, inst.hseq, r.epoch, r))
        if self._need_remaining:
            heapq.heappush(inst.kheap, (r.pred_lo - r.gen + inst.step, inst.hseq, r.epoch, r))

    def _prefilled(self, inst: Inst, r: Req, now: float) -> None:
        if inst.role == "prefill":
            inst.engine.remove(r)
            r.gen = 1
            if self.cfg.ttft_at == "prefill" or r.output <= 1:
                r.t_first = now
            if r.output <= 1:
                inst.kv_other -= r.eff
                r.t_finish = now
                self.unfinished -= 1
                return
            inst.held.append(r)
            self._retry_held(inst)
            return
        inst.prefilling.remove(r)
        r.gen += 1  # first token, or the next one after a recompute
        if r.t_first < 0:
            r.t_first = now
        if r.gen >= r.output:
            inst.kv_other -= r.eff
            r.t_finish = now
            self.unfinished -= 1
            return
        self._join(inst, r)

    # ---- dispatch and KV transfer -----------------------------------------------------------------
    def _retry_held(self, inst: Inst) -> None:
        held = inst.held
        while held:
            r = held[0]
            if not self._dispatch(inst, r):
                break
            held.popleft()

    def _dispatch(self, src: Inst, r: Req) -> bool:
        views = self._decode_views()
        cands = [v for v in views.values() if v.accepting]
        if not cands:
            return False
        pick = self.pol.dispatcher.pick(cands, r.view, self.rng)
        if pick is None:
            return False
        view = views[pick]
        if not self.pol.admission.admits(view, r.view):
            return False
        dst = self.insts[int(pick[1:])]
        views[pick] = replace(view, reserved_kv_tokens=view.reserved_kv_tokens + r.need)
        dst.inflight_res += r.need
        r.d_inst = dst.i
        r.t_dispatch = self.now
        start = max(self.now, src.link_free)
        done = start + self.tm.transfer_s(r.eff)
        src.link_free = done
        self._push(done, _XFER, (r, src, dst))
        return True

    def _on_xfer(self, obj) -> None:
        r, src, dst = obj
        if r.t_first < 0:  # ttft_at == "handoff"
            r.t_first = self.now
        src.kv_other -= r.eff
        dst.inflight_res = max(0, dst.inflight_res - r.need)
        dst.kv_other += r.eff  # the lease holds the imported KV until the decode claims it
        dst.incoming.append(r)
        self._kick(dst)
        if src.held:
            self._retry_held(src)
        if not src.busy:
            self._kick(src)

    # ---- monitor tick: retries, view refresh, flips -----------------------------------------------
    def _on_tick(self) -> None:
        cfg = self.cfg
        self._tick_n += 1
        for inst in self.insts:
            if inst.role == "prefill" and inst.held:
                self._retry_held(inst)
                if not inst.busy:
                    self._kick(inst)
        every = max(1, round(cfg.monitor_interval_s / cfg.retry_interval_s))
        if self.pol.flip is not None and self._tick_n % every == 0:
            self._flip_tick()
        if self.unfinished > 0:
            self._push(self.now + cfg.retry_interval_s, _TICK, None)

    def _flip_tick(self) -> None:
        views = []
        for inst in self.insts:
            if inst.role == "prefill":
                v = self._prefill_view(inst)
            else:
                v = InstanceView(
                    id=inst.id, role=inst.role, total_kv_tokens=inst.cap,  # type: ignore[arg-type]
                    free_kv_tokens=max(0, inst.cap - inst.kv_used), accepting=not inst.draining,
                    running=len(inst.running), queued=inst.n_waiting + len(inst.incoming),
                    heavy_decodes=inst.n_heavy, light_decodes=len(inst.running) - inst.n_heavy,
                    reserved_kv_tokens=inst.inflight_res,
                )  # fmt: skip
            views.append(v)
        for d in self.pol.flip.decide(views, self.now):
            inst = self.insts[int(d.instance_id[1:])]
            if inst.to_role is not None or inst.role == d.to_role:
                continue
            inst.draining = True
            inst.to_role = d.to_role
            self.flip_log.append({"t": self.now, "instance": inst.id, "to": d.to_role, "reason": d.reason})
            self._kick(inst)

    def _on_flip_done(self, inst: Inst) -> None:
        inst.busy = False
        role = inst.to_role
        inst.to_role = None
        inst.draining = False
        if role is None:
            return
        inst.role = role
        inst.flips += 1
        self.flips += 1
        inst.queue = self.pol.new_queue() if role == "prefill" else None
        self._dviews = {}
        self._kick(inst)


def simulate(
    system: str | SystemConfig,
    timing: TimingModel,
    instances: int,
    requests: Sequence[Any],
    seed: int = 0,
    **kw: Any,
) -> SimResult:
    cfg = system if isinstance(system, SystemConfig) else system_config(system)
    return ClusterSim(cfg, timing, instances, requests, seed=seed, **kw).run()

