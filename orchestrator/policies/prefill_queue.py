"""Level-2 prefill scheduling: one ``PrefillQueue`` in front of each prefill (or co-located) engine.

TetriInfer §3.3.1: FCFS, SJF (ascending prompt length) or LJF (descending), all non-preemptive, with
the anti-starvation knob ``PrefillSchedBatch``: only that many queued requests, taken in arrival
order, are sorted at a time, and a sorted batch is released completely before the next one is
formed. A request therefore waits at most for the requests of its own batch and of the batches
formed before it: SJF can never push a long prompt back indefinitely.

``pop_ready`` releases requests into the engine only while the engine's own backlog is below
``max_backlog``, so the engine never holds a deep queue of its own and *our* order decides.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from orchestrator.policies.registry import lookup, names, register
from orchestrator.policies.types import RequestView


@dataclass(frozen=True)
class _Entry:
    req: RequestView
    seq: int  # push order: the final tie-break, so equal keys keep arrival order
    pushed_at: float

    @property
    def arrival_key(self) -> tuple[float, int]:
        return (self.req.arrival, self.seq)


@register("prefill_policy", "fcfs")
def _fcfs_key(e: _Entry) -> tuple[float, float, int]:
    return (0.0, e.req.arrival, e.seq)


@register("prefill_policy", "sjf")
def _sjf_key(e: _Entry) -> tuple[float, float, int]:
    return (float(e.req.prompt_tokens), e.req.arrival, e.seq)


@register("prefill_policy", "ljf")
def _ljf_key(e: _Entry) -> tuple[float, float, int]:
    return (-float(e.req.prompt_tokens), e.req.arrival, e.seq)


PREFILL_POLICY_NAMES: tuple[str, ...] = names("prefill_policy")


class PrefillQueue:
    """Requests waiting for one prefill engine, released in policy order, one sorted batch at a time.

    * ``push(req, now)``: enqueue. The raw queue is kept in arrival order (``req.arrival``, then push
      order), so a request re-placed here from a failed instance keeps its place by age.
    * ``pop_ready(now, engine_backlog, max_backlog)``: release up to ``max_backlog - engine_backlog``
      requests. When the current batch is empty, the next batch is formed from the (at most)
      ``sched_batch`` oldest raw requests and sorted by the policy.
    * ``peek()``: the request ``pop_ready`` would release next, left in place (late binding looks
      before it takes).
    * ``remove(request_id)``: take a request out (abort, re-placement); returns it or ``None``.

    Waiting time is measured on the injected clock from ``push`` to release (``now`` values of the
    same clock), and summarised in ``released``, ``total_wait_s``, ``max_wait_s`` and ``last_waits``.
    """

    def __init__(self, policy: str = "fcfs", sched_batch: int = 16) -> None:
        if sched_batch < 1:
            raise ValueError(f"prefill_sched_batch must be >= 1, got {sched_batch}")
        self.policy: str = policy
        self.sched_batch = int(sched_batch)
        self._key: Callable[[_Entry], tuple[float, float, int]] = lookup("prefill_policy", policy)
        self._raw: list[_Entry] = []  # sorted by arrival_key
        self._raw_keys: list[tuple[float, int]] = []
        self._batch: list[_Entry] = []  # current sorted batch, next to release first
        self._seq = itertools.count()
        self._ids: set[str] = set()
        # statistics on the injected clock
        self.released = 0
        self.total_wait_s = 0.0
        self.max_wait_s = 0.0
        self.last_waits: dict[str, float] = {}  # wait of the requests of the latest pop_ready call
        self.batches_formed = 0

    # ---- mutation ----------------------------------------------------------------------------
    def push(self, req: RequestView, now: float) -> None:
        if req.id in self._ids:
            raise ValueError(f"request {req.id!r} is already queued")
        entry = _Entry(req=req, seq=next(self._seq), pushed_at=now)
        pos = bisect.bisect_right(self._raw_keys, entry.arrival_key)
        self._raw.insert(pos, entry)
        self._raw_keys.insert(pos, entry.arrival_key)
        self._ids.add(req.id)

    def _form_batch(self) -> None:
        take = self._raw[: self.sched_batch]
        del self._raw[: self.sched_batch]
        del self._raw_keys[: self.sched_batch]
        self._batch = sorted(take, key=self._key)
        self.batches_formed += 1

    def pop_ready(self, now: float, engine_backlog: int, max_backlog: int) -> list[RequestView]:
        """Release at most ``max(0, max_backlog - engine_backlog)`` requests, in policy order."""
        room = max(0, int(max_backlog) - int(engine_backlog))
        out: list[RequestView] = []
        self.last_waits = {}
        while room > 0:
            if not self._batch:
                if not self._raw:
                    break
                self._form_batch()
            entry = self._batch.pop(0)
            self._ids.discard(entry.req.id)
            wait = max(0.0, now - entry.pushed_at)
            self.released += 1
            self.total_wait_s += wait
            self.max_wait_s = max(self.max_wait_s, wait)
            self.last_waits[entry.req.id] = wait
            out.append(entry.req)
            room -= 1
        return out

    def peek(self) -> RequestView | None:
        """The request ``pop_ready`` would release next (if nothing arrives first), left in place."""
        if self._batch:
            return self._batch[0].req
        if not self._raw:
            return None
        return min(self._raw[: self.sched_batch], key=self._key).req

    def remove(self, request_id: str) -> RequestView | None:
        if request_id not in self._ids:
            return None
        self._ids.discard(request_id)
        for i, e in enumerate(self._batch):
            if e.req.id == request_id:
                del self._batch[i]
                return e.req
        for i, e in enumerate(self._raw):
            if e.req.id == request_id:
                del self._raw[i]
                del self._raw_keys[i]
                return e.req
        return None  # pragma: no cover - _ids and the lists are kept in step

    # ---- inspection --------------------------------------------------------------------------
    def items(self) -> list[RequestView]:
        """Queued requests in the order they would be released if no more arrived before the
        current batch drains (current batch, then the rest in arrival order)."""
        return [e.req for e in self._batch] + [e.req for e in self._raw]

    def __iter__(self) -> Iterator[RequestView]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self._batch) + len(self._raw)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(e.req.prompt_tokens for e in self._batch) + sum(e.req.prompt_tokens for e in self._raw)

    @property
    def current_batch(self) -> list[RequestView]:
        return [e.req for e in self._batch]

    @property
    def mean_wait_s(self) -> float:
        return self.total_wait_s / self.released if self.released else 0.0

    def pushed_at(self, request_id: str) -> float | None:
        for e in itertools.chain(self._batch, self._raw):
            if e.req.id == request_id:
                return e.pushed_at
        return None


def make_prefill_queue(policy: str = "fcfs", sched_batch: int = 16) -> PrefillQueue:
    return PrefillQueue(policy, sched_batch=sched_batch)
