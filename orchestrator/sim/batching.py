"""Iteration forming: what one simulated instance runs in its next forward pass.

* ``form_vllm``: vLLM-v0 local scheduling (the ``colocated-vllm`` system): prefill-first whole prompts
  (at most ``max_batched_tokens`` per pass, decodes stall meanwhile), greedy KV admission with a
  watermark, preemption by recompute (newest first).
* ``form_hybrid``: Sarathi-Serve stall-free batching (``colocated-sarathi``, and every decode
  instance: incoming KV, co-located fallbacks and recomputes): running decodes first, then partial
  prefills, then new prompts, within a token budget (the prefill knee).
* ``form_prefill``: a prefill instance: prompts released by its policy queue, chunked at the knee.

A batch is ``([(request, prefill tokens this pass)], decoding sequences, their total context)``, or
None when there is nothing to run.
"""

from __future__ import annotations

from backends.engines.simulated.timing import TimingModel
from orchestrator.sim.config import SystemConfig
from orchestrator.sim.placement import SimPlacement
from orchestrator.sim.state import SimInstance, SimRequest

Batch = tuple[list[tuple[SimRequest, int]], int, int]
_MIN_PREFILL = 32  # tokens a budgeted pass still prefills, however long its decodes take


class Batcher:
    def __init__(self, cfg: SystemConfig, chunk: int, placement: SimPlacement, timing: TimingModel) -> None:
        self.cfg = cfg
        self.chunk = chunk  # prefill tokens per pass (the knee)
        self.placement = placement  # admission of co-located prompts, late-binding steals
        self.timing = timing
        self.preemptions = 0
        self._step_budget: dict[tuple[int, int], int] = {}  # (decodes, context // 1024) -> prefill tokens

    def prefill_budget(self, nrun: int, ctx: int) -> int:
        """Prefill tokens a hybrid pass may carry beside `nrun` decodes: the chunk, or, with
        `step_budget_ms`, as many as keep the pass within that time (Sarathi-Serve's budget from the
        TBT SLO), and at least `_MIN_PREFILL` so that prompts still advance."""
        budget = self.chunk - nrun
        target = self.cfg.step_budget_ms
        if target is None or nrun == 0:
            return budget
        key = (nrun, ctx // 1024)
        got = self._step_budget.get(key)
        if got is None:
            tm, limit_s, ctx_q = self.timing, target / 1000.0, key[1] * 1024 + 512
            lo, hi = 0, max(0, budget)
            while lo < hi:  # the most tokens whose pass fits the target (pass time grows with tokens)
                mid = (lo + hi + 1) // 2
                if tm.iter_s(mid, float(mid * mid), 1, nrun, ctx_q) <= limit_s:
                    lo = mid
                else:
                    hi = mid - 1
            got = self._step_budget[key] = lo
        return min(budget, max(got, _MIN_PREFILL))

    def form(self, inst: SimInstance, now: float) -> Batch | None:
        if inst.role == "prefill":
            return self.form_prefill(inst, now)
        if inst.role == "colocated" and self.cfg.batching == "vllm":
            return self.form_vllm(inst)
        return self.form_hybrid(inst, now)

    def preempt_for(self, inst: SimInstance, extra: int) -> None:
        """Free KV (newest running first, recompute later) until `extra` new tokens fit."""
        while inst.running and inst.running_kv + inst.kv_staged + extra > inst.kv_capacity:
            r = inst.running[next(reversed(inst.running))]
            generated = r.generated_at_join + inst.step - r.step_at_join
            inst.leave(r)
            r.epoch += 1
            r.generated = generated
            r.prefill_len = r.prompt_tokens + generated
            r.prefilled = 0
            r.preemptions += 1
            self.preemptions += 1
            inst.waiting.appendleft(r)
            inst.queued_prompt_tokens += r.prefill_len
            extra -= 1

    def form_vllm(self, inst: SimInstance) -> Batch | None:
        cfg = self.cfg
        if inst.waiting:
            budget = cfg.max_batched_tokens
            limit = inst.kv_capacity * (1.0 - cfg.watermark)
            pf = []
            nseq = len(inst.running)
            while inst.waiting and nseq < cfg.max_num_seqs:
                r = inst.waiting[0]
                if r.prefill_len > budget or inst.running_kv + inst.kv_staged + r.prefill_len > limit:
                    break
                inst.waiting.popleft()
                inst.queued_prompt_tokens -= r.prefill_len
                inst.kv_staged += r.prefill_len
                reuse_cached(inst, r)
                budget -= r.prefill_len - r.prefilled
                nseq += 1
                inst.prefilling.append(r)
                pf.append((r, r.prefill_len - r.prefilled))
            if pf:
                return pf, 0, 0
        if not inst.running:
            return None
        self.preempt_for(inst, len(inst.running))
        if not inst.running:
            return self.form_vllm(inst) if inst.waiting else None
        return [], len(inst.running), inst.running_kv

    def form_hybrid(self, inst: SimInstance, now: float) -> Batch | None:
        """Stall-free batching (Sarathi): decodes, then partial prefills, then new prompts, all within
        the token budget. Decode instances use it for incoming KV, fallbacks and recomputes."""
        cfg = self.cfg
        while inst.incoming and len(inst.running) < cfg.max_num_seqs:
            inst.join(inst.incoming.popleft(), now, self.placement.track_remaining)
        nrun = len(inst.running)
        if nrun:
            self.preempt_for(inst, nrun)
            nrun = len(inst.running)
        budget = self.prefill_budget(nrun, inst.running_kv)
        pf = []
        for r in inst.prefilling:
            if budget <= 0:
                break
            c = min(r.prefill_len - r.prefilled, budget)
            pf.append((r, c))
            budget -= c
        gate = inst.role == "decode"
        admission = self.placement.core.admission
        while budget > 0 and self._next_waiting(inst, now) and nrun + len(inst.prefilling) < cfg.max_num_seqs:
            r = inst.waiting[0]
            if inst.running_kv + inst.kv_staged + r.prefill_len + nrun > inst.kv_capacity:
                break
            if gate and r.preemptions == 0 and not admission.admits(self.placement.decode_view(inst), r.view):
                break  # a co-located fallback passes the same decode admission as a dispatched request
            inst.waiting.popleft()
            inst.queued_prompt_tokens -= r.prefill_len
            inst.kv_staged += r.prefill_len
            reuse_cached(inst, r)
            inst.prefilling.append(r)
            c = min(r.prefill_len - r.prefilled, budget)
            pf.append((r, c))
            budget -= c
        if not pf and not nrun:
            return None
        return pf, nrun, inst.running_kv

    def _next_waiting(self, inst: SimInstance, now: float) -> bool:
        """Recomputes first (in `waiting`), then co-located prompts released by the instance's queue,
        then (late binding) the next co-located prompt queued for the busiest peer, if it fits here."""
        if not inst.waiting:
            if inst.colocated_queue is not None and len(inst.colocated_queue):
                while len(inst.colocated_queue) and self.placement.may_release(inst):
                    for v in inst.colocated_queue.pop_ready(now, 0, 1):
                        inst.waiting.append(self.placement.queued.pop(v.id))
            elif inst.role in ("decode", "colocated") and not inst.draining:
                self.placement.steal_colocated(inst, now)
        return bool(inst.waiting)

    def form_prefill(self, inst: SimInstance, now: float) -> Batch | None:
        q = inst.prefill_queue
        assert q is not None
        queued = self.placement.queued
        # Release from the policy queue into the engine until a chunk's worth of tokens is waiting.
        while len(q) and self.placement.may_release(inst):
            got = q.pop_ready(now, len(inst.in_engine), len(inst.in_engine) + 1)
            if not got:
                break
            for v in got:
                r = queued.pop(v.id)
                inst.queued_prompt_tokens -= r.prompt_tokens
                inst.in_engine.append(r)
                inst.in_engine_tokens += r.prefill_len
        while not len(q) and self.placement.may_release(inst) and not inst.draining:
            n = len(inst.in_engine)
            self.placement.steal_prefill(inst, now)
            if len(inst.in_engine) == n:
                break
        budget = self.chunk
        pf = []
        free = inst.kv_capacity - inst.kv_used
        for r in inst.in_engine:
            if budget <= 0:
                break
            if r.prefilled == 0:
                if r.prefill_len > free:
                    break  # KV of this prompt does not fit until transfers drain
                free -= r.prefill_len
                inst.kv_staged += r.prefill_len
                inst.in_engine_tokens -= reuse_cached(inst, r)
            c = min(r.prefill_len - r.prefilled, budget)
            pf.append((r, c))
            budget -= c
        if not pf:
            return None
        return pf, 0, 0


def reuse_cached(inst: SimInstance, r: SimRequest) -> int:
    """The engine starts a prompt: on its first prefill it skips the leading blocks its instance
    holds cached (their KV is still allocated to it: shared blocks). Returns the tokens skipped."""
    if inst.cache is None or not r.blocks or r.generated or r.preemptions:
        return 0
    r.cached = inst.cache.reuse(r.blocks, r.prompt_tokens)
    r.prefilled = r.cached
    return r.cached
