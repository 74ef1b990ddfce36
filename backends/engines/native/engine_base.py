"""ScheduledEngine: the EngineCore bookkeeping the native and sim engines share.

Both engines plan passes with the native `Scheduler` over a paged `KVPool`; they differ only in what
a pass *is* (a PyTorch forward pass plus sampling, or a timing model's sleep plus deterministic
tokens). This class owns everything around the pass: validation and admission, the decode_only
hand-over of imported KV, finishing and aborting, KV export/import bookkeeping, role changes, the
load report and the static facts. A subclass sets `model_name`, `max_context` and `eos_ids`, builds
its pool, calls `ScheduledEngine.__init__` and implements `_run_pass` and the small hooks below.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from backends.base import KVEvents, LoadReport, Role
from backends.engines.api import EngineRequest, KVPayload, KVPrefixGone, PassShape, StepOutput
from backends.engines.native.detokenize import IncrementalDetokenizer
from backends.engines.native.kv_cache import BLOCK_SIZE, BlockTable, KVPool, blocks_for
from backends.engines.native.scheduler import Scheduler
from backends.engines.native.sequence import Sequence, Status

ROLES = ("prefill", "decode", "colocated")
PREFIX_CACHING_ENV = "TETRI_PREFIX_CACHING"  # "0": no prefix caching, whatever the engine was built with
# Modes each role accepts.
ROLE_MODES = {
    "prefill": ("prefill_only",),
    # A decode instance also runs whole requests (prefill + decode, no KV transfer): the
    # orchestrator's co-located fallback (conditional disaggregation). Its prompt is chunked into
    # the token budget beside the running decodes (Sarathi-style hybrid batches).
    "decode": ("decode_only", "full"),
    "colocated": ("full", "prefill_only", "decode_only"),
}


@dataclass
class _Imported:
    """A pushed KV waiting for its decode request: its blocks, and the prefix hashes of the blocks it
    shared with this pool's cache instead of copying (checked against the prompt on claim)."""

    table: BlockTable
    num_tokens: int
    shared_hashes: list[int] = field(default_factory=list)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")


class ScheduledEngine:
    """EngineCore around the native Scheduler. Synchronous: call everything from one thread
    (except `import_kv`, see api.py)."""

    backend: str
    # Set by the subclass before ScheduledEngine.__init__ (the scheduler's token cap reads max_context).
    model_name: str
    max_context: int
    eos_ids: set[int]

    def __init__(
        self,
        pool: KVPool,
        role: Role,
        batching: str,
        chunk_size: int,
        max_batch: int,
        max_batched_tokens: int | None,
    ) -> None:
        check_role(role)
        if chunk_size < 1:
            raise ValueError("chunk_size must be a positive number of tokens")
        if os.environ.get(PREFIX_CACHING_ENV, "1").lower() in ("0", "false", "off", "no"):
            pool.prefix_caching = False  # a worker-wide switch, for caching-off baselines (native and sim)
        self.pool = pool
        self.role: Role = role
        self.batching = batching
        self.chunk_size = chunk_size
        self.max_batch = max_batch
        self.scheduler = Scheduler(
            pool, chunk_size, max_batch, batching,  # type: ignore[arg-type]
            max_batched_tokens=max_batched_tokens or max(chunk_size, self.max_context),
        )  # fmt: skip
        self.scheduler.namespace = self.model_name  # prefix-cache blocks are never shared across models
        self._apply_style()
        self._seqs: dict[str, Sequence] = {}  # every request the engine knows: queued..held
        self._imported: dict[str, _Imported] = {}  # KV waiting for its decode request
        self._pending: list[StepOutput] = []  # outputs produced outside a pass
        self._order = itertools.count()
        self.steps = 0
        self.last_pass: PassShape | None = None  # the latest step's shape (None: it ran no pass)
        self.tokens_processed = 0

    # ---- what a subclass supplies ---------------------------------------------------------
    def _run_pass(self, plan: list[tuple[Sequence, int]], shape: PassShape) -> list[tuple[Sequence, int]]:
        """Execute `plan` (before its sequences' `num_computed` advance); return (sequence, next
        token) for each sequence the pass brings to its newest token, in plan order."""
        raise NotImplementedError

    def _detokenizer(self, request: EngineRequest) -> IncrementalDetokenizer:
        raise NotImplementedError

    def _validate_for_model(self, request: EngineRequest) -> None:
        """Checks only a real model needs (sampling ranges, vocabulary); none by default."""

    def _plan(self) -> list[tuple[Sequence, int]]:
        return self.scheduler.schedule()

    def _idle(self, has_outputs: bool) -> None:
        """Called when the scheduler planned no pass; a subclass may wait here instead of letting a
        caller that loops on has_work() spin."""

    def _kv_data(self, seq: Sequence) -> Any:
        """The exported KV of a held sequence."""
        raise NotImplementedError

    def _kv_extra(self) -> dict[str, Any]:
        """`KVPayload.extra` beyond dtype, block size and first token."""
        return {}

    def _import_data(self, payload: KVPayload) -> Any:
        """Check (and convert) an imported payload's data before any block is allocated."""
        return payload.data

    def _write_kv(self, table: BlockTable, data: Any, start: int) -> None:
        """Copy imported data (positions `start`.., sliced by the caller) into the table's fresh
        blocks (outside the pool lock); the positions before `start` are in blocks shared with the
        prefix cache."""

    def _on_import(self, request_id: str, num_tokens: int) -> None:
        """Runs under the pool lock right after an import is registered."""

    def _load_extra(self) -> dict[str, Any]:
        return {}

    def _model_info(self) -> dict[str, Any]:
        """The `info()` facts of the model and device (layers, vocabulary, device...)."""
        raise NotImplementedError

    # ---- EngineCore -----------------------------------------------------------------------
    def _apply_style(self) -> None:
        self.scheduler.whole_prompts = self.role == "colocated" and self.batching == "vllm"

    def _validate(self, request: EngineRequest) -> None:
        rid = request.request_id
        if rid in self._seqs:
            raise ValueError(f"request {rid!r} is already in the engine")
        if request.mode not in ROLE_MODES[self.role]:
            raise ValueError(
                f"a {self.role} engine does not take {request.mode} requests "
                f"(accepts: {', '.join(ROLE_MODES[self.role])})"
            )
        n = len(request.prompt_ids)
        sp = request.sampling
        if n == 0:
            raise ValueError("the prompt is empty")
        if sp.max_tokens is None or sp.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self._validate_for_model(request)
        if n + sp.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({sp.max_tokens}) exceeds the model's context "
                f"of {self.max_context} tokens"
            )
        if blocks_for(n + sp.max_tokens) > self.pool.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({n + sp.max_tokens} tokens) is more than this engine's whole "
                f"KV pool ({self.pool.total_tokens} tokens)"
            )

    def add_request(self, request: EngineRequest) -> None:
        self._validate(request)
        rid = request.request_id
        seq = Sequence(
            req=request,
            tokens=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
            detok=self._detokenizer(request),
            order=next(self._order),
        )
        if request.mode == "decode_only":
            imported = self._imported.get(rid)
            if imported is None:
                raise ValueError(f"no imported KV for request {rid!r}")
            if request.first_token is None:
                raise ValueError("a decode_only request needs first_token (sampled by the prefill side)")
            num_tokens = imported.num_tokens
            if num_tokens != len(request.prompt_ids):
                raise ValueError(f"imported KV holds {num_tokens} tokens but the prompt has {len(request.prompt_ids)}")
            hashes = seq.block_hashes(self.model_name, num_tokens)
            shared = imported.shared_hashes
            if hashes[: len(shared)] != shared:  # the pushed hashes named cached blocks of another prefix
                raise ValueError("the imported KV's block hashes do not match the prompt")
            del self._imported[rid]
            seq.table = imported.table
            seq.num_computed = num_tokens
            self.pool.register(seq.table, hashes, num_tokens // BLOCK_SIZE)  # later requests hit them
            first = int(request.first_token)
            seq.tokens.append(first)
            seq.outputs.append(first)
            # Replay the prefill side's detokenizer step so text deltas continue where it stopped.
            _delta, stopped = seq.detok.push(first)
            reason = self._end_reason(seq, first, stopped)
            if reason is not None:  # the prefill side's token already ended it: nothing to decode
                self._finish(seq)
                self._pending.append(StepOutput(rid, None, "", reason))
                return
            seq.status = Status.READY
        self._seqs[rid] = seq
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        self.last_pass = None
        plan = self._plan()
        if not plan:
            self._idle(bool(outputs))
            return outputs
        shape = self.last_pass = PassShape.of(plan)
        sampled = self._run_pass(plan, shape)
        for seq, n in plan:
            seq.num_computed += n
            self._cache_blocks(seq)
        self.steps += 1
        self.tokens_processed += shape.tokens + shape.dseqs  # every token the pass fed
        for seq, tok in sampled:
            outputs.append(self._append(seq, tok))
        return outputs

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq)
        self._pending = [o for o in self._pending if o.request_id != request_id]
        self.release_kv(request_id)

    def export_kv(self, request_id: str) -> KVPayload:
        """Copy a prefilled request's KV out. The blocks stay held until `release_kv` (or `abort`)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.HELD:
            raise KeyError(f"no prefilled KV held for request {request_id!r}")
        return KVPayload(
            request_id=request_id,
            num_tokens=seq.num_computed,
            data=self._kv_data(seq),
            model=self.model_name,
            extra={
                "dtype": self._dtype_name,
                "block_size": BLOCK_SIZE,
                "first_token": seq.outputs[0] if seq.outputs else None,
                # The receiver shares the blocks it already caches instead of copying them.
                "block_hashes": seq.block_hashes(self.model_name, seq.num_computed)[: seq.num_computed // BLOCK_SIZE],
                **self._kv_extra(),
            },
        )

    def import_kv(self, payload: KVPayload) -> None:
        rid = payload.request_id
        if rid in self._imported or rid in self._seqs:
            raise ValueError(f"request {rid!r} already has KV or is running here")
        data = self._import_data(payload)
        if payload.num_tokens < 1 or payload.num_tokens >= self.max_context:
            raise ValueError(f"KV of {payload.num_tokens} tokens does not fit the model's context")
        n = payload.num_tokens
        hashes = [int(h) for h in payload.extra.get("block_hashes") or []][: n // BLOCK_SIZE]
        skip = int(payload.extra.get("skip_tokens") or 0)  # `data` holds positions skip.. only
        pool = self.pool
        with pool.lock:  # match, share and allocate at once: no eviction in between
            shared = pool.match(hashes)
            if len(shared) * BLOCK_SIZE < skip:
                raise KVPrefixGone(f"KV push skipped {skip} positions, this pool now holds {len(shared) * BLOCK_SIZE}")
            need = blocks_for(n) - len(shared)
            if need + pool.evictable_among(shared) > pool.free_blocks:
                raise MemoryError(f"KV pool full: {n} tokens need {need} new blocks, {pool.free_blocks} free")
            pool.share(shared)
            table = BlockTable(shared + pool.allocate(need), registered=len(shared))
        # The new blocks are this import's alone until registered: the copy runs beside the forward pass.
        start = len(shared) * BLOCK_SIZE
        self._write_kv(table, data[:, :, start - skip :] if start > skip else data, start)
        with pool.lock:
            if rid in self._imported or rid in self._seqs:  # a second import of the same id raced us
                pool.release(table)
                raise ValueError(f"request {rid!r} already has KV or is running here")
            self._imported[rid] = _Imported(table, n, hashes[: len(shared)])
            self._on_import(rid, n)

    def held_prefix_tokens(self, block_hashes: list[int], num_tokens: int) -> int:
        """Leading positions of a KV of `num_tokens` (full blocks `block_hashes`) this pool caches,
        which a push may skip (the last block is always sent). Safe from any thread."""
        with self.pool.lock:
            return len(self.pool.match(block_hashes[: (num_tokens - 1) // BLOCK_SIZE])) * BLOCK_SIZE

    def release_kv(self, request_id: str) -> None:
        imported = self._imported.pop(request_id, None)
        if imported is not None:
            self.pool.release(imported.table)
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is Status.HELD:
            self._finish(seq)

    def set_role(self, role: Role) -> None:
        check_role(role)
        if self.scheduler.has_work():
            raise RuntimeError("set_role needs an idle engine (drain it first)")
        self.role = role
        self._apply_style()

    def load(self) -> LoadReport:
        sched = self.scheduler
        held = [s for s in self._seqs.values() if s.status is Status.HELD]
        pool = self.pool
        return LoadReport(
            role=self.role,
            free_kv_tokens=pool.free_tokens,
            total_kv_tokens=pool.total_tokens,
            chunk_size=self.chunk_size,
            backend=self.backend,
            model=self.model_name,
            cached_blocks=pool.cached_blocks,
            prefix_query_tokens=pool.query_tokens,
            prefix_hit_tokens=pool.hit_tokens,
            **sched.load_fields(),  # type: ignore[arg-type]
            extra={
                "batching": self.batching,
                "held_kv_requests": len(held),
                "held_kv_tokens": sum(s.num_computed for s in held),
                "imported_kv_requests": len(self._imported),
                "imported_kv_tokens": sum(i.num_tokens for i in self._imported.values()),
                "used_kv_blocks": pool.used_blocks,
                "preemptions": sched.preemptions,
                "steps": self.steps,
                **self._load_extra(),
            },
        )

    def kv_events(self, since: int) -> KVEvents | None:
        """Prefix-cache block events after event `since` (a reset with the whole cached set when the
        asker is new or too far behind); None when caching is off. Safe from any thread."""
        return self.pool.events_since(since) if self.pool.prefix_caching else None

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "backend": self.backend,
            "block_size": BLOCK_SIZE,
            "prefix_caching": self.pool.prefix_caching,
            "total_kv_tokens": self.pool.total_tokens,
            "dtype": self._dtype_name,
            "chunk_size": self.chunk_size,
            "max_context": self.max_context,
            "role": self.role,
            "batching": self.batching,
            "max_batch": self.max_batch,
            "eos_token_ids": sorted(self.eos_ids),
            **self._model_info(),
        }

    # ---- internals ------------------------------------------------------------------------
    @property
    def _dtype_name(self) -> str:
        return str(self.pool.dtype).removeprefix("torch.")

    def _end_reason(self, seq: Sequence, tok: int, stopped: bool) -> str | None:
        """Why `seq` ends with its newest token `tok` (a stop string hit: `stopped`), or None."""
        sp = seq.req.sampling
        if stopped or (tok in self.eos_ids and not sp.ignore_eos):
            return "stop"
        if len(seq.outputs) >= sp.max_tokens or len(seq.tokens) >= self.max_context:
            return "length"
        return None

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.pool.release(seq.table)
        seq.status = Status.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _cache_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that the pass just filled (prompt or generated tokens)."""
        full = seq.num_computed // BLOCK_SIZE
        if full > seq.table.registered and self.pool.prefix_caching:
            self.pool.register(seq.table, seq.block_hashes(self.model_name, seq.num_computed), full)

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        seq.tokens.append(tok)
        seq.outputs.append(tok)
        # The first token's output says how much of the prompt came from the prefix cache.
        cached = seq.cached_tokens if len(seq.outputs) == 1 else None
        delta, stopped = seq.detok.push(tok)
        reason = self._end_reason(seq, tok, stopped)
        if reason is not None:
            if not stopped:
                delta += seq.detok.flush()
            self._finish(seq)
        elif seq.req.mode == "prefill_only":
            reason = "prefilled"
            self.scheduler.remove(seq)
            seq.status = Status.HELD
        return StepOutput(seq.request_id, tok, delta, reason, cached_tokens=cached)
