"""Which tokens of which requests go into the next forward pass.

- Chunked (Sarathi-style, also the prefill and decode roles): every running decode gets its one
  token first, then prefill chunks fill what is left of the `chunk_size` token budget: first the
  prompts already started (oldest first), then new prompts admitted from the queue. Several
  prompts can share one chunk and a long prompt spreads over several.
- Whole prompts (vLLM-style, co-located only): if a waiting prompt can be admitted, the step
  prefills waiting prompts whole (no chunking, up to `max_batched_tokens`); otherwise it runs the
  decode batch.

Admission reserves blocks for the whole prompt, so a started prefill never stalls for memory; a
prompt that does not fit stays queued (FCFS, no skipping). Admission first looks the prompt up in
the pool's prefix cache: its leading cached full blocks are shared and the prefill starts after them
(at most (n-1)//B blocks: the last prompt token is always computed, for its logits). A running decode that needs a new
block and finds none preempts the newest running request (its blocks are freed and it is
recomputed later from its prompt plus the tokens it already produced).
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from backends.engines.native.kv_cache import KVPool, blocks_for
from backends.engines.native.sequence import Sequence, Status

Batching = Literal["vllm", "sarathi"]


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        chunk_size: int,
        max_batch: int,
        batching: Batching = "sarathi",
        max_batched_tokens: int | None = None,
    ) -> None:
        if batching not in ("vllm", "sarathi"):
            raise ValueError(f"batching must be 'vllm' or 'sarathi', not {batching!r}")
        self.pool = pool
        self.chunk_size = chunk_size
        self.max_batch = max_batch
        self.batching: Batching = batching
        self.max_batched_tokens = max_batched_tokens or chunk_size
        self.whole_prompts = False  # set by the engine: vLLM style in the co-located role
        self.waiting: deque[Sequence] = deque()  # need prefill
        self.ready: deque[Sequence] = deque()  # decode_only, KV imported
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.namespace = ""  # prefix-cache namespace (the model name), set by the engine
        # A small reserve of blocks so admitted requests can grow a little before preempting.
        self.watermark = int(0.01 * pool.num_blocks)

    # ---- queue management ---------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.status is Status.READY:
            self.ready.append(seq)
        else:
            seq.status = Status.WAITING
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        for q in (self.waiting, self.ready):
            try:
                q.remove(seq)
            except ValueError:
                pass
        if seq in self.running:
            self.running.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    # ---- the step plan ------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, tokens to feed)], single-token entries first."""
        with self.pool.lock:  # a KV import on another thread must not take blocks mid-plan
            return self._schedule()

    def _schedule(self) -> list[tuple[Sequence, int]]:
        self._admit_ready()
        if self.whole_prompts:
            plan = self._whole_prompts()
            if plan:
                return plan
            return self._decodes()
        plan = self._decodes()
        budget = self.chunk_size - len(plan)
        if budget > 0:
            plan += self._chunks(budget)
        # Keep single-token entries first (the model batches them together).
        plan.sort(key=lambda e: e[1] != 1)
        return plan

    def _admit_ready(self) -> None:
        while self.ready and len(self.running) < self.max_batch:
            seq = self.ready.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _lookup(self, seq: Sequence) -> list[int] | None:
        """The cached blocks `seq` would share if admitted now, or None when it cannot be."""
        if len(self.running) >= self.max_batch:
            return None
        pool = self.pool
        n = len(seq.tokens)
        hits: list[int] = []
        if pool.prefix_caching:
            hashes = seq.block_hashes(self.namespace, n)
            hits = pool.match(hashes[: (n - 1) // pool.block_size])
        # Sharing an unreferenced cached block takes it off the free list too.
        need = blocks_for(n, pool.block_size) - len(hits) + pool.evictable_among(hits)
        if pool.free_blocks - need < (self.watermark if self.running else 0):
            return None
        return hits

    def _admit(self, seq: Sequence, hits: list[int]) -> None:
        pool = self.pool
        pool.share(hits)
        seq.table.blocks = list(hits)
        seq.table.registered = len(hits)
        seq.num_computed = len(hits) * pool.block_size
        ok = pool.ensure(seq.table, len(seq.tokens))
        assert ok, "admission checked the pool"
        if seq.cached_tokens is None:  # the first admission: a recompute after preemption is not a query
            seq.cached_tokens = seq.num_computed
            pool.count_lookup(len(seq.tokens), seq.num_computed)
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _decodes(self) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        planned: set[int] = set()
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.remaining != 1 or seq.status is not Status.RUNNING:
                continue
            while not self.pool.ensure(seq.table, len(seq.tokens)):
                victim = self._newest_running(exclude=planned)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                plan.append((seq, 1))
                planned.add(id(seq))
        return plan

    def _newest_running(self, exclude: set[int]) -> Sequence:
        candidates = [s for s in self.running if id(s) not in exclude]
        return max(candidates, key=lambda s: s.order)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it goes back to the front of the queue for recompute."""
        self.pool.release(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        for seq in sorted(self.running, key=lambda s: s.order):
            if budget <= 0:
                return plan
            if seq.remaining > 1:
                n = min(seq.remaining, budget)
                plan.append((seq, n))
                budget -= n
        while budget > 0 and self.waiting:
            seq = self.waiting[0]
            hits = self._lookup(seq)
            if hits is None:
                break
            self._admit(seq, hits)
            n = min(seq.remaining, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def _whole_prompts(self) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        budget = self.max_batched_tokens
        for seq in sorted(self.running, key=lambda s: s.order):  # only after a style change
            if seq.remaining > 1:
                plan.append((seq, seq.remaining))
                budget -= seq.remaining
        while self.waiting:
            seq = self.waiting[0]
            hits = self._lookup(seq)
            if hits is None or (plan and len(seq.tokens) - len(hits) * self.pool.block_size > budget):
                break
            self._admit(seq, hits)
            plan.append((seq, seq.remaining))
            budget -= seq.remaining
        plan.sort(key=lambda e: e[1] != 1)
        return plan

    def _uncached(self, seq: Sequence) -> int:
        """A waiting sequence's prefill work as of now: its tokens less the leading cached ones."""
        pool, n = self.pool, len(seq.tokens)
        if not pool.prefix_caching or n <= pool.block_size:
            return seq.prefill_left
        hashes = seq.block_hashes(self.namespace, n)
        with pool.lock:
            hit = len(pool.match(hashes[: (n - 1) // pool.block_size])) * pool.block_size
        return n - hit

    def load_fields(self) -> dict[str, object]:
        """The scheduler's part of a LoadReport (shared by the native and sim engines)."""
        heavy = light = running_prompt = 0
        remaining: list[int] = []
        # Running decodes, plus imported decodes about to join the batch.
        decodes = [s for s in self.running if s.in_decode] + list(self.ready)
        for seq in self.running:
            if not seq.in_decode:
                running_prompt += seq.prefill_left
        for seq in decodes:
            if seq.req.heavy_decode:
                heavy += 1
            else:
                light += 1
            remaining.append(max(0, (seq.req.predicted_output_lo or 0) - len(seq.outputs)))
        return {
            "running": len(self.running),
            "queued": len(self.waiting) + len(self.ready),
            "queued_prompt_tokens": sum(self._uncached(s) for s in self.waiting),
            "running_prompt_tokens": running_prompt,
            "heavy_decodes": heavy,
            "light_decodes": light,
            "decode_remaining": remaining,
        }
