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
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from backends.prefix import BLOCK_TOKENS, reusable_tokens
from orchestrator.policies.config import PolicyConfig
from orchestrator.policies.core import PlacementCore
from orchestrator.policies.flip import FlipPolicy, make_flip_policy
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.prefix import PrefixIndex
from orchestrator.policies.types import InstanceView, RequestView
from orchestrator.sim.config import SystemConfig
from orchestrator.sim.state import SimInstance, SimRequest

# How an arriving request runs: on a co-located instance ("local"), co-located on a decode instance
# ("colocated": the fallback) or queued on a prefill instance ("prefill").
Route = Literal["local", "colocated", "prefill"]


class SimPolicies:
    """The policy objects the simulator's loop keeps besides the placement core: the flip policy and
    the prefill queues' factory."""

    def __init__(self, p: PolicyConfig) -> None:
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
        chunk_tokens: int = 0,
    ) -> None:
        self.cfg = cfg
        self.policy = cfg.policy
        # The placement core the live control plane runs, over this system's policy (the backlog rule
        # in tokens of this timing model; a co-located system has only a colocated pool).
        mode = "colocated" if cfg.layout == "colocated" else cfg.policy.mode
        self.core = PlacementCore.from_knobs(replace(cfg.policy, mode=mode, colocate_backlog_tokens=backlog_tokens))
        self.chunk_tokens = chunk_tokens  # the engines' chunk: the core's release rule reads it
        # Cache-aware placement: what each instance holds, from its cache ("precise", as from engine
        # events) or from what was routed where ("approx", as in front of engines without events).
        self.prefix_aware = cfg.prefix_cache and (
            self.core.global_scheduler.uses_prefix or cfg.policy.colocate_pick == "prefill_load"
        )
        self.prefix_index = cfg.prefix_index
        self.routed = PrefixIndex()
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
            # As an engine reports it: running counts prompts being prefilled too (heavy/light only decodes).
            running=nrun + len(inst.prefilling),
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
        """Where an arriving request runs, and on which instance: the core's route and pick over this
        cluster's views (instances flipping take no new work, as live ones that are not healthy)."""
        route, inst = self._route(r)
        if self.prefix_aware and self.prefix_index == "approx":
            self.routed.routed(inst.id, r.blocks[: r.prompt_tokens // BLOCK_TOKENS], r.arrival)
        return route, inst

    def _route(self, r: SimRequest) -> tuple[Route, SimInstance]:
        assert r.view is not None
        dv, pv = self._with_cache(self.decode_view, r), self._with_cache(self.prefill_view, r)
        if self.cfg.layout == "colocated":
            pick = self.core.pick_prefill(r.view, "colocated", [dv(i) for i in self.insts])
            assert pick is not None
            return ("colocated" if self.cfg.hold_prompts else "local"), self._inst(pick)
        prefills = [i for i in self.insts if i.role == "prefill" and not i.draining]
        decodes = [i for i in self.insts if i.role == "decode" and not i.draining]
        choice = self.core.route(
            r.view, [pv(i) for i in prefills], bool(decodes), [dv(i) for i in decodes], colocated_pool=False
        )
        if choice.mode == "colocated":
            if choice.host is not None:
                return "colocated", self._inst(choice.host)
            # Nowhere usable (every decode instance flipping): wait at one anyway rather than drop it.
            anyhost = self.core.pick_host(r.view, [dv(i) for i in self.insts if i.role == "decode"], None)
            if anyhost is not None:
                return "colocated", self._inst(anyhost)
        prefills = prefills or [i for i in self.insts if i.role == "prefill"]
        pick = self.core.pick_prefill(r.view, "prefill", [pv(i) for i in prefills])
        return "prefill", (self._inst(pick) if pick is not None else prefills[0])

    def _with_cache(
        self, view_of: Callable[[SimInstance], InstanceView], r: SimRequest
    ) -> Callable[[SimInstance], InstanceView]:
        """`view_of`, with the request's prompt tokens cached there folded in (cache-aware placement)."""
        if not (self.prefix_aware and r.blocks):
            return view_of
        blocks = r.blocks[: r.prompt_tokens // BLOCK_TOKENS]

        def cached(inst: SimInstance) -> int:
            if self.prefix_index == "approx":
                return self.routed.match(inst.id, blocks, r.arrival)
            return inst.cache.match(blocks) if inst.cache is not None else 0

        chunk = self.chunk_tokens
        return lambda inst: replace(
            view_of(inst), cached_prompt_tokens=reusable_tokens(r.prompt_tokens, cached(inst)), chunk_tokens=chunk
        )

    def _inst(self, instance_id: str) -> SimInstance:
        return self.insts[int(instance_id[1:])]

    # ---- releases and late binding ----------------------------------------------------------------
    def may_release(self, inst: SimInstance) -> bool:
        """The core's release rule: one more queued prompt may enter this instance's engine."""
        if inst.role == "prefill":
            return self.core.may_release("prefill", len(inst.in_engine), inst.in_engine_tokens, self.chunk_tokens)
        started = len(inst.waiting) + len(inst.prefilling)
        left = sum(r.prefill_len for r in inst.waiting) + sum(r.prefill_len - r.prefilled for r in inst.prefilling)
        return self.core.may_release(inst.role, started, left, self.chunk_tokens)  # type: ignore[arg-type]

    def _steal(self, thief: SimInstance, view: InstanceView, queue_of: QueueOf,
               view_of: Callable[[SimInstance], InstanceView]) -> tuple[SimInstance, str] | None:
        """The core's late-binding pick among the thief's pool: the victim and the request id."""
        queues = {j.id: q for j in self.insts if j is not thief and j.role == thief.role and (q := queue_of(j))}

        def pair(req: RequestView, victim_id: str) -> tuple[InstanceView, InstanceView]:
            with_cache = self._with_cache(view_of, self.queued[req.id])
            return with_cache(self._inst(victim_id)), with_cache(thief)

        got = self.core.steal(view, queues, _NO_AVOID, pair) if queues else None
        if got is None:
            return None
        victim_id, req = got
        victim = self._inst(victim_id)
        queue = queue_of(victim)
        assert queue is not None
        queue.remove(req.id)
        self.steals += 1
        return victim, req.id

    def steal_colocated(self, inst: SimInstance, now: float) -> None:
        """A decode instance with room takes the next co-located prompt queued for its busiest peer
        (if decode admission takes it here: the core's rule)."""
        got = self._steal(inst, self.decode_view(inst), lambda j: j.colocated_queue, self.decode_view)
        if got is None:
            return
        victim, rid = got
        r = self.queued.pop(rid)
        victim.queued_prompt_tokens -= r.prefill_len
        inst.queued_prompt_tokens += r.prefill_len
        r.prefill_at = r.decode_at = inst.index
        inst.waiting.append(r)

    def steal_prefill(self, inst: SimInstance, now: float) -> None:
        """A prefill instance with an engine to fill takes the next prompt queued for its busiest peer."""
        got = self._steal(inst, self.prefill_view(inst), lambda j: j.prefill_queue, self.prefill_view)
        if got is None:
            return
        victim, rid = got
        r = self.queued.pop(rid)
        victim.queued_prompt_tokens -= r.prompt_tokens
        r.prefill_at = inst.index
        inst.in_engine.append(r)
        inst.in_engine_tokens += r.prefill_len

    def thieves(self, inst: SimInstance) -> list[SimInstance]:
        """A prompt queued behind a busy instance: the idle peers of its pool that may take it now."""
        if self.policy.late_binding == "none" or not inst.busy:
            return []
        return [j for j in self.insts if j is not inst and j.role == inst.role and not j.busy and not j.draining]

    # ---- dispatch ---------------------------------------------------------------------------------
    def pick_decode(self, r: SimRequest, now: float) -> SimInstance | None:
        """The decode instance a prefilled request goes to (its KV reserved there), or None: no
        instance accepts it now (the core's pick: the dispatcher gated by admission)."""
        assert r.view is not None
        views = self.decode_views(now)
        cands = [v for v in views.values() if v.accepting]
        pick = self.core.pick_decode(r.view, cands, self.rng) if cands else None
        if pick is None:
            return None
        view = views[pick]
        dst = self._inst(pick)
        views[pick] = replace(view, reserved_kv_tokens=view.reserved_kv_tokens + r.kv_need)
        dst.reserved_kv += r.kv_need
        return dst


QueueOf = Callable[[SimInstance], "PrefillQueue | None"]


def _NO_AVOID(request_id: str) -> frozenset[str]:  # noqa: N802 - a constant function
    return frozenset()
