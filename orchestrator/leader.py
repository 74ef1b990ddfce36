"""Several orchestrator replicas on one store: who leads, who is alive, which instances are shared.

Every replica serves requests. The loops that must run once in the deployment (the flip policy,
the automatic planner and its pool scaling, recovery of dead replicas' requests) run only on the
leader: the replica holding the ``leader`` lease row (orchestrator/store/leases.py), which it renews
every ``renew_s``; the lease lasts ``lease_s``. A leader that dies stops renewing; a follower takes
the lease on its first claim after expiry: within ``lease_s + renew_s`` (3 s + 1 s by default).
A leader that cannot reach the database stops calling itself leader ``lease_s`` after its last
successful claim began, before any follower can take over (the lease expires later, in the
database's clock, than the claim's start in ours).

Alongside, every replica renews its heartbeat row; the leader fails the in-flight requests of a
replica whose heartbeat is older than ``replica_timeout_s`` (``Store.recover_dead_replicas``).

``InstanceSync`` keeps the replicas' clusters alike: the store's instance table is the shared
registry, and every replica reads it every ``instance_sync_s``: it registers healthy instances it
does not drive yet (registered through a peer's admin API or a peer's pool provider), forgets the
ones a peer deregistered, and claims back rows a stopped or dead peer marked ``unknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.cluster import Cluster, Instance
from orchestrator.config import InstanceSpec
from orchestrator.store import Store

log = logging.getLogger("tetri.leader")

LEADER_LEASE = "leader"
# Option names that hold credentials: never written to the store; each replica's configuration has them.
_SECRET_WORDS = ("key", "token", "secret", "password", "credential")
DEAD_REPLICA_ERROR = "the orchestrator replica serving the request stopped answering"


def shareable_options(options: dict[str, Any]) -> dict[str, Any]:
    """An instance's adapter options as the store keeps them for the other replicas: no credentials."""
    return {k: v for k, v in options.items() if not any(w in k.lower() for w in _SECRET_WORDS)}


class ReplicaIdInUse(RuntimeError):
    """Another live process runs with this replica id."""


class Leader:
    """This replica's heartbeat and its claim on the leader lease, renewed together every ``renew_s``.

    ``is_leader`` is what the once-only loops ask before they act; ``on_change`` hooks are called
    with the new value when it changes; ``duties`` run after every claim while leader."""

    def __init__(
        self,
        store: Store,
        replica_id: str,
        *,
        lease_s: float = 3.0,
        renew_s: float = 1.0,
        replica_timeout_s: float = 6.0,
        name: str = LEADER_LEASE,
    ) -> None:
        if not 0 < renew_s < lease_s:
            raise ValueError(f"renew_s ({renew_s}) must be positive and shorter than lease_s ({lease_s})")
        self.store = store
        self.replica_id = replica_id
        self.token = uuid.uuid4().hex  # this process: a restart with the same id is a new holder
        self.name = name
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.replica_timeout_s = replica_timeout_s
        self.host = f"{socket.gethostname()}:{os.getpid()}"
        self.on_change: list[Callable[[bool], None]] = []
        self.duties: list[Callable[[], Awaitable[None]]] = []
        self.term = 0
        self._held = False
        self._valid_until = 0.0  # monotonic: past it we no longer call ourselves leader
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._held and time.monotonic() < self._valid_until

    async def join(self) -> None:
        """Record this replica as live. A previous run of the same id that died leaves a heartbeat
        that expires within ``replica_timeout_s``: wait that long, then refuse to start (two live
        replicas with one id would fail each other's requests at start)."""
        deadline = time.monotonic() + self.replica_timeout_s + self.renew_s
        while not await asyncio.to_thread(
            self.store.join_replicas, self.replica_id, self.token, self.host, self.replica_timeout_s
        ):
            if time.monotonic() > deadline:
                raise ReplicaIdInUse(f"replica id {self.replica_id!r} is in use by a live orchestrator; "
                                     "give each replica its own replica_id (TETRI_REPLICA_ID)")  # fmt: skip
            log.warning("replica id %r has a live heartbeat: waiting for it to expire", self.replica_id)
            await asyncio.sleep(self.renew_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tetri-leader")

    async def stop(self) -> None:
        """Stop renewing; give the lease up at once so a peer takes over on its next claim."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        held = self._held
        self._set(False)
        with contextlib.suppress(Exception):
            if held:
                await asyncio.to_thread(self.store.release_lease, self.name, self.token)
            await asyncio.to_thread(self.store.leave_replicas, self.replica_id, self.token)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.tick()
            await asyncio.sleep(max(0.0, self.renew_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        """One renewal: heartbeat, claim, then the leader's duties."""
        started = time.monotonic()
        try:
            if not await asyncio.to_thread(self.store.heartbeat, self.replica_id, self.token):
                log.warning("replica %s had lost its heartbeat row (declared dead?): joining again", self.replica_id)
                await asyncio.to_thread(
                    self.store.join_replicas, self.replica_id, self.token, self.host, self.replica_timeout_s
                )
            lease = await asyncio.to_thread(self.store.claim_lease, self.name, self.replica_id, self.token,
                                            self.lease_s)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the database is away: keep what time allows
            log.warning("leader lease renewal failed: %s", exc)
            if not self.is_leader:
                self._set(False)
            return
        if lease.held:
            self._valid_until = started + self.lease_s
            self.term = lease.term
        self._set(lease.held)
        if self.is_leader:
            for duty in self.duties:
                try:
                    await duty()
                except Exception:  # noqa: BLE001 - one failed duty must not stop the renewals
                    log.exception("leader duty failed")

    def _set(self, held: bool) -> None:
        if held == self._held:
            return
        self._held = held
        log.info("replica %s %s the leader (term %d)", self.replica_id, "is now" if held else "is no longer", self.term)
        for hook in self.on_change:
            try:
                hook(held)
            except Exception:  # noqa: BLE001
                log.exception("leader on_change hook failed")


class InstanceSync:
    """Every replica drives the instances of the store's instance table (see the module docstring).

    ``register`` is the app's registration (health check included); ``forget`` drops an instance
    from this replica only (a peer already drained and deregistered it); ``claim`` re-saves an
    instance's row under this replica."""

    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        register: Callable[[InstanceSpec], Awaitable[Any]],
        forget: Callable[[Instance], Awaitable[None]],
        claim: Callable[[Instance], None],
        interval_s: float = 2.0,
        retry_s: float = 30.0,
    ) -> None:
        self.store, self.cluster = store, cluster
        self._register, self._forget, self._claim = register, forget, claim
        self.interval_s = interval_s
        self.retry_s = retry_s  # an instance this replica could not register is tried again after this
        self.registered_at: dict[str, float] = {}  # wall clock: compared with rows' updated_at
        # Deregistered here: a row older than that (its "removed" save not yet written behind) is
        # no peer's registration and must not bring the instance back.
        self.removed_at: dict[str, float] = {}
        self._failed: dict[str, float] = {}
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tetri-instance-sync")

    async def stop(self) -> None:
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the database is away: next time
                log.exception("instance sync failed")

    async def tick(self) -> None:
        rows = await asyncio.to_thread(self.store.list_instances)
        now = time.time()
        for row in rows:
            iid, state = row["id"], row["state"]
            if iid in self._busy:
                continue
            inst = self.cluster.get(iid)
            if inst is None:
                if state != "healthy" or not row["url"] or self.cluster.by_url(row["url"]) is not None:
                    continue
                if (row.get("updated_at") or 0.0) <= self.removed_at.get(iid, 0.0):
                    continue
                if now - self._failed.get(iid, 0.0) < self.retry_s:
                    continue
                spec = InstanceSpec(url=row["url"], backend=row["backend"] or "native", role=row["role"] or "colocated",
                                    model=row["model"], id=iid, options=row.get("options") or {})  # fmt: skip
                self._spawn(iid, self._add(spec))
            elif state == "removed" and row["updated_at"] > self.registered_at.get(iid, 0.0):
                self._spawn(iid, self._forget(inst))
            elif state == "unknown" and inst.state == "healthy":
                self._claim(inst)  # a peer stopped or died: this replica still drives it

    async def _add(self, spec: InstanceSpec) -> None:
        try:
            await self._register(spec)
            log.info("instance %s registered from the store (a peer registered it)", spec.id)
        except Exception as exc:  # noqa: BLE001 - unreachable from here, conflict, bad row
            assert spec.id is not None
            self._failed[spec.id] = time.time()
            log.warning("instance %s from the store not registered here: %s", spec.id, exc)

    def _spawn(self, iid: str, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            finally:
                self._busy.discard(iid)

        self._busy.add(iid)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
