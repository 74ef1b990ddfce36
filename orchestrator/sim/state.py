"""The simulator's state: one ``SimRequest`` per request, one ``SimInstance`` per engine instance,
and the ``SimResult`` of a run.

Fast bookkeeping: a decode batch is never iterated per token. An instance counts its decode steps,
keeps the running KV sum and a heap of finish steps; a request records the step it joined at, so
its generated tokens are ``generated_at_join + step - step_at_join``.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from orchestrator.policies.prefill_queue import PrefillQueue
from orchestrator.policies.types import RequestView
from orchestrator.sim.prefix import SimPrefixCache


class SimRequest:
    __slots__ = (
        "index", "id", "arrival", "prompt_tokens", "output_tokens", "cls", "view", "predicted_lo",
        "heavy_decode", "kv_need", "prefill_len", "prefilled", "generated", "generated_at_join",
        "kv_at_join", "step_at_join", "epoch", "t_first", "t_finish", "t_dispatch", "t_decode",
        "prefill_at", "decode_at", "preemptions", "colocated", "failed", "blocks", "cached", "after", "think_s",
    )  # fmt: skip

    def __init__(self, index: int, rid: str, arrival: float, prompt: int, output: int, cls: str) -> None:
        self.index = index  # position in arrival order
        self.id = rid
        self.arrival = arrival
        self.prompt_tokens = prompt
        self.output_tokens = output  # the answer's true length (the workload's)
        self.cls = cls  # the workload's class label (e.g. LPHD), for reports
        self.view: RequestView | None = None  # what the policies see (predicted bucket included)
        self.predicted_lo = 0  # the predictor's lower bound on the output length
        self.heavy_decode = False  # predicted heavy decode (the dispatcher's heavy/light)
        self.kv_need = 0  # KV tokens decode admission reserves for it
        self.prefill_len = prompt  # tokens to prefill: the prompt, or prompt + generated after a recompute
        self.prefilled = 0  # tokens of prefill_len prefilled so far
        self.generated = 0  # tokens generated when it last joined a decode batch (or finished)
        self.generated_at_join = 0  # generated when it joined its current decode batch
        self.kv_at_join = 0  # its KV tokens when it joined that batch (grows one per step)
        self.step_at_join = 0  # the instance's decode step when it joined
        self.epoch = 0  # bumped on preemption: heap entries of an older epoch are stale
        self.t_first = -1.0  # first token (-1: not yet)
        self.t_finish = -1.0
        self.t_dispatch = -1.0  # sent to a decode instance (disaggregated)
        self.t_decode = -1.0  # first joined a decode batch
        self.prefill_at = -1  # index of the instance that prefills it
        self.decode_at = -1  # index of the instance that decodes it
        self.preemptions = 0  # times its KV was dropped for a recompute
        self.colocated = False  # prefilled on its decode instance (fallback) rather than disaggregated
        self.failed = False  # can never run (longer than an instance's KV, or empty)
        # Prefix caching (prefix.py): ids of the full blocks of prompt + answer (equal ids, equal
        # prefixes); the prompt tokens its prefill reused; a session's next turn arrives `think_s`
        # after the turn `after` finished.
        self.blocks: tuple[int, ...] = ()
        self.cached = 0
        self.after: str | None = None
        self.think_s = 0.0


class SimInstance:
    __slots__ = (
        "index", "id", "role", "kv_capacity", "busy", "in_flight", "step", "running_kv", "kv_staged",
        "running", "finish_heap", "remaining_heap", "heap_seq", "waiting", "prefilling", "incoming",
        "prefill_queue", "colocated_queue", "in_engine", "in_engine_tokens", "held", "link_free_at",
        "heavy_decodes", "reserved_kv", "draining", "to_role", "busy_s", "iterations",
        "queued_prompt_tokens", "flips", "cache",
    )  # fmt: skip

    def __init__(self, index: int, role: str, kv_capacity: int) -> None:
        self.index = index
        self.id = f"i{index}"
        self.role = role  # colocated | prefill | decode
        self.kv_capacity = kv_capacity  # KV tokens the instance holds
        self.busy = False  # an iteration (or a flip) is under way
        self.in_flight: tuple[list, int] | None = None  # the iteration under way: ([(req, chunk)], decodes)
        self.step = 0  # decode iterations run so far
        self.running_kv = 0  # KV tokens of the running decode batch
        self.kv_staged = 0  # KV tokens held outside that batch: prefilling, awaiting transfer, imported
        self.running: dict[int, SimRequest] = {}  # the decode batch, by request index, in join order
        # (finish step, seq, epoch, request) of running decodes
        self.finish_heap: list[tuple[int, int, int, SimRequest]] = []
        # (predicted_lo - generated_at_join + step_at_join, seq, epoch, request): remaining = key - step
        self.remaining_heap: list[tuple[int, int, int, SimRequest]] = []
        self.heap_seq = 0  # tie-break of both heaps
        self.waiting: deque[SimRequest] = deque()  # need a (re)prefill here (co-located, fallback, recompute)
        self.prefilling: list[SimRequest] = []  # admitted, partially prefilled (chunked)
        self.incoming: deque[SimRequest] = deque()  # KV arrived (decode role), joins at the next pass
        self.prefill_queue: PrefillQueue | None = None  # prefill role: the policy's queue
        # decode role: co-located prompts not yet taken into `waiting`, in the prefill policy's order
        self.colocated_queue: PrefillQueue | None = None
        self.in_engine: list[SimRequest] = []  # prefill role: released by the queue, in scheduler order
        self.in_engine_tokens = 0  # prompt tokens of in_engine left to prefill
        self.held: deque[SimRequest] = deque()  # prefilled, waiting for a decode instance
        self.link_free_at = 0.0  # when its KV link finishes the transfers already sent
        self.heavy_decodes = 0  # running requests predicted heavy
        self.reserved_kv = 0  # KV tokens reserved for transfers on their way here
        self.draining = False  # flipping: takes no new work
        self.to_role: str | None = None  # the role it is flipping to
        self.busy_s = 0.0  # seconds of iterations run
        self.iterations = 0
        self.queued_prompt_tokens = 0  # prompt tokens queued here (co-located / prefill queue)
        self.flips = 0
        self.cache: SimPrefixCache | None = None  # its prefix cache, when the system has one

    @property
    def kv_used(self) -> int:
        return self.running_kv + self.kv_staged

    def has_work(self) -> bool:
        return bool(
            self.running or self.waiting or self.prefilling or self.incoming or self.in_engine
            or (self.prefill_queue is not None and len(self.prefill_queue))
            or (self.colocated_queue is not None and len(self.colocated_queue))
        )  # fmt: skip

    @property
    def n_waiting(self) -> int:
        return len(self.waiting) + (len(self.colocated_queue) if self.colocated_queue is not None else 0)

    def join(self, r: SimRequest, now: float, track_remaining: bool) -> None:
        """r starts decoding here (its KV, `r.prefill_len` tokens, is already staged)."""
        self.kv_staged -= r.prefill_len
        self.running_kv += r.prefill_len
        r.kv_at_join = r.prefill_len
        r.step_at_join = self.step
        r.generated_at_join = r.generated
        if r.t_decode < 0:
            r.t_decode = now
        self.running[r.index] = r
        if r.heavy_decode:
            self.heavy_decodes += 1
        self.heap_seq += 1
        heapq.heappush(self.finish_heap, (self.step + r.output_tokens - r.generated, self.heap_seq, r.epoch, r))
        if track_remaining:
            entry = (r.predicted_lo - r.generated + self.step, self.heap_seq, r.epoch, r)
            heapq.heappush(self.remaining_heap, entry)

    def leave(self, r: SimRequest) -> None:
        """r leaves the decode batch (finished or preempted): its KV is freed."""
        del self.running[r.index]
        self.running_kv -= r.kv_at_join + self.step - r.step_at_join
        if r.heavy_decode:
            self.heavy_decodes -= 1


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


def request_record(r: SimRequest) -> dict[str, Any]:
    """One request's line of a SimResult (the keys bench/metrics.py reads)."""
    ok = r.t_finish >= 0 and not r.failed
    return {
        "id": r.id,
        "cls": r.cls,
        "arrival": r.arrival,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "ttft_s": (r.t_first - r.arrival) if r.t_first >= 0 else None,
        "jct_s": (r.t_finish - r.arrival) if ok else None,
        "tpot_s": ((r.t_finish - r.t_first) / (r.output_tokens - 1)) if ok and r.output_tokens > 1 else None,
        "finish": r.t_finish if ok else None,
        "error": None if ok else "not finished",
        "preemptions": r.preemptions,
        "colocated": r.colocated,
        "predicted_lo": r.predicted_lo,
        "p_inst": r.prefill_at,
        "d_inst": r.decode_at,
        "decode_wait_s": (r.t_decode - r.t_first) if r.t_decode >= 0 and r.t_first >= 0 else None,
        "cached_tokens": r.cached,
    }
