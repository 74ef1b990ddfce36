"""Live placement: the policy objects of orchestrator/policies applied to real instances.

Level 1: the global scheduler picks a prefill (or co-located) instance; that instance's
PrefillQueue holds the request and releases it in policy order while keeping the engine's own
backlog shallow. Until released a request is not bound: an instance of the same pool with room and
an empty queue takes the next one queued for its busiest peer (late binding). The dispatcher then
picks a decode instance, gated by decode admission (the same capacity test as the dispatcher's α).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Literal

from backends.base import BackendError, Role
from orchestrator.cluster import Cluster, Instance
from orchestrator.config import Settings
from orchestrator.policies.admission import make_admission
from orchestrator.policies.dispatch import make_dispatcher
from orchestrator.policies.global_scheduler import make_global_scheduler
from orchestrator.policies.late_binding import make_late_binding
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.types import InstanceView, RequestView

_ADMISSION_POLL_S = 0.02


class Overloaded(Exception):
    """No instance can take the request now: answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Placement:
    def __init__(self, settings: Settings, cluster: Cluster, seed: int | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.global_scheduler = make_global_scheduler("least_loaded")
        self.dispatcher = make_dispatcher(
            settings.dispatch_policy, power_of_d=settings.power_of_d,
            heavy_decode_threshold=settings.heavy_decode_threshold, fallback=settings.dispatch_fallback,
            ratio_objective=settings.dispatch_ratio_objective,
        )
        self.admission = make_admission(settings.decode_admission)
        self.late_binding = make_late_binding(settings.late_binding)
        self.queues: dict[str, PrefillQueue] = {}
        self.waiters: dict[str, asyncio.Future[Instance]] = {}
        self.queued_at: dict[str, str] = {}  # request id -> instance id whose queue holds it
        self.avoid: dict[str, frozenset[str]] = {}  # request id -> instances it must not move to
        self.steals = 0

    # ---- level 1: prefill (or co-located) instance -------------------------------------------
    def queue_of(self, inst: Instance) -> PrefillQueue:
        if inst.id not in self.queues:
            self.queues[inst.id] = make_prefill_queue(
                self.settings.prefill_policy, sched_batch=self.settings.prefill_sched_batch
            )
        return self.queues[inst.id]

    def _prefill_view(self, inst: Instance) -> InstanceView:
        view = inst.view()
        queue = self.queues.get(inst.id)
        queued = queue.queued_prompt_tokens if queue is not None else 0
        return replace(view, queued_prompt_tokens=view.queued_prompt_tokens + queued)

    def pick_prefill(
        self, req: RequestView, role: Role, model: str | None, exclude: set[str], backend: str | None = None
    ) -> Instance:
        candidates = [i for i in self.cluster.usable(role, model, backend) if i.id not in exclude]
        if not candidates:
            raise Overloaded(f"no healthy {role} instance for model {model!r}")
        chosen = self.global_scheduler.pick([self._prefill_view(i) for i in candidates], req)
        if chosen is None:
            raise Overloaded(f"no {role} instance can take the request")
        return self.cluster.instances[chosen]

    async def acquire_prefill(
        self, req: RequestView, role: Role, model: str | None, exclude: set[str] | None = None,
        backend: str | None = None,
    ) -> Instance:
        """Queue the request at the least-loaded instance; return that instance when released."""
        inst = self.pick_prefill(req, role, model, set(exclude or ()), backend)
        return await self.acquire_at(inst, req, exclude)

    async def acquire_at(self, inst: Instance, req: RequestView, exclude: set[str] | None = None) -> Instance:
        """Queue the request at this instance's PrefillQueue; return the instance that releases it:
        this one, or (late binding) a peer of its pool that had room first. `exclude`: instances the
        request must not move to (those it already failed on)."""
        future: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self.waiters[req.id] = future
        self.avoid[req.id] = frozenset(exclude or ())
        self._enqueue(inst, req)
        try:
            return await future
        finally:
            self.waiters.pop(req.id, None)
            self.avoid.pop(req.id, None)
            held_by = self.queued_at.pop(req.id, None)
            if held_by is not None and not future.done():
                # Cancelled while still queued: leave no trace in the queue.
                self.queues[held_by].remove(req.id)

    def _enqueue(self, inst: Instance, req: RequestView) -> None:
        self.queue_of(inst).push(req, time.monotonic())
        self.queued_at[req.id] = inst.id
        self.pump(inst)
        if self.late_binding.name != "none" and req.id in self.queued_at:
            # Still waiting here: a peer with room and no queue of its own may take it now.
            for peer in list(self.cluster.instances.values()):
                if peer is not inst and peer.role == inst.role and not len(self.queues.get(peer.id) or ()):
                    self.pump(peer)

    def pump(self, inst: Instance) -> None:
        if not inst.usable:
            return
        # A co-located engine batches decodes too: let it hold a few more prompts.
        backlog = self.settings.prefill_engine_backlog
        max_backlog = backlog if inst.role == "prefill" else 4 * backlog
        queue = self.queues.get(inst.id)
        if queue is not None and len(queue):
            for req in queue.pop_ready(time.monotonic(), inst.inflight_prefills, max_backlog):
                self._release(inst, req)
        if queue is None or not len(queue):
            self._steal(inst, max_backlog)

    def _release(self, inst: Instance, req: RequestView) -> None:
        self.queued_at.pop(req.id, None)
        future = self.waiters.get(req.id)
        if future is None or future.done():
            return
        inst.inflight_prefills += 1
        future.set_result(inst)

    def _steal(self, thief: Instance, max_backlog: int) -> None:
        """Late binding: while the thief's engine has room, take the next request queued for its
        busiest peer (same role, model and backend: any of them could run it). On a decode instance
        the request must pass decode admission there, as it did where it was queued."""
        if self.late_binding.name == "none":
            return
        while thief.inflight_prefills < max_backlog:
            peers = {
                pid: q for pid, q in self.queues.items()
                if pid != thief.id and len(q) and (peer := self.cluster.instances.get(pid)) is not None
                and peer.role == thief.role and peer.model == thief.model and peer.spec.backend == thief.spec.backend
            }  # fmt: skip
            victim = self.late_binding.victim(thief.id, {pid: q.queued_prompt_tokens for pid, q in peers.items()})
            if victim is None:
                return
            req = peers[victim].peek()
            if req is None or thief.id in self.avoid.get(req.id, ()):
                return
            if thief.role == "decode" and not self.admission.admits(thief.view(), req):
                return
            peers[victim].remove(req.id)
            self.steals += 1
            self._release(thief, req)

    def release_prefill(self, inst: Instance) -> None:
        """The engine finished this instance's part of a prefill: let the next one in."""
        inst.inflight_prefills = max(0, inst.inflight_prefills - 1)
        self.pump(inst)

    def pump_all(self) -> None:
        for inst in list(self.cluster.instances.values()):
            if inst.state in ("unhealthy", "removed") and inst.id in self.queues:
                self.replace_queued(inst)
            else:
                self.pump(inst)

    def replace_queued(self, inst: Instance) -> None:
        """Move the requests still queued at an unhealthy or removed instance elsewhere."""
        queue = self.queues.pop(inst.id, None)
        if queue is None:
            return
        for req in queue.items():
            self.queued_at.pop(req.id, None)
            future = self.waiters.get(req.id)
            if future is None or future.done():
                continue
            if inst.role == "decode":
                # Co-located on a decode instance (the fallback chose it for its room): decide the
                # request's route afresh rather than move it to another decode instance.
                future.set_exception(BackendError(f"{inst.id} left placement; re-placing", 503, retryable=True))
                continue
            try:
                target = self.pick_prefill(req, inst.role, inst.model or None, {inst.id}, inst.spec.backend)
            except Overloaded:
                # No peer in its pool: decide the route afresh (a decode instance with room runs it
                # co-located), as for a new request, rather than refuse work already accepted.
                future.set_exception(BackendError(f"{inst.id} left placement and no {inst.role} instance "
                                                  f"is left; re-placing", 503, retryable=True))
                continue
            self._enqueue(target, req)

    # ---- co-located fallback on decode instances (conditional disaggregation) ------------------
    def prefill_backlog(self, model: str | None, backend: str | None, exclude: set[str]) -> int | None:
        """Prompt tokens ahead of a new request at the least-loaded usable prefill instance (our
        queue + its queued and running prompts); None when there is no such instance."""
        views = [self._prefill_view(i) for i in self.cluster.usable("prefill", model, backend) if i.id not in exclude]
        return min((v.prefill_load for v in views), default=None)

    def decode_hosts(self, model: str | None, backend: str | None, exclude: set[str]) -> list[Instance]:
        """Usable decode instances that can run whole requests (prefill + decode) themselves."""
        return [
            i for i in self.cluster.usable("decode", model, backend)
            if i.id not in exclude and i.backend.generates_on_decode
        ]

    def has_room(self, inst: Instance, req: RequestView) -> bool:
        """The adaptive fallback's test (the simulator's): nothing waits there (engine queue or our
        queue) and its free KV after reservations covers 20% of the pool plus this prompt."""
        view = inst.view()
        queue = self.queues.get(inst.id)
        if view.queued > 0 or (queue is not None and len(queue) > 0) or view.total_kv_tokens <= 0:
            return False
        return view.free_kv_tokens - view.reserved_kv_tokens >= 0.2 * view.total_kv_tokens + req.prompt_tokens

    def pick_decode_host(
        self, req: RequestView, model: str | None, backend: str | None, exclude: set[str],
        test: Literal["room", "admit"] | None,
    ) -> Instance | None:
        """The decode instance to run a request co-located on: among those passing `test` (the
        adaptive fallback's room test, decode admission, or none), the one with the least prefill
        load (prompt tokens queued or prefilling there + in our queue for it: the global scheduler's
        least-loaded rule, since that is what the new prompt waits behind), then the fewest
        outstanding requests (running + queued there + in our queue + released to it), then the most
        available KV, then id. None when none passes."""
        hosts = self.decode_hosts(model, backend, exclude)
        if test == "room":
            hosts = [h for h in hosts if self.has_room(h, req)]
        elif test == "admit":
            hosts = [h for h in hosts if self.admission.admits(h.view(), req)]

        def key(inst: Instance) -> tuple[int, int, int, str]:
            view = self._prefill_view(inst)
            queue = self.queues.get(inst.id)
            outstanding = view.running + view.queued + (len(queue) if queue is not None else 0) + inst.inflight_prefills
            return view.prefill_load, outstanding, -(view.free_kv_tokens - view.reserved_kv_tokens), inst.id

        return min(hosts, key=key, default=None)

    def reserve_kv(self, inst: Instance, req: RequestView) -> None:
        inst.reserved_kv_tokens += req.kv_need

    # ---- decode instance ---------------------------------------------------------------------
    async def acquire_decode(
        self, req: RequestView, model: str | None, timeout_s: float, backend: str | None = None,
        avoid: set[str] | frozenset[str] = frozenset(),
    ) -> Instance:
        """Dispatcher pick, gated by admission; waits (bounded) while no decode instance admits.
        `backend`: the prefill side's backend, since a KV handoff never crosses backends. `avoid`:
        instances this request already failed on, used only if no other decode instance is usable
        (one that crashed may still look healthy until the monitor's next polls; one that refused
        the KV for lack of room may be the only decode instance there is)."""
        deadline = time.monotonic() + timeout_s
        while True:
            usable = self.cluster.usable("decode", model, backend)
            decodes = [d for d in usable if d.id not in avoid] or usable
            if not decodes:
                raise Overloaded(f"no healthy decode instance for model {model!r}")
            views = [d.view() for d in decodes]
            chosen = self.dispatcher.pick(views, req, self.rng)
            if chosen is not None:
                view = next(v for v in views if v.id == chosen)
                if self.admission.admits(view, req):
                    inst = self.cluster.instances[chosen]
                    self.reserve_kv(inst, req)
                    return inst
            if time.monotonic() >= deadline:
                raise Overloaded("no decode instance has room for the request", retry_after=2.0)
            await asyncio.sleep(_ADMISSION_POLL_S)

    def release_decode_reservation(self, inst: Instance, req: RequestView) -> None:
        inst.reserved_kv_tokens = max(0, inst.reserved_kv_tokens - req.kv_need)
