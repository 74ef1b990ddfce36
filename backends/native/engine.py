"""NativeEngine: the built-in PyTorch engine behind the EngineCore protocol.

One `step()` is one forward pass over a packed batch the scheduler planned (decodes and prefill
chunks), followed by sampling for every sequence whose last fed token was its newest one.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

import torch

from backends.base import LoadReport, Role
from backends.engine_api import EngineRequest, KVPayload, StepOutput
from backends.native.detokenize import IncrementalDetokenizer
from backends.native.kv_cache import BLOCK_SIZE, BlockTable, KVPool, blocks_for
from backends.native.llama import ForwardBatch, NativeLlama, PrefillSeq
from backends.native.model_source import DEFAULT_MODEL, configure_threads, load_model
from backends.native.sampling import sample
from backends.native.scheduler import Batching, PassShape, Scheduler
from backends.native.sequence import Sequence, Status

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
# Modes each role accepts.
ROLE_MODES = {
    "prefill": ("prefill_only",),
    # A decode instance also runs whole requests (prefill + decode, no KV transfer): the
    # orchestrator's co-located fallback (conditional disaggregation). Its prompt is chunked into
    # the token budget beside the running decodes (Sarathi-style hybrid batches).
    "decode": ("decode_only", "full"),
    "colocated": ("full", "prefill_only", "decode_only"),
}
DEFAULT_CPU_KV_TOKENS = 32768
BLOCKED_SLEEP_S = 0.005
DEFAULT_CUDA_KV_FRACTION = 0.85
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


class NativeEngine:
    """The built-in engine (EngineCore). Synchronous: call everything from one thread."""

    backend = "native"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        role: Role = "colocated",
        batching: Batching = "sarathi",
        chunk_size: int | str = "auto",
        kv_tokens: int | None = None,
        max_batch: int = 64,
        device: str = "cpu",
        dtype: str | torch.dtype | None = "auto",
        kv_fraction: float | None = None,
        max_batched_tokens: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if torch.device(device).type == "cpu":
            configure_threads()
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        hf_model, tokenizer, name = load_model(model, dtype=self.dtype, device=str(self.device))
        self.model_spec = model
        self.model_name = name
        self.tokenizer = tokenizer
        self.model = NativeLlama(hf_model, self.dtype, self.device)
        self.max_context = int(self.model.max_positions)
        self.eos_ids = self._eos_ids(hf_model, tokenizer)
        del hf_model  # our fused copies are all the forward pass needs

        per_token = KVPool.bytes_per_token(
            self.model.num_layers, self.model.num_kv_heads, self.model.head_dim, self.dtype
        )
        if kv_tokens is None:
            kv_tokens = self._default_kv_tokens(per_token, kv_fraction)
        self.pool = KVPool(
            self.model.num_layers,
            self.model.num_kv_heads,
            self.model.head_dim,
            int(kv_tokens),
            self.dtype,
            self.device,
        )
        self.role: Role = role
        self.batching: Batching = batching
        if chunk_size == "auto":
            from backends.native.profile import resolve_chunk_size

            chunk_size = resolve_chunk_size("auto", name, str(self.device), engine=self)
        if int(chunk_size) < 1:
            raise ValueError("chunk_size must be a positive number of tokens")
        self.chunk_size = int(chunk_size)
        self.max_batch = max_batch
        self.scheduler = Scheduler(
            self.pool,
            self.chunk_size,
            max_batch,
            batching,
            max_batched_tokens=max_batched_tokens or max(self.chunk_size, self.max_context),
        )
        self._apply_style()
        self._seqs: dict[str, Sequence] = {}  # every request the engine knows: queued..held
        self._imported: dict[str, tuple[BlockTable, int]] = {}  # KV waiting for its decode request
        self._pending: list[StepOutput] = []  # outputs produced outside a forward pass
        self._order = itertools.count()
        self.steps = 0
        self.last_pass: PassShape | None = None  # the latest step's shape (None: it ran no pass)
        self.tokens_processed = 0

    # ---- construction helpers -----------------------------------------------------------
    @staticmethod
    def _eos_ids(hf_model, tokenizer) -> set[int]:
        ids: set[int] = set()
        gen = getattr(hf_model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(hf_model.config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    def _default_kv_tokens(self, per_token: int, fraction: float | None) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * (fraction or DEFAULT_CUDA_KV_FRACTION) // per_token)
        if fraction is not None:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            return int(avail * fraction // per_token)
        return DEFAULT_CPU_KV_TOKENS

    def _apply_style(self) -> None:
        self.scheduler.whole_prompts = self.role == "colocated" and self.batching == "vllm"

    # ---- helpers for callers ------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- EngineCore ---------------------------------------------------------------------
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
        if sp.temperature is not None and sp.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if sp.top_p is not None and not 0 < sp.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if n > self.max_context:
            raise ValueError(f"the prompt has {n} tokens, more than the model's context of {self.max_context}")
        if n + sp.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({sp.max_tokens}) exceeds the model's context "
                f"of {self.max_context} tokens"
            )
        vocab = self.model.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if blocks_for(n + sp.max_tokens) > self.pool.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({n + sp.max_tokens} tokens) is more than this engine's whole "
                f"KV pool ({self.pool.total_tokens} tokens)"
            )

    def add_request(self, request: EngineRequest) -> None:
        self._validate(request)
        sp = request.sampling
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, sp.stop)
        seq = Sequence(
            req=request,
            tokens=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
            detok=detok,
            order=next(self._order),
        )
        if request.mode == "decode_only":
            imported = self._imported.get(request.request_id)
            if imported is None:
                raise ValueError(f"no imported KV for request {request.request_id!r}")
            if request.first_token is None:
                raise ValueError("a decode_only request needs first_token (sampled by the prefill side)")
            table, num_tokens = imported
            if num_tokens != len(request.prompt_ids):
                raise ValueError(f"imported KV holds {num_tokens} tokens but the prompt has {len(request.prompt_ids)}")
            del self._imported[request.request_id]
            seq.table = table
            seq.num_computed = num_tokens
            first = int(request.first_token)
            seq.tokens.append(first)
            seq.outputs.append(first)
            # Replay the prefill side's detokenizer step so text deltas continue where it stopped.
            _delta, stopped = detok.push(first)
            self._seqs[request.request_id] = seq
            reason = None
            if stopped or (first in self.eos_ids and not sp.ignore_eos):
                reason = "stop"
            elif len(seq.outputs) >= sp.max_tokens:
                reason = "length"
            if reason:  # the prefill side's token already ended it: nothing to decode
                self._finish(seq)
                self._pending.append(StepOutput(request.request_id, None, "", reason))
                return
            seq.status = Status.READY
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        self.last_pass = None
        plan = self.scheduler.schedule()
        if not plan:
            if not outputs and self.scheduler.has_work():
                # Blocked: queued work waits for KV space that only a release/abort/import can
                # free. Don't let a caller that loops on has_work() spin a core meanwhile.
                time.sleep(BLOCKED_SLEEP_S)
            return outputs
        self.last_pass = PassShape.of(plan)
        batch, to_sample = self._build_batch(plan)
        logits = self.model.forward(batch, self.pool)
        for seq, n in plan:
            seq.num_computed += n
        self.steps += 1
        self.tokens_processed += int(batch.input_ids.shape[0])
        if to_sample:
            tokens = sample(
                logits,
                [s.req.sampling for s in to_sample],
                [len(s.outputs) for s in to_sample],
            )
            for seq, tok in zip(to_sample, tokens, strict=True):
                outputs.append(self._append(seq, tok))
        return outputs

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq)
        self._pending = [o for o in self._pending if o.request_id != request_id]
        self.release_kv(request_id)

    def export_kv(self, request_id: str) -> KVPayload:
        """Copy a prefilled request's KV out (to host memory). The blocks stay held until
        `release_kv` (or `abort`)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.HELD:
            raise KeyError(f"no prefilled KV held for request {request_id!r}")
        data = self.pool.read(seq.table, seq.num_computed).to("cpu")
        return KVPayload(
            request_id=request_id,
            num_tokens=seq.num_computed,
            data=data,
            model=self.model_name,
            extra={
                "dtype": str(self.dtype).removeprefix("torch."),
                "block_size": BLOCK_SIZE,
                "first_token": seq.outputs[0] if seq.outputs else None,
            },
        )

    def import_kv(self, payload: KVPayload) -> None:
        rid = payload.request_id
        if rid in self._imported or rid in self._seqs:
            raise ValueError(f"request {rid!r} already has KV or is running here")
        data = payload.data
        if not isinstance(data, torch.Tensor):
            data = torch.as_tensor(data)
        m = self.model
        expected = (m.num_layers, 2, payload.num_tokens, m.num_kv_heads, m.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV shape {tuple(data.shape)} does not match this model's {expected}")
        if payload.num_tokens < 1 or payload.num_tokens >= self.max_context:
            raise ValueError(f"KV of {payload.num_tokens} tokens does not fit the model's context")
        need = blocks_for(payload.num_tokens)
        try:
            table = BlockTable(self.pool.allocate(need))
        except MemoryError:
            raise MemoryError(
                f"KV pool full: {payload.num_tokens} tokens need {need} blocks, {self.pool.free_blocks} free"
            ) from None
        # The blocks are this import's alone until registered: the copy runs beside the forward pass.
        self.pool.write(table, data)
        with self.pool.lock:
            if rid in self._imported or rid in self._seqs:
                self.pool.release(table)
                raise ValueError(f"request {rid!r} already has KV or is running here")
            self._imported[rid] = (table, payload.num_tokens)

    def release_kv(self, request_id: str) -> None:
        imported = self._imported.pop(request_id, None)
        if imported is not None:
            self.pool.release(imported[0])
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is Status.HELD:
            self._finish(seq)

    def set_role(self, role: Role) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if self.scheduler.has_work():
            raise RuntimeError("set_role needs an idle engine (drain it first)")
        self.role = role
        self._apply_style()

    def load(self) -> LoadReport:
        sched = self.scheduler
        held = [s for s in self._seqs.values() if s.status is Status.HELD]
        return LoadReport(
            role=self.role,
            free_kv_tokens=self.pool.free_tokens,
            total_kv_tokens=self.pool.total_tokens,
            chunk_size=self.chunk_size,
            backend="native",
            model=self.model_name,
            **sched.load_fields(),  # type: ignore[arg-type]
            extra={
                "batching": self.batching,
                "held_kv_requests": len(held),
                "held_kv_tokens": sum(s.num_computed for s in held),
                "imported_kv_requests": len(self._imported),
                "imported_kv_tokens": sum(n for _t, n in self._imported.values()),
                "preemptions": sched.preemptions,
                "steps": self.steps,
            },
        )

    def info(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": self.model_name,
            "backend": "native",
            "block_size": BLOCK_SIZE,
            "total_kv_tokens": self.pool.total_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_layers": m.num_layers,
            "num_kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "chunk_size": self.chunk_size,
            "max_context": self.max_context,
            "vocab_size": m.vocab_size,
            "device": str(self.device),
            "role": self.role,
            "batching": self.batching,
            "max_batch": self.max_batch,
            "eos_token_ids": sorted(self.eos_ids),
            "kv_bytes_per_token": KVPool.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, self.dtype),
        }

    # ---- internals ----------------------------------------------------------------------
    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.pool.release(seq.table)
        seq.status = Status.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        sp = seq.req.sampling
        seq.tokens.append(tok)
        seq.outputs.append(tok)
        delta, stopped = seq.detok.push(tok)
        reason: str | None = None
        if stopped:
            reason = "stop"
        elif tok in self.eos_ids and not sp.ignore_eos:
            reason = "stop"
        elif len(seq.outputs) >= sp.max_tokens or len(seq.tokens) >= self.max_context:
            reason = "length"
        if reason is not None:
            if not stopped:
                delta += seq.detok.flush()
            self._finish(seq)
        elif seq.req.mode == "prefill_only":
            reason = "prefilled"
            self.scheduler.remove(seq)
            seq.status = Status.HELD
        return StepOutput(seq.request_id, tok, delta, reason)

    def _build_batch(self, plan: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[Sequence]]:
        bs = self.pool.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        to_sample: list[Sequence] = []
        singles: list[Sequence] = []
        prefill: list[PrefillSeq] = []
        for seq, n in plan:
            start = seq.num_computed
            blocks = seq.table.blocks
            q_start = len(ids)
            ids.extend(seq.tokens[start : start + n])
            for p in range(start, start + n):
                positions.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
            if n == 1:
                singles.append(seq)
            else:
                ps = PrefillSeq(q_start=q_start, q_len=n, ctx_len=start + n)
                if start > 0:
                    ps.ctx_slots = self.pool.slots(seq.table, 0, start + n)
                    q_pos = torch.arange(start, start + n)
                    ps.mask = (torch.arange(start + n)[None, :] <= q_pos[:, None]).to(self.device)
                prefill.append(ps)
            if start + n == len(seq.tokens):
                sample_idx.append(len(ids) - 1)
                to_sample.append(seq)
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev),
            positions=torch.tensor(positions, dtype=torch.long).to(dev),
            write_slots=torch.tensor(slots, dtype=torch.long).to(dev),
            num_single=len(singles),
            prefill=prefill,
            sample_idx=torch.tensor(sample_idx, dtype=torch.long).to(dev) if sample_idx else None,
        )
        if singles:
            ctx = [s.num_computed + 1 for s in singles]
            max_ctx = max(ctx)
            nblk = blocks_for(max_ctx, bs)
            # Padding points at the pool's null block (block 0, zeroed; masked out anyway).
            table = torch.tensor([(s.table.blocks + [0] * nblk)[:nblk] for s in singles], dtype=torch.long)
            pos = torch.arange(max_ctx)
            single_slots = table[:, pos // bs] * bs + pos % bs
            if min(ctx) != max_ctx:
                valid = pos[None, :] < torch.tensor(ctx)[:, None]
                # Past a sequence's context, read the null slot: never-written memory could hold
                # NaN, and NaN * 0 attention weight is still NaN.
                single_slots = torch.where(valid, single_slots, 0)
                batch.single_mask = valid[:, None, None, :].to(dev)
            batch.single_slots = single_slots.to(dev)
        if not to_sample:
            batch.sample_idx = torch.zeros(0, dtype=torch.long, device=dev)
        return batch, to_sample
