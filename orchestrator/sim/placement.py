"""Every cluster-level decision the simulator makes, in one place: where an arriving request runs
(co-located or disaggregated: the HPHD rule, the backlog fallback; which instance), which decode
instance a prefilled request goes to, and which queued prompt an idle instance takes from a busy
peer (late binding). The decisions are the live control plane's policy objects
(orchestrator/policies) asked over ``InstanceView``/``RequestView`` snapshots built the way the
cluster monitor builds them: decode loads refreshed every ``monitor_interval_s``, plus the
reservations made since.

The event loop (loop.py) owns the instances and the clock. It asks ``SimPlacement`` and carries out
the answer (enqueue, start a transfer, kick an instance); the steals, which move a queued prompt,
are carried out here.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

from orchestrator.policies.admission import make_admission
from orchestrator.policies.config import PolicyConfig
from orchestrator.policies.dispatch import make_dispatcher
from orchestrator.policies.flip import FlipPolicy, make_flip_policy
from orchestrator.policies.global_scheduler import make_global_scheduler
from orchestrator.policies.late_binding import make_late_binding
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.types import InstanceView
from orchestrator.sim.config import SystemConfig
from orchestrator.sim.state import SimInstance, SimRequest

# How an arriving request runs: on a co-located instance ("local"), co-located on a decode instance
# ("colocated": the fallback) or queued on a prefill instance ("prefill").
Route = Literal["local", "colocated", "prefill"]


class SimPolicies:
    """The live orchestrator's policy objects, built from a system's configuration."""

    def __init__(self, p: PolicyConfig) -> None:
        self.global_scheduler = make_global_scheduler(
            p.global_scheduler, cache_weight=p.prefix_cache_weight, cache_threshold=p.prefix_cache_threshold,
            balance_abs=p.prefix_balance_abs, balance_rel=p.prefix_balance_rel,
        )  # fmt: skip
        self.dispatcher = make_dispatcher(
            p.dispatch_policy, power_of_d=p.power_of_d, heavy_decode_threshold=p.heavy_decode_threshold,
            fallback=p.dispatch_fallback, ratio_objective=p.dispatch_ratio_objective,
        )  # fmt: skip
        self.admission = make_admission(p.decode_admission)
        self.flip: FlipPolicy | None = (
            make_flip_policy(
                p.flip_policy,
                idle_s=p.flip_idle_s,
                min_per_role=p.flip_min_per_role,
                cooldown_s=p.flip_cooldown_s,
                load_kv_threshold=p.flip_load_kv_threshold,
            )  # fmt: skip
            if p.flip_policy != "none"
            else None
        )
        self.late_binding = make_late_binding(p.late_binding)
        self._policy, self._batch = p.prefill_policy, p.prefill_sched_batch

    def new_queue(self) -> PrefillQueue:
        return make_prefill_queue(self._policy, sched_batch=self._batch)


def wants_colocated(cfg: SystemConfig, r: SimRequest) -> bool:
    """The HPHD rule: a heavy prompt predicted to decode heavy runs co-located whatever the load."""
    p = cfg.policy
    return (
        cfg.layout == "disaggregated" and p.colocate_heavy_heavy
        and r.prompt_tokens > p.heavy_prefill_threshold and r.heavy_decode
    )  # fmt: skip


class SimPlacement:
    """The simulator's placement decisions over its instances (``insts``, indexed by position) and the
    prompts queued on them (``queued``: request id -> request, shared with the loop)."""

    def __init__(
        self,
        cfg: SystemConfig,
        pol: SimPolicies,
        insts: list[SimInstance],
        queued: dict[str, SimRequest],
        rng: random.Random,
        backlog_tokens: int,
        exact_views: bool = False,
    ) -> None:
        self.cfg = cfg
        self.policy = cfg.policy
        self.pol = pol
        self.insts = insts
        self.queued = queued
        self.rng = rng
        # The backlog rule: co-locate while the least-loaded prefill instance holds more prompt tokens (0: off).
        self.backlog_tokens = backlog_tokens
        # Views carry decode_remaining as its minimum only (all reserve_dynamic reads, with `running`
        # for the count) unless exact_views: the full per-request tuple, O(batch) per view.
        self.exact_views = exact_views
        self.track_remaining = cfg.policy.decode_admission != "greedy"
        self.steals = 0  # late binding: prompts taken from a peer's queue
        self._views_at = -1.0
        self._dviews: dict[str, InstanceView] = {}

    # ---- views ------------------------------------------------------------------------------------
    def decode_view(self, inst: SimInstance) -> InstanceView:
        step = inst.step
        rem: tuple[int, ...] = ()
        if self.track_remaining and inst.running:
            if self.exact_views:
                rem = tuple(
                    max(0, r.predicted_lo - (r.generated_at_join + step - r.step_at_join))
                    for r in inst.running.values()
                )
            else:
                kh = inst.remaining_heap
                running = inst.running
                while kh and (kh[0][2] != kh[0][3].epoch or kh[0][3].index not in running):
                    heapq.heappop(kh)
                if kh:
                    rem = (max(0, kh[0][0] - step),)
        nrun = len(inst.running)
        return InstanceView(
            id=inst.id,
            role=inst.role,  # type: ignore[arg-type]
            total_kv_tokens=inst.kv_capacity,
            free_kv_tokens=max(0, inst.kv_capacity - inst.kv_used),
            healthy=True,
            accepting=not inst.draining,
            queued_prompt_tokens=inst.queued_prompt_tokens,
            running_prompt_tokens=sum(r.prefill_len - r.prefilled for r in inst.prefilling),
            running=nrun,
            queued=inst.n_waiting + len(inst.incoming),
            heavy_decodes=inst.heavy_decodes,
            light_decodes=nrun - inst.heavy_decodes,
            decode_remaining=rem,
            reserved_kv_tokens=inst.reserved_kv,
        )

    @staticmethod
    def prefill_view(inst: SimInstance) -> InstanceView:
        return InstanceView(
            id=inst.id,
            role=inst.role,  # type: ignore[arg-type]
            total_kv_tokens=inst.kv_capacity,
            free_kv_tokens=max(0, inst.kv_capacity - inst.kv_used),
            healthy=True,
            accepting=not inst.draining,
            queued_prompt_tokens=inst.queued_prompt_tokens,
            running_prompt_tokens=inst.in_engine_tokens,
            running=len(inst.in_engine),
            queued=len(inst.prefill_queue) if inst.prefill_queue is not None else inst.n_waiting,
        )

    def decode_views(self, now: float) -> dict[str, InstanceView]:
        """The cluster monitor's broadcast: refreshed every monitor interval."""
        if now - self._views_at >= self.cfg.monitor_interval_s or not self._dviews:
            self._views_at = now
            self._dviews = {i.id: self.decode_view(i) for i in self.insts if i.role == "decode"}
        return self._dviews

    def forget_views(self) -> None:
        """A role changed: the next dispatch sees fresh views."""
        self._dviews = {}

    def flip_views(self) -> list[InstanceView]:
        """What the flip policy sees of every instance."""
        views = []
        for inst in self.insts:
            if inst.role == "prefill":
                v = self.prefill_view(inst)
            else:
                v = InstanceView(
                    id=inst.id, role=inst.role, total_kv_tokens=inst.kv_capacity,  # type: ignore[arg-type]
                    free_kv_tokens=max(0, inst.kv_capacity - inst.kv_used), accepting=not inst.draining,
                    running=len(inst.running), queued=inst.n_waiting + len(inst.incoming),
                    heavy_decodes=inst.heavy_decodes, light_decodes=len(inst.running) - inst.heavy_decodes,
                    reserved_kv_tokens=inst.reserved_kv,
                )  # fmt: skip
            views.append(v)
        return views

    # ---- arrivals ---------------------------------------------------------------------------------
    def route(self, r: SimRequest) -> tuple[Route, SimInstance]:
        """Where an arriving request runs, and on which instance."""
        cfg = self.cfg
        if cfg.layout == "colocated":
            best = self.pick_colocated(self.insts)
            assert best is not None
            return "local", best
        prefills = [i for i in self.insts if i.role == "prefill" and not i.draining]
        if not prefills:
            prefills = [i for i in self.insts if i.role == "prefill"]
        backlogged = self.backlog_tokens > 0 and bool(prefills) and self.prefill_backlogged(prefills, r)
        if not prefills or wants_colocated(cfg, r) or backlogged:
            # Co-located fallback: prefill and decode on one decode instance (stall-free hybrid
            # batches, no KV transfer).
            inst = self.pick_colocated([i for i in self.insts if i.role == "decode" and not i.draining])
            if inst is None and not prefills:
                inst = self.pick_colocated([i for i in self.insts if i.role == "decode"])
            if inst is not None:
                return "colocated", inst
        views = [self.prefill_view(i) for i in prefills]
        pick = self.pol.global_scheduler.pick(views, r.view)
        return "prefill", (self.insts[int(pick[1:])] if pick is not None else prefills[0])

    def prefill_backlogged(self, prefills: Sequence[SimInstance], r: SimRequest) -> bool:
        """The backlog rule: the least-loaded prefill instance holds more than `backlog_tokens` prompt
        tokens (queued and in its engine), while a decode instance has room for this one now."""
        backlog = min(i.queued_prompt_tokens + i.in_engine_tokens for i in prefills)
        if backlog <= self.backlog_tokens:
            return False
        for i in self.insts:
            if i.role != "decode" or i.draining or i.n_waiting or i.incoming:
                continue
            used = i.kv_used + i.reserved_kv + r.kv_need
            if used <= 0.8 * i.kv_capacity:  # the decode side has memory and no queue of its own
                return True
        return False

    def pick_colocated(self, insts: Sequence[SimInstance]) -> SimInstance | None:
        """The host of a co-located request: least prefill load (the global scheduler's rule) or
        least outstanding requests (a plain load balancer), by ``colocate_pick``."""
        if self.policy.colocate_pick == "prefill_load":

            def load(i: SimInstance) -> tuple[int, int, int]:
                prompt = i.queued_prompt_tokens + sum(q.prefill_len - q.prefilled for q in i.prefilling)
                return prompt, len(i.running) + i.n_waiting + len(i.incoming), i.index

            return min(insts, key=load, default=None)
        return least_outstanding(insts)

    # ---- late binding -----------------------------------------------------------------------------
    def victim(self, thief: SimInstance, queue_of: Callable[[SimInstance], PrefillQueue | None]) -> SimInstance | None:
        """The peer of the thief's pool whose queue (`queue_of`) it takes from, by the policy."""
        if self.policy.late_binding == "none":
            return None
        queued: dict[str, int] = {}
        for j in self.insts:
            q = queue_of(j) if j.role == thief.role else None
            if q is not None and len(q):
                queued[j.id] = q.queued_prompt_tokens
        pick = self.pol.late_binding.victim(thief.id, queued) if queued else None
        return self.insts[int(pick[1:])] if pick is not None else None

    def steal_colocated(self, inst: SimInstance, now: float) -> None:
        """A decode instance with nothing of its own takes the next co-located prompt queued for its
        busiest peer, if it fits here and passes admission."""
        victim = self.victim(inst, lambda j: j.colocated_queue)
        if victim is None:
            return
        assert victim.colocated_queue is not None
        r = self.queued[victim.colocated_queue.peek().id]
        nrun = len(inst.running)
        if inst.running_kv + inst.kv_staged + r.prefill_len + nrun > inst.kv_capacity:
            return
        if r.preemptions == 0 and not self.pol.admission.admits(self.decode_view(inst), r.view):
            return
        victim.colocated_queue.pop_ready(now, 0, 1)
        del self.queued[r.id]
        victim.queued_prompt_tokens -= r.prefill_len
        inst.queued_prompt_tokens += r.prefill_len
        r.prefill_at = r.decode_at = inst.index
        inst.waiting.append(r)
        self.steals += 1

    def steal_prefill(self, inst: SimInstance, now: float) -> None:
        """A prefill instance with an engine to fill takes the next prompt queued for its busiest peer."""
        victim = self.victim(inst, lambda j: j.prefill_queue)
        if victim is None:
            return
        assert victim.prefill_queue is not None
        (v,) = victim.prefill_queue.pop_ready(now, 0, 1)
        r = self.queued.pop(v.id)
        victim.queued_prompt_tokens -= r.prompt_tokens
        r.prefill_at = inst.index
        inst.in_engine.append(r)
        inst.in_engine_tokens += r.prefill_len
        self.steals += 1

    def thieves(self, inst: SimInstance) -> list[SimInstance]:
        """A prompt queued behind a busy instance: the idle peers of its pool that may take it now."""
        if self.policy.late_binding == "none" or not inst.busy:
            return []
        return [j for j in self.insts if j is not inst and j.role == inst.role and not j.busy and not j.draining]

    # ---- dispatch ---------------------------------------------------------------------------------
    def pick_decode(self, r: SimRequest, now: float) -> SimInstance | None:
        """The decode instance a prefilled request goes to (its KV reserved there), or None: no
        instance accepts it now."""
        views = self.decode_views(now)
        cands = [v for v in views.values() if v.accepting]
        if not cands:
            return None
        pick = self.pol.dispatcher.pick(cands, r.view, self.rng)
        if pick is None:
            return None
        view = views[pick]
        if not self.pol.admission.admits(view, r.view):
            return None
        dst = self.insts[int(pick[1:])]
        views[pick] = replace(view, reserved_kv_tokens=view.reserved_kv_tokens + r.kv_need)
        dst.reserved_kv += r.kv_need
        return dst


def least_outstanding(insts: Sequence[SimInstance]) -> SimInstance | None:
    """Co-located placement (a plain load balancer): fewest outstanding requests, then index."""
    best = None
    best_load = 0
    for inst in insts:
        load = len(inst.running) + inst.n_waiting + len(inst.prefilling) + len(inst.incoming)
        if best is None or load < best_load:
            best, best_load = inst, load
    return best
