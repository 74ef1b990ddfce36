"""Discrete-event simulator of a serving cluster, driven by the live orchestrator's policy objects.

Every instance runs an engine scheduler (batching.py) whose forward passes take the time of a
calibrated ``TimingModel`` (backends/engines/simulated/timing.py). The cluster-level decisions (placement.py) are
made by the very objects the live control plane uses (``orchestrator/policies``).

The systems it compares are described in config.py.

``ClusterSim`` alone runs the analytic split (split.py); ``simulate`` (planner.py) plans the layout
first where the system asks for a simulated plan.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from backends.engines.simulated.timing import TimingModel
from backends.prefix import BLOCK_TOKENS, reusable_tokens
from orchestrator.sim.batching import Batcher
from orchestrator.sim.config import SystemConfig, check_config
from orchestrator.sim.placement import SimPlacement, SimPolicies, wants_colocated
from orchestrator.sim.predict import set_views
from orchestrator.sim.prefix import SimPrefixCache
from orchestrator.sim.split import LayoutChoice, plan_split
from orchestrator.sim.state import SimInstance, SimRequest, SimResult, request_record

_ARR, _END, _XFER, _TICK, _FLIP = 0, 1, 2, 3, 4


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
        self.exact_views = exact_views
        self.tm = timing
        self.n = instances
        self.seed = seed
        self.rng = random.Random(seed)  # the dispatcher's samples
        self.prng = random.Random(seed + 7919)  # the noisy predictor's misses
        self.kv_capacity = kv_tokens or timing.total_kv_tokens
        self.chunk = cfg.chunk_size or timing.knee()
        self.reqs: list[SimRequest] = []
        texts: list[str | None] = []  # prompt texts, where the requests carry them (the learned predictor)
        for k, r in enumerate(sorted(requests, key=lambda x: x.arrival)):
            q = SimRequest(k, str(getattr(r, "id", k)), float(r.arrival), int(r.prompt_tokens),
                           int(r.output_tokens), str(getattr(r, "cls", "")))  # fmt: skip
            q.blocks = tuple(getattr(r, "blocks", None) or ())
            q.after = getattr(r, "after", None)
            q.think_s = float(getattr(r, "think_s", 0.0) or 0.0)
            self.reqs.append(q)
            text = getattr(r, "prompt", None)
            texts.append(text if isinstance(text, str) else None)
        self._predict(texts)
        # What a layout plan reads: the requests the fallback's rule co-locates, the arrival rate.
        self.colocated_mask = [wants_colocated(cfg, r) for r in self.reqs] if cfg.policy.colocate_heavy_heavy else None
        span = self.reqs[-1].arrival - self.reqs[0].arrival if self.reqs else 0.0
        self.rate = (len(self.reqs) - 1) / span if span > 0 else None
        self.analytic_prefill = 0
        if cfg.layout == "disaggregated":
            p, d = plan_split(instances, self.prompts(), self.outputs(), timing, self.chunk, cfg,
                              self.colocated_mask, rate=self.rate)  # fmt: skip
            self.analytic_prefill = p
        else:
            p, d = 0, instances
        self._setup(p, d)
        self.ev: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.unfinished = len(self.reqs)
        self.events = 0
        self.flips = 0
        self._tick_n = 0
        self.flip_log: list[dict[str, Any]] = []

    def prompts(self) -> list[int]:
        return [r.prompt_tokens for r in self.reqs]

    def outputs(self) -> list[int]:
        return [r.output_tokens for r in self.reqs]

    def wants_layout_plan(self) -> bool:
        """Does the system ask for its split to be chosen by simulation (planner.plan_layout)?"""
        cfg = self.cfg
        return (
            cfg.layout == "disaggregated" and cfg.pd_ratio == "auto" and cfg.layout_plan == "simulated"
            and bool(self.rate) and self.n > 1
        )  # fmt: skip

    def use_layout(self, plan: LayoutChoice) -> None:
        """Run the split ``plan`` chose (and its late binding, where it chose that too). Before ``run``."""
        self.plan = plan
        if plan.late_binding not in (None, self.cfg.policy.late_binding):
            self.cfg = self.cfg.with_policy(late_binding=plan.late_binding)
        self._setup(plan.prefill, plan.decode)

    def _setup(self, p: int, d: int) -> None:
        cfg = self.cfg
        disagg = cfg.layout == "disaggregated"
        self.pol = SimPolicies(cfg.policy)
        self.split = {"prefill": p, "decode": d} if disagg else {"colocated": self.n}
        self.insts: list[SimInstance] = []
        for i in range(self.n):
            role = "colocated" if not disagg else ("prefill" if i < p else "decode")
            inst = SimInstance(i, role, self.kv_capacity)
            if cfg.prefix_cache:
                inst.cache = SimPrefixCache(self.kv_capacity // BLOCK_TOKENS)
            if role == "prefill":
                inst.prefill_queue = self.pol.new_queue()
            self.insts.append(inst)
        tps = self.chunk / self.tm.prefill_s(self.chunk)  # prefill tokens/s at the knee
        self.backlog_tokens = cfg.backlog_tokens(tps) if disagg else 0
        self.placement = SimPlacement(
            cfg, self.pol, self.insts, {}, self.rng, self.backlog_tokens, self.exact_views, chunk_tokens=self.chunk
        )
        self.batcher = Batcher(cfg, self.chunk, self.placement, self.tm)

    def _predict(self, texts: Sequence[str | None]) -> None:
        """Each request's view, with the bucket the configured predictor gives it (predict.py)."""
        self.predicted_by = set_views(self.reqs, self.cfg.policy, texts, self.prng, self.cfg.learned_accuracy)

    # ---- event plumbing ---------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: Any) -> None:
        self.seq += 1
        heapq.heappush(self.ev, (t, self.seq, kind, obj))

    def run(self, until: float | None = None) -> SimResult:
        wall = time.perf_counter()
        self._by_id = {r.id: r for r in self.reqs}
        self._next_turns: dict[str, list[SimRequest]] = {}
        for r in self.reqs:
            if r.prompt_tokens + r.output_tokens > self.kv_capacity or r.prompt_tokens <= 0 or r.output_tokens <= 0:
                r.failed = True
                self.unfinished -= 1
                continue
            if r.after is not None and r.after in self._by_id:
                self._next_turns.setdefault(r.after, []).append(r)  # arrives once the turn before it ends
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
            config=self.cfg.to_dict()
            | {
                "chunk_size": self.chunk,
                "kv_tokens_per_instance": self.kv_capacity,
                "colocate_backlog_tokens": self.backlog_tokens,
            },  # fmt: skip
            timing=self.tm.describe(),
            instances=self.n,
            split=self.split,
            requests=[request_record(r) for r in self.reqs],
            makespan_s=makespan,
            busy_instance_s=sum(i.busy_s for i in self.insts),
            wall_s=time.perf_counter() - wall,
            events=self.events,
            flips=self.flips,
            preemptions=self.batcher.preemptions,
            extra={
                "flip_log": self.flip_log,
                "steals": self.placement.steals,
                "final_roles": [i.role for i in self.insts],
                "plan": self.plan.to_dict() if self.plan is not None else None,
                "predicted_by": self.predicted_by,
            },
        )

    @property
    def preemptions(self) -> int:
        return self.batcher.preemptions

    @property
    def steals(self) -> int:
        return self.placement.steals

    # ---- arrivals ---------------------------------------------------------------------------------
    def _on_arrival(self, r: SimRequest) -> None:
        route, inst = self.placement.route(r)
        if route == "local":
            r.prefill_at = r.decode_at = inst.index
            inst.waiting.append(r)
            inst.queued_prompt_tokens += r.prefill_len
            self._kick(inst)
            return
        assert r.view is not None
        if route == "colocated":
            r.colocated = inst.role == "decode"  # a fallback; in a co-located layout every prompt is held here
            r.prefill_at = r.decode_at = inst.index
            if inst.colocated_queue is None:
                inst.colocated_queue = self.pol.new_queue()
            inst.colocated_queue.push(r.view, self.now)  # SJF for tetri: the prefill pool's policy, here too
            inst.queued_prompt_tokens += r.prefill_len
        else:
            assert inst.prefill_queue is not None
            r.prefill_at = inst.index
            inst.prefill_queue.push(r.view, self.now)
            inst.queued_prompt_tokens += r.prompt_tokens
        self.placement.queued[r.id] = r
        self._kick(inst)
        for j in self.placement.thieves(inst):
            self._kick(j)

    # ---- iterations -------------------------------------------------------------------------------
    def _kick(self, inst: SimInstance) -> None:
        if inst.busy:
            return
        batch = self.batcher.form(inst, self.now)
        if batch is None:
            if (
                inst.to_role is not None and not inst.has_work() and not inst.held
                and inst.kv_staged == 0 and inst.reserved_kv == 0
            ):  # fmt: skip
                self._push(self.now + self.cfg.flip_cost_s, _FLIP, inst)
                inst.busy = True
            return
        pf, ndec, ctx = batch
        ptok = 0
        units = 0.0
        for r, c in pf:
            ptok += c
            units += c * c + 2.0 * c * r.prefilled
        dt = self.tm.iter_s(ptok, units, len(pf), ndec, ctx)
        inst.busy = True
        inst.in_flight = (pf, ndec)
        inst.busy_s += dt
        inst.iterations += 1
        self._push(self.now + dt, _END, inst)

    def _on_end(self, inst: SimInstance) -> None:
        now = self.now
        pf, ndec = inst.in_flight  # type: ignore[misc]
        inst.in_flight = None
        inst.busy = False
        if ndec:
            inst.step += 1
            inst.running_kv += ndec
            heap = inst.finish_heap
            step = inst.step
            while heap and heap[0][0] <= step:
                _, _, ep, r = heapq.heappop(heap)
                if ep != r.epoch or r.index not in inst.running:
                    continue
                inst.leave(r)
                r.generated = r.output_tokens
                self._finished(inst, r, now)
        for r, c in pf:
            r.prefilled += c
            if inst.role == "prefill":
                inst.in_engine_tokens -= c
            if r.prefilled >= r.prefill_len:
                self._prefilled(inst, r, now)
        if inst.role == "prefill" and inst.held:
            self._retry_held(inst)
        self._kick(inst)

    def _prefilled(self, inst: SimInstance, r: SimRequest, now: float) -> None:
        if inst.role == "prefill":
            inst.in_engine.remove(r)
            r.generated = 1
            if self.cfg.ttft_at == "prefill" or r.output_tokens <= 1:
                r.t_first = now
            if inst.cache is not None:
                inst.cache.insert(r.blocks[: r.prompt_tokens // BLOCK_TOKENS])
            if r.output_tokens <= 1:
                inst.kv_staged -= r.prefill_len
                self._finished(inst, r, now)
                return
            inst.held.append(r)
            self._retry_held(inst)
            return
        inst.prefilling.remove(r)
        r.generated += 1  # first token, or the next one after a recompute
        if r.t_first < 0:
            r.t_first = now
        if inst.cache is not None:
            inst.cache.insert(r.blocks[: r.prefill_len // BLOCK_TOKENS])
        if r.generated >= r.output_tokens:
            inst.kv_staged -= r.prefill_len
            self._finished(inst, r, now)
            return
        inst.join(r, now, self.placement.track_remaining)

    def _finished(self, inst: SimInstance, r: SimRequest, now: float) -> None:
        """The request's last token: its answer's blocks are cached where it decoded, and the next
        turn of its session (if any) arrives after its think time."""
        r.t_finish = now
        self.unfinished -= 1
        if inst.cache is not None and r.blocks:
            inst.cache.insert(r.blocks[: (r.prompt_tokens + r.output_tokens) // BLOCK_TOKENS])
        for nxt in self._next_turns.pop(r.id, ()):
            nxt.arrival = now + nxt.think_s
            if nxt.view is not None:
                nxt.view = replace(nxt.view, arrival=nxt.arrival)
            self._push(nxt.arrival, _ARR, nxt)

    # ---- dispatch and KV transfer -----------------------------------------------------------------
    def _retry_held(self, inst: SimInstance) -> None:
        held = inst.held
        while held:
            r = held[0]
            dst = self.placement.pick_decode(r, self.now)
            if dst is None:
                break
            held.popleft()
            r.decode_at = dst.index
            r.t_dispatch = self.now
            start = max(self.now, inst.link_free_at)
            # A receiver that already holds the prompt's leading blocks is not sent them again.
            have = dst.cache.match(r.blocks[: r.prompt_tokens // BLOCK_TOKENS]) if dst.cache is not None else 0
            done = start + self.tm.transfer_s(r.prefill_len - reusable_tokens(r.prefill_len, have))
            inst.link_free_at = done
            self._push(done, _XFER, (r, inst, dst))

    def _on_xfer(self, obj: tuple[SimRequest, SimInstance, SimInstance]) -> None:
        r, src, dst = obj
        if r.t_first < 0:  # ttft_at == "handoff"
            r.t_first = self.now
        src.kv_staged -= r.prefill_len
        dst.reserved_kv = max(0, dst.reserved_kv - r.kv_need)
        dst.kv_staged += r.prefill_len  # the lease holds the imported KV until the decode claims it
        if dst.cache is not None:
            dst.cache.insert(r.blocks[: r.prompt_tokens // BLOCK_TOKENS])
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
        assert self.pol.flip is not None
        for d in self.pol.flip.decide(self.placement.flip_views(), self.now):
            inst = self.insts[int(d.instance_id[1:])]
            if inst.to_role is not None or inst.role == d.to_role:
                continue
            inst.draining = True
            inst.to_role = d.to_role
            self.flip_log.append({"t": self.now, "instance": inst.id, "to": d.to_role, "reason": d.reason})
            self._kick(inst)

    def _on_flip_done(self, inst: SimInstance) -> None:
        inst.busy = False
        role = inst.to_role
        inst.to_role = None
        inst.draining = False
        if role is None:
            return
        inst.role = role
        inst.flips += 1
        self.flips += 1
        inst.prefill_queue = self.pol.new_queue() if role == "prefill" else None
        self.placement.forget_views()
        self._kick(inst)
