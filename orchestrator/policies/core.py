"""The placement core: every cluster-level decision, over views, shared by the live control plane
(orchestrator/placement.py) and the simulator (orchestrator/sim). Drivers build the views (their
own queues and reservations folded in), ask, and carry out; nothing here does I/O or keeps a clock.

Decisions, in the order a request meets them:
1. `route`: disaggregated, or co-located (the `colocated` pool, or a decode instance: the HPHD rule,
   the backlog fallback, or no P/D pair at all).
2. `pick_prefill`: the global scheduler's prefill (or co-located) instance.
3. `may_release`: whether an instance's queue lets one more prompt into its engine.
4. `steal`: late binding, which queued prompt an instance with room takes from a peer.
5. `pick_decode`: the dispatcher's decode instance, gated by decode admission.
6. KV reservations (ledger.py) until the decode instance's report shows the request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from backends.base import Role
from orchestrator.policies.admission import DecodeAdmission, make_admission
from orchestrator.policies.dispatch import Dispatcher, make_dispatcher
from orchestrator.policies.global_scheduler import GlobalScheduler, make_global_scheduler
from orchestrator.policies.hosts import HOST_PICKERS, has_room
from orchestrator.policies.late_binding import LateBinding, make_late_binding
from orchestrator.policies.prefill_queue import PrefillQueue
from orchestrator.policies.tpot import Isolation, pick_isolated
from orchestrator.policies.types import InstanceView, RequestView

Mode = Literal["auto", "colocated", "disaggregated"]
HostTest = Literal["room", "admit"] | None
# (request, victim id) -> the victim's and the thief's views for that request (late binding)
PairViews = Callable[[RequestView, str], tuple[InstanceView, InstanceView]]


class PlacementKnobs(Protocol):
    """The settings the core reads: `Settings` and the simulator's configuration both have them."""

    mode: str
    colocate_heavy_heavy: bool
    heavy_prefill_threshold: int
    colocate_on_decode: bool
    colocate_backlog_tokens: int
    colocate_pick: str
    tpot_isolate_weight: int
    tpot_isolate_share: float
    prefill_engine_backlog: int
    dispatch_policy: str
    power_of_d: int
    heavy_decode_threshold: int
    dispatch_fallback: str
    dispatch_ratio_objective: str
    decode_admission: str
    decode_max_running: int
    late_binding: str
    global_scheduler: str
    prefix_cache_weight: float
    prefix_running_weight: float
    prefix_cache_threshold: float
    prefix_balance_abs: int
    prefix_balance_rel: float


@dataclass(frozen=True)
class RouteChoice:
    """How one attempt runs. Co-located on the `colocated` pool (`host` None: the global scheduler
    picks) or on the decode instance `host`; `reason`: "mode" (no P/D pair, or mode=colocated),
    "hphd" or "backlog"."""

    mode: Literal["colocated", "disaggregated"]
    role: Role = "colocated"
    host: str | None = None
    reason: str = ""


DISAGGREGATED = RouteChoice("disaggregated", role="prefill")


class PlacementCore:
    def __init__(
        self, *, mode: str = "auto", colocate_heavy_heavy: bool = True, heavy_prefill_threshold: int = 512,
        colocate_on_decode: bool = True, colocate_backlog_tokens: int = 0, colocate_pick: str = "prefill_load",
        prefill_engine_backlog: int = 2, global_scheduler: GlobalScheduler | None = None,
        dispatcher: Dispatcher | None = None, admission: DecodeAdmission | None = None,
        late_binding: LateBinding | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        if colocate_pick not in HOST_PICKERS:
            raise ValueError(f"unknown colocate_pick {colocate_pick!r}; choose one of {', '.join(HOST_PICKERS)}")
        self.mode = mode
        self.colocate_heavy_heavy = colocate_heavy_heavy
        self.heavy_prefill_threshold = heavy_prefill_threshold
        self.colocate_on_decode = colocate_on_decode
        self.colocate_backlog_tokens = colocate_backlog_tokens
        self.colocate_pick = colocate_pick
        self.prefill_engine_backlog = prefill_engine_backlog
        self.global_scheduler = global_scheduler or make_global_scheduler("least_loaded")
        self.dispatcher = dispatcher or make_dispatcher("power_of_two")
        self.admission = admission or make_admission("reserve_dynamic")
        self.late_binding = late_binding or make_late_binding("busiest")
        self.isolation = isolation  # TPOT-aware host groups (tpot.py); None: off

    @classmethod
    def from_knobs(cls, k: PlacementKnobs) -> PlacementCore:
        return cls(
            mode=k.mode, colocate_heavy_heavy=k.colocate_heavy_heavy, heavy_prefill_threshold=k.heavy_prefill_threshold,
            colocate_on_decode=k.colocate_on_decode, colocate_backlog_tokens=k.colocate_backlog_tokens,
            colocate_pick=k.colocate_pick, prefill_engine_backlog=k.prefill_engine_backlog,
            global_scheduler=make_global_scheduler(
                k.global_scheduler, cache_weight=k.prefix_cache_weight, running_weight=k.prefix_running_weight,
                cache_threshold=k.prefix_cache_threshold,
                balance_abs=k.prefix_balance_abs, balance_rel=k.prefix_balance_rel,
            ),
            dispatcher=make_dispatcher(
                k.dispatch_policy, power_of_d=k.power_of_d, heavy_decode_threshold=k.heavy_decode_threshold,
                fallback=k.dispatch_fallback, ratio_objective=k.dispatch_ratio_objective,  # type: ignore[arg-type]
            ),
            admission=make_admission(k.decode_admission, k.decode_max_running),
            late_binding=make_late_binding(k.late_binding),
            isolation=Isolation(k.tpot_isolate_weight, k.tpot_isolate_share) if k.tpot_isolate_weight > 0 else None,
        )

    # ---- 1. route ------------------------------------------------------------------------------
    def hphd_candidate(self, prompt_tokens: int) -> bool:
        """Whether the HPHD rule could apply: then the route waits (briefly) for the prediction."""
        return self.mode == "auto" and self.colocate_heavy_heavy and prompt_tokens > self.heavy_prefill_threshold

    def route(
        self, req: RequestView, prefills: Sequence[InstanceView], has_decode: bool, hosts: Sequence[InstanceView],
        colocated_pool: bool,
    ) -> RouteChoice:
        """`prefills`: usable prefill instances the request may use; `has_decode`: a usable decode
        instance exists; `hosts`: usable decode instances that can run whole requests;
        `colocated_pool`: a usable `colocated` instance exists."""
        if self.mode == "disaggregated":
            return DISAGGREGATED
        on_decode = self.colocate_on_decode and bool(hosts)
        if self.mode == "colocated" or not (prefills and has_decode):
            if not colocated_pool and on_decode:
                return RouteChoice("colocated", "decode", self.pick_host(req, hosts, None), "mode")
            return RouteChoice("colocated", reason="mode")  # no colocated instance either: the driver answers 503
        if (colocated_pool or on_decode) and self.hphd_candidate(req.prompt_tokens) and req.heavy_decode:
            if colocated_pool:
                return RouteChoice("colocated", reason="hphd")
            # On a decode instance only where decode admission would take it anyway.
            host = self.pick_host(req, hosts, "admit")
            if host is not None:
                return RouteChoice("colocated", "decode", host, "hphd")
        if self.colocate_backlog_tokens > 0 and on_decode:
            if min(v.prefill_load for v in prefills) > self.colocate_backlog_tokens:
                host = self.pick_host(req, hosts, "room")
                if host is not None:
                    return RouteChoice("colocated", "decode", host, "backlog")
        return DISAGGREGATED

    def pick_host(self, req: RequestView, hosts: Sequence[InstanceView], test: HostTest) -> str | None:
        """The decode instance to run a request co-located on, among those passing `test` (the room
        test, decode admission, or none), by the `colocate_pick` rule."""
        if test == "room":
            hosts = [h for h in hosts if has_room(h, req)]
        elif test == "admit":
            hosts = [h for h in hosts if self.admission.admits(h, req)]
        return pick_isolated(req, hosts, self.colocate_pick, self.isolation)

    # ---- 2-4. prefill queues ---------------------------------------------------------------------
    def pick_prefill(self, req: RequestView, role: Role, views: Sequence[InstanceView]) -> str | None:
        """Where the request queues: a prefill instance by the global scheduler, or a `colocated`
        one by the co-located host rule (`colocate_pick`: what a plain load balancer does in front
        of co-located engines, or the least prefill work), unless the global scheduler is cache-aware."""
        if role == "prefill" or self.global_scheduler.uses_prefix:
            return self.global_scheduler.pick(views, req)  # a cache-aware scheduler places every pool
        return pick_isolated(req, views, self.colocate_pick, self.isolation)

    def may_release(self, role: Role, in_engine: int, in_engine_tokens: int, chunk_tokens: int) -> bool:
        """Whether one more queued prompt may enter an engine that holds `in_engine` released prompts
        (`in_engine_tokens` of prompt not yet prefilled): always when it holds none; else while less
        than a chunk's worth waits (when the engine reports its chunk size), else while fewer than
        `prefill_engine_backlog` (four times that on engines that batch decodes too). Our queue, not
        the engine's, decides the order."""
        if in_engine == 0:
            return True
        if chunk_tokens > 0:
            return in_engine_tokens < chunk_tokens
        backlog = self.prefill_engine_backlog if role == "prefill" else 4 * self.prefill_engine_backlog
        return in_engine < backlog

    def steal(
        self, thief: InstanceView, queues: Mapping[str, PrefillQueue], avoid: Callable[[str], frozenset[str]],
        views: PairViews | None = None,
    ) -> tuple[str, RequestView] | None:
        """Late binding: the peer queue (of the thief's pool: the driver passes only those) whose next
        prompt the thief takes, and that prompt; None when nothing may move. The driver asks only
        while `may_release` holds for the thief and its own queue is empty. With a cache-aware global
        scheduler the prompt moves only if that scheduler, given the victim and the thief as they
        are for this prompt (`views`: their cached prefix of it folded in), picks the thief: an
        idle peer must not take a session's next turn from the instance that holds its history."""
        queued = {pid: q.queued_prompt_tokens for pid, q in queues.items() if pid != thief.id and len(q)}
        victim = self.late_binding.victim(thief.id, queued) if queued else None
        if victim is None:
            return None
        req = queues[victim].peek()
        if req is None or thief.id in avoid(req.id):
            return None
        if thief.role == "decode" and not self.admission.admits(thief, req):
            return None  # it must pass decode admission there, as it did where it was queued
        if views is not None and thief.role != "decode" and self.global_scheduler.uses_prefix and req.prefix_hashes:
            # (The global scheduler places prefill and co-located pools; a decode pool's hosts, and a
            # victim no longer usable, e.g. draining, are not its to keep: None lets the prompt go.)
            choice = self.global_scheduler.pick(views(req, victim), req)
            if choice is not None and choice != thief.id:
                return None
        return victim, req

    # ---- 5. decode -------------------------------------------------------------------------------
    def pick_decode(self, req: RequestView, views: Sequence[InstanceView], rng: random.Random) -> str | None:
        """The dispatcher's pick, if decode admission takes the request there now; None: wait."""
        chosen = self.dispatcher.pick(views, req, rng)
        if chosen is None:
            return None
        view = next(v for v in views if v.id == chosen)
        return chosen if self.admission.admits(view, req) else None
