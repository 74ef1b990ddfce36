"""NativeEngine: the built-in PyTorch engine behind the EngineCore protocol.

One `step()` is one forward pass over a packed batch the scheduler planned (decodes and prefill
chunks), followed by sampling for every sequence whose last fed token was its newest one. The
bookkeeping around the pass (admission, finishing, KV export/import, load) is `ScheduledEngine`'s,
shared with the simulator's engine.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from backends.base import Role
from backends.engines.api import EngineRequest, KVPayload, PassShape
from backends.engines.native.detokenize import IncrementalDetokenizer
from backends.engines.native.engine_base import ScheduledEngine, check_role
from backends.engines.native.kv_cache import BlockTable, KVPool, blocks_for
from backends.engines.native.llama import ForwardBatch, NativeLlama, PrefillSeq
from backends.engines.native.model_source import DEFAULT_MODEL, configure_threads, load_model
from backends.engines.native.sampling import sample
from backends.engines.native.scheduler import Batching
from backends.engines.native.sequence import Sequence

log = logging.getLogger(__name__)

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


class NativeEngine(ScheduledEngine):
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
        prefix_caching: bool = True,
    ) -> None:
        check_role(role)  # before loading the model: a bad role should fail fast
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
            prefix_caching=prefix_caching,
        )
        if chunk_size == "auto":
            from backends.engines.native.profile import resolve_chunk_size

            chunk_size = resolve_chunk_size("auto", name, str(self.device), engine=self)
        super().__init__(self.pool, role, batching, int(chunk_size), max_batch, max_batched_tokens)

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

    # ---- ScheduledEngine hooks: a pass is one forward pass plus sampling ------------------
    def _detokenizer(self, request: EngineRequest) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.sampling.stop)

    def _validate_for_model(self, request: EngineRequest) -> None:
        n = len(request.prompt_ids)
        sp = request.sampling
        if sp.temperature is not None and sp.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if sp.top_p is not None and not 0 < sp.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if n > self.max_context:
            raise ValueError(f"the prompt has {n} tokens, more than the model's context of {self.max_context}")
        vocab = self.model.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def _idle(self, has_outputs: bool) -> None:
        if not has_outputs and self.scheduler.has_work():
            # Blocked: queued work waits for KV space that only a release/abort/import can
            # free. Don't let a caller that loops on has_work() spin a core meanwhile.
            time.sleep(BLOCKED_SLEEP_S)

    @torch.inference_mode()
    def _run_pass(self, plan: list[tuple[Sequence, int]], shape: PassShape) -> list[tuple[Sequence, int]]:
        batch, to_sample = self._build_batch(plan)
        logits = self.model.forward(batch, self.pool)
        if not to_sample:
            return []
        tokens = sample(
            logits,
            [s.req.sampling for s in to_sample],
            [len(s.outputs) for s in to_sample],
        )
        return list(zip(to_sample, tokens, strict=True))

    def _kv_data(self, seq: Sequence) -> torch.Tensor:
        return self.pool.read(seq.table, seq.num_computed).to("cpu")  # to host memory

    def _import_data(self, payload: KVPayload) -> torch.Tensor:
        data = payload.data
        if not isinstance(data, torch.Tensor):
            data = torch.as_tensor(data)
        m = self.model
        tokens = payload.num_tokens - int(payload.extra.get("skip_tokens") or 0)  # a push may skip held positions
        expected = (m.num_layers, 2, tokens, m.num_kv_heads, m.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV shape {tuple(data.shape)} does not match this model's {expected}")
        return data

    def _write_kv(self, table: BlockTable, data: torch.Tensor, start: int) -> None:
        self.pool.write(table, data, start)

    def _model_info(self) -> dict[str, Any]:
        m = self.model
        return {
            "num_layers": m.num_layers,
            "num_kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "vocab_size": m.vocab_size,
            "device": str(self.device),
            "kv_bytes_per_token": KVPool.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, self.dtype),
        }

    # ---- internals ----------------------------------------------------------------------
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
