"""Live placement: a thin driver of the placement core (orchestrator/policies/core.py) over the
real instances. It builds views (the engines' load reports, with our queues and reservations folded
in), asks the core, and carries out: queues and releases prompts, moves them (late binding), holds
prefill slots and KV reservations. The simulator (orchestrator/sim) drives the same core.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from types import TracebackType

from backends.base import BackendError, Role
from backends.prefix import reusable_tokens
from orchestrator.cluster import Cluster, Instance
from orchestrator.config import Settings
from orchestrator.policies.core import PlacementCore, RouteChoice
from orchestrator.policies.ledger import Hold
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.prefix import PrefixIndex
from orchestrator.policies.types import InstanceView, RequestView

_ADMISSION_POLL_S = 0.02


class Overloaded(Exception):
    """No instance can take the request now: answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PrefillSlot:
    """A prompt released into an instance's engine: held until its first token comes back (or the
    attempt ends), then the instance's queue lets the next one in. `release()` is idempotent."""

    def __init__(self, placement: Placement, instance: Instance, tokens: int) -> None:
        self.placement = placement
        self.instance = instance
        self.tokens = tokens
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.placement._slot_done(self.instance, self.tokens)

    def __enter__(self) -> PrefillSlot:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


class Placement:
    def __init__(self, settings: Settings, cluster: Cluster, seed: int | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.core = PlacementCore.from_knobs(settings)
        self.queues: dict[str, PrefillQueue] = {}
        self.waiters: dict[str, asyncio.Future[PrefillSlot]] = {}
        self.queued_at: dict[str, str] = {}  # request id -> instance id whose queue holds it
        self.avoid: dict[str, frozenset[str]] = {}  # request id -> instances it must not move to
        self.holds: dict[str, Hold] = {}  # request id -> its KV hold at the host it is queued for
        self.steals = 0
        # Which prompt prefixes each instance holds (engine events, else what was routed where).
        self.prefixes = PrefixIndex(ttl_s=settings.prefix_ttl_s)

    # ---- views -----------------------------------------------------------------------------------
    def view(self, inst: Instance, req: RequestView | None = None) -> InstanceView:
        """The instance's load report, reservations included, with our queue for it folded in, and
        (`req` with prefix hashes) the request's prompt tokens cached there."""
        view = inst.view()
        if req is not None and req.prefix_hashes:
            matched = self.prefixes.match(inst.id, req.prefix_hashes, time.monotonic())
            view = replace(view, cached_prompt_tokens=reusable_tokens(req.prompt_tokens, matched))
        queue = self.queues.get(inst.id)
        if queue is None or not len(queue):
            return view
        return replace(view, queued_prompt_tokens=view.queued_prompt_tokens + queue.queued_prompt_tokens,
                       queued=view.queued + len(queue))

    def _views(
        self, role: Role, model: str | None, backend: str | None, exclude: set[str], req: RequestView | None = None
    ) -> list[InstanceView]:
        return [self.view(i, req) for i in self.cluster.usable(role, model, backend) if i.id not in exclude]

    def decode_hosts(self, model: str | None, backend: str | None, exclude: set[str]) -> list[Instance]:
        """Usable decode instances that can run whole requests (prefill + decode) themselves."""
        return [
            i for i in self.cluster.usable("decode", model, backend)
            if i.id not in exclude and i.backend.generates_on_decode
        ]

    # ---- 1. route ----------------------------------------------------------------------------------
    def route(self, req: RequestView, model: str | None, backend: str | None, failed: set[str]) -> RouteChoice:
        """Disaggregated or co-located (and where). A prefill instance this request already failed on
        does not count (one that just died looks healthy until the monitor's next polls); decode
        instances do (acquire_decode falls back to them)."""
        return self.core.route(
            req,
            prefills=self._views("prefill", model, backend, failed, req),
            has_decode=bool(self.cluster.usable("decode", model, backend)),
            hosts=[self.view(i, req) for i in self.decode_hosts(model, backend, failed)],
            colocated_pool=bool(self.cluster.usable("colocated", model, backend)),
        )

    def could_colocate(self, model: str | None, backend: str | None, failed: set[str]) -> bool:
        return bool(self.cluster.usable("colocated", model, backend)) or (
            self.settings.colocate_on_decode and bool(self.decode_hosts(model, backend, failed)))

    # ---- 2-4. prefill queues -------------------------------------------------------------------------
    def queue_of(self, inst: Instance) -> PrefillQueue:
        if inst.id not in self.queues:
            self.queues[inst.id] = make_prefill_queue(
                self.settings.prefill_policy, sched_batch=self.settings.prefill_sched_batch
            )
        return self.queues[inst.id]

    def pick_prefill(
        self, req: RequestView, role: Role, model: str | None, exclude: set[str], backend: str | None = None
    ) -> Instance:
        views = self._views(role, model, backend, exclude, req)
        if not views:
            raise Overloaded(f"no healthy {role} instance for model {model!r}")
        chosen = self.core.pick_prefill(req, role, views)
        if chosen is None:
            raise Overloaded(f"no {role} instance can take the request")
        return self.cluster.instances[chosen]

    async def acquire_prefill(
        self, req: RequestView, role: Role, model: str | None, exclude: set[str] | None = None,
        backend: str | None = None,
    ) -> PrefillSlot:
        """Queue the request at the instance the global scheduler picks; return its slot when released."""
        inst = self.pick_prefill(req, role, model, set(exclude or ()), backend)
        return await self.acquire_at(inst, req, exclude)

    async def acquire_at(
        self, inst: Instance, req: RequestView, exclude: set[str] | None = None, hold: Hold | None = None
    ) -> PrefillSlot:
        """Queue the request at this instance; return the slot of the instance that releases it: this
        one, or (late binding) a peer of its pool that had room first, where `hold` (the request's KV
        reservation on a decode host) moves with it. `exclude`: instances it must not move to."""
        future: asyncio.Future[PrefillSlot] = asyncio.get_running_loop().create_future()
        self.waiters[req.id] = future
        self.avoid[req.id] = frozenset(exclude or ())
        if hold is not None:
            self.holds[req.id] = hold
        self._enqueue(inst, req)
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # released just as we were cancelled
            raise
        finally:
            self.waiters.pop(req.id, None)
            self.avoid.pop(req.id, None)
            self.holds.pop(req.id, None)
            held_by = self.queued_at.pop(req.id, None)
            if held_by is not None and not future.done():
                self.queues[held_by].remove(req.id)  # cancelled while queued: leave no trace

    def _enqueue(self, inst: Instance, req: RequestView) -> None:
        self.queue_of(inst).push(req, time.monotonic())
        self.queued_at[req.id] = inst.id
        self.pump(inst)
        if req.id in self.queued_at:
            # Still waiting here: a peer with room and no queue of its own may take it now.
            for peer in self._pool_of(inst):
                if not len(self.queues.get(peer.id) or ()):
                    self.pump(peer)

    def _pool_of(self, inst: Instance) -> list[Instance]:
        """Its peers that could run what is queued for it: same role, model and backend."""
        return [
            p for p in self.cluster.instances.values()
            if p is not inst and p.role == inst.role and p.model == inst.model and p.spec.backend == inst.spec.backend
        ]

    def _may_release(self, inst: Instance) -> bool:
        chunk = inst.load.chunk_size if inst.load is not None else 0
        return self.core.may_release(inst.role, inst.inflight_prefills, inst.inflight_prefill_tokens, chunk)

    def pump(self, inst: Instance) -> None:
        """Release queued prompts into the engine while the core allows, then (an empty queue) steal."""
        if not inst.usable:
            return
        queue = self.queues.get(inst.id)
        while queue is not None and len(queue) and self._may_release(inst):
            (req,) = queue.pop_ready(time.monotonic(), 0, 1)
            self._release(inst, req)
        if queue is None or not len(queue):
            self._steal(inst)

    def _release(self, inst: Instance, req: RequestView) -> None:
        self.queued_at.pop(req.id, None)
        future = self.waiters.get(req.id)
        if future is None or future.done():
            return
        hold = self.holds.get(req.id)
        if hold is not None:
            hold.move(inst.kv)
        inst.inflight_prefills += 1
        inst.inflight_prefill_tokens += req.prompt_tokens
        if req.prefix_hashes:
            self.prefixes.routed(inst.id, req.prefix_hashes, time.monotonic())
        future.set_result(PrefillSlot(self, inst, req.prompt_tokens))

    def _steal(self, thief: Instance) -> None:
        """Late binding: while the thief's engine has room, it takes the next prompt queued for its
        busiest peer (the core picks; a decode thief must pass decode admission)."""
        peers = {p.id: q for p in self._pool_of(thief) if (q := self.queues.get(p.id)) is not None and len(q)}
        while peers and self._may_release(thief):
            got = self.core.steal(self.view(thief), peers, lambda rid: self.avoid.get(rid, frozenset()),
                                  lambda req, victim: (self.view(self.cluster.instances[victim], req),
                                                       self.view(thief, req)))  # fmt: skip
            if got is None:
                return
            victim, req = got
            peers[victim].remove(req.id)
            self.steals += 1
            self._release(thief, req)
            peers = {pid: q for pid, q in peers.items() if len(q)}

    def _slot_done(self, inst: Instance, tokens: int) -> None:
        """The engine finished this instance's part of a prefill: let the next one in."""
        inst.inflight_prefills = max(0, inst.inflight_prefills - 1)
        inst.inflight_prefill_tokens = max(0, inst.inflight_prefill_tokens - tokens)
        self.pump(inst)

    def pump_all(self) -> None:
        for inst in list(self.cluster.instances.values()):
            if inst.state in ("unhealthy", "removed") and inst.id in self.queues:
                self.replace_queued(inst)
            else:
                self.pump(inst)

    def forget(self, inst: Instance) -> None:
        """The instance changes role or leaves: drop its queue and engine bookkeeping."""
        self.queues.pop(inst.id, None)
        self.prefixes.forget(inst.id)
        inst.inflight_prefills = inst.inflight_prefill_tokens = 0

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
                # Co-located on a decode instance (the route chose it for its room): decide the
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

    # ---- 5-6. decode instance and its KV ---------------------------------------------------------------
    def reserve(self, inst: Instance, req: RequestView) -> Hold:
        return inst.kv.hold(req.id, req.kv_need)

    async def acquire_decode(
        self, req: RequestView, model: str | None, timeout_s: float, backend: str | None = None,
        avoid: set[str] | frozenset[str] = frozenset(),
    ) -> tuple[Instance, Hold]:
        """The core's decode pick (dispatcher, gated by admission) and the KV hold made there; waits
        (bounded) while no decode instance admits. `backend`: the prefill side's, since a KV hand-off
        never crosses backends. `avoid`: instances this request already failed on, used only if no
        other decode instance is usable (one that crashed may still look healthy until the monitor's
        next polls; one that refused the KV for lack of room may be the only decode instance)."""
        deadline = time.monotonic() + timeout_s
        while True:
            usable = self.cluster.usable("decode", model, backend)
            decodes = [d for d in usable if d.id not in avoid] or usable
            if not decodes:
                raise Overloaded(f"no healthy decode instance for model {model!r}")
            chosen = self.core.pick_decode(req, [self.view(d) for d in decodes], self.rng)
            if chosen is not None:
                inst = self.cluster.instances[chosen]
                return inst, self.reserve(inst, req)
            if time.monotonic() >= deadline:
                raise Overloaded("no decode instance has room for the request", retry_after=2.0)
            await asyncio.sleep(_ADMISSION_POLL_S)
