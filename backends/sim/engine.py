"""SimEngine: the built-in engine's scheduler with the model replaced by a timing model.

`tetri worker --backend sim --profile PROFILE` serves the same HTTP API as the native worker over this
EngineCore. Each ``step()`` asks the native ``Scheduler`` (same chunked / whole-prompt batching, same
paged-KV admission and preemption) for the next pass, sleeps the pass time the ``TimingModel`` gives
for its prefill tokens, decode batch and KV context (divided by ``speed``), and samples deterministic
token ids: a request's tokens depend only on its prompt and position, so every run of a workload
produces the same text.

* Output length: with ``ignore_eos`` the request runs to ``max_tokens`` ("length"); without it, it
  stops with EOS ("stop") after a deterministic pseudo-random length in [1, max_tokens] drawn from
  its prompt (like a real model, but reproducible).
* KV export/import: payloads are tiny tensors ``[1, 2, tokens, 1, 1]`` (the pool is bookkeeping only),
  so HTTP transfers are cheap; the modelled transfer time of the profile's link
  (``TimingModel.transfer_s``) is charged on the decode side: an imported request cannot join a
  batch before the transfer would have finished.
"""

from __future__ import annotations

import itertools
import time
import zlib
from typing import Any

import torch

from backends.base import LoadReport, Role
from backends.engine_api import EngineRequest, KVPayload, StepOutput
from backends.native.kv_cache import BLOCK_SIZE, BlockTable, KVPool, blocks_for
from backends.native.scheduler import PassShape, Scheduler
from backends.native.sequence import Sequence, Status
from backends.sim.profiles import get_timing

ROLES = ("prefill", "decode", "colocated")
ROLE_MODES = {
    "prefill": ("prefill_only",),
    # A decode instance also runs whole requests (prefill + decode, no KV transfer): the
    # orchestrator's co-located fallback (conditional disaggregation). Its prompt is chunked into
    # the token budget beside the running decodes (Sarathi-style hybrid batches).
    "decode": ("decode_only", "full"),
    "colocated": ("full", "prefill_only", "decode_only"),
}
SIM_VOCAB = 49152  # SmolLM2's vocabulary size: prompts tokenized by the orchestrator stay valid
EOS_ID = 2
_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been if more when will would who so no"
).split()


def token_id(seed: int, position: int) -> int:
    """Deterministic, EOS-free token id of a request (by its prompt seed) at an output position."""
    return 100 + (seed * 2654435761 + position * 40503) % (SIM_VOCAB - 100)


def token_text(tok: int) -> str:
    return " " + _WORDS[tok % len(_WORDS)]


class _Detok:
    """Stands in for the incremental detokenizer: one word per token, stop strings honoured."""

    def __init__(self, stop: list[str] | None) -> None:
        self.stop = [s for s in (stop or []) if s]
        self.text = ""

    def push(self, tok: int) -> tuple[str, bool]:
        piece = "" if tok == EOS_ID else token_text(tok)
        before = len(self.text)
        self.text += piece
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s)))
            if at >= 0:
                delta = self.text[before:at]
                self.text = self.text[:at]
                return delta, True
        return piece, False

    def flush(self) -> str:
        return ""


class SimEngine:
    """EngineCore over a timing model. Synchronous: call everything from one thread."""

    backend = "sim"

    def __init__(
        self,
        profile: str = "cpu-smollm2",
        role: Role = "colocated",
        batching: str = "sarathi",
        chunk_size: int | str = "auto",
        kv_tokens: int | None = None,
        max_batch: int | None = None,
        model_name: str | None = None,
        speed: float = 1.0,
        network: str = "inter",
        max_batched_tokens: int | None = None,
        sleep: bool = True,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.timing = get_timing(profile, network=network, kv_tokens=kv_tokens)
        self.profile = profile
        self.model_name = model_name or ("smollm2-135m-instruct" if profile.startswith("cpu") else profile)
        self.max_context = int(self.timing.max_context)
        self.speed = float(speed)
        self.sleep = sleep
        total = int(kv_tokens or self.timing.total_kv_tokens)
        self.pool = KVPool(1, 1, 1, total, torch.float16, "cpu")
        self.role: Role = role
        self.batching = batching
        if chunk_size in ("auto", None):
            chunk_size = self.timing.knee()
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be a positive number of tokens")
        # The built-in engine's default batch cap on the CPU profile, vLLM's (256) on GPU profiles.
        self.max_batch = max_batch or (64 if profile.startswith("cpu") else 256)
        self.scheduler = Scheduler(
            self.pool, self.chunk_size, self.max_batch, batching,  # type: ignore[arg-type]
            max_batched_tokens=max_batched_tokens or max(self.chunk_size, self.max_context),
        )  # fmt: skip
        self._apply_style()
        self._seqs: dict[str, Sequence] = {}
        self._imported: dict[str, tuple[BlockTable, int, float]] = {}  # table, tokens, ready-at
        self._not_before: dict[str, float] = {}
        self._pending: list[StepOutput] = []
        self._order = itertools.count()
        self.steps = 0
        self.last_pass: PassShape | None = None  # the latest step's shape (None: it ran no pass)
        self.busy_s = 0.0
        self.tokens_processed = 0

    # ---- helpers --------------------------------------------------------------------------
    def _apply_style(self) -> None:
        self.scheduler.whole_prompts = self.role == "colocated" and self.batching == "vllm"

    @staticmethod
    def _seed(prompt_ids: list[int]) -> int:
        return zlib.crc32(bytes(str(prompt_ids[-64:]), "ascii")) & 0x7FFFFFFF

    def _natural_length(self, req: EngineRequest) -> int:
        mx = max(1, int(req.sampling.max_tokens))
        return 1 + self._seed(req.prompt_ids) % mx

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(token_text(t) for t in token_ids if t != EOS_ID)

    def encode(self, text: str) -> list[int]:
        return [100 + zlib.crc32(w.encode()) % (SIM_VOCAB - 100) for w in text.split()] or [100]

    # ---- EngineCore -----------------------------------------------------------------------
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
        seq = Sequence(
            req=request,
            tokens=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
            detok=_Detok(request.sampling.stop),  # type: ignore[arg-type]
            order=next(self._order),
        )
        if request.mode == "decode_only":
            imported = self._imported.get(request.request_id)
            if imported is None:
                raise ValueError(f"no imported KV for request {request.request_id!r}")
            if request.first_token is None:
                raise ValueError("a decode_only request needs first_token (sampled by the prefill side)")
            table, num_tokens, ready_at = imported
            if num_tokens != len(request.prompt_ids):
                raise ValueError(f"imported KV holds {num_tokens} tokens but the prompt has {len(request.prompt_ids)}")
            del self._imported[request.request_id]
            seq.table = table
            seq.num_computed = num_tokens
            first = int(request.first_token)
            seq.tokens.append(first)
            seq.outputs.append(first)
            seq.detok.push(first)
            self._seqs[request.request_id] = seq
            if self._ends(seq, first):
                reason = self._ends(seq, first)
                self._finish(seq)
                self._pending.append(StepOutput(request.request_id, None, "", reason))
                return
            seq.status = Status.READY
            self._not_before[request.request_id] = ready_at
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _ends(self, seq: Sequence, tok: int) -> str | None:
        sp = seq.req.sampling
        if tok == EOS_ID and not sp.ignore_eos:
            return "stop"
        if len(seq.outputs) >= sp.max_tokens or len(seq.tokens) >= self.max_context:
            return "length"
        return None

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    def _hold_back_transfers(self) -> list[Sequence]:
        """Imported requests whose modelled KV transfer has not finished wait outside the queue."""
        if not self._not_before or not self.scheduler.ready:
            return []
        now = time.monotonic()
        held = [s for s in self.scheduler.ready if self._not_before.get(s.request_id, 0.0) > now]
        for s in held:
            self.scheduler.ready.remove(s)
        return held

    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        self.last_pass = None
        held = self._hold_back_transfers()
        try:
            plan = self.scheduler.schedule()
        finally:
            for s in held:
                self.scheduler.ready.append(s)
        if not plan:
            if held and self.sleep:
                time.sleep(min(0.005, max(0.0, min(self._not_before[s.request_id] for s in held) - time.monotonic())))
            return outputs
        shape = self.last_pass = PassShape.of(plan)
        dt = self.timing.iter_s(shape.tokens, shape.units, shape.seqs, shape.dseqs, shape.ctx) / self.speed
        if self.sleep and dt > 0:
            time.sleep(dt)
        self.busy_s += dt
        self.steps += 1
        self.tokens_processed += shape.tokens + shape.dseqs
        to_sample = []
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed == len(seq.tokens):
                to_sample.append(seq)
        for seq in to_sample:
            outputs.append(self._append(seq))
        return outputs

    def _append(self, seq: Sequence) -> StepOutput:
        pos = len(seq.outputs)
        req = seq.req
        if not req.sampling.ignore_eos and pos + 1 >= self._natural_length(req) and pos + 1 < req.sampling.max_tokens:
            tok = EOS_ID
        else:
            tok = token_id(self._seed(req.prompt_ids), pos)
        seq.tokens.append(tok)
        seq.outputs.append(tok)
        delta, stopped = seq.detok.push(tok)
        reason = "stop" if stopped else self._ends(seq, tok)
        if reason is not None:
            self._finish(seq)
        elif req.mode == "prefill_only":
            reason = "prefilled"
            self.scheduler.remove(seq)
            seq.status = Status.HELD
        return StepOutput(seq.request_id, tok, delta, reason)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq)
        self._pending = [o for o in self._pending if o.request_id != request_id]
        self.release_kv(request_id)

    def export_kv(self, request_id: str) -> KVPayload:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.HELD:
            raise KeyError(f"no prefilled KV held for request {request_id!r}")
        n = seq.num_computed
        return KVPayload(
            request_id=request_id,
            num_tokens=n,
            data=torch.zeros((1, 2, n, 1, 1), dtype=torch.float16),
            model=self.model_name,
            extra={"dtype": "float16", "block_size": BLOCK_SIZE, "first_token": seq.outputs[0] if seq.outputs else None,
                   "sim_profile": self.profile},  # fmt: skip
        )

    def import_kv(self, payload: KVPayload) -> None:
        rid = payload.request_id
        if rid in self._imported or rid in self._seqs:
            raise ValueError(f"request {rid!r} already has KV or is running here")
        if payload.num_tokens < 1 or payload.num_tokens >= self.max_context:
            raise ValueError(f"KV of {payload.num_tokens} tokens does not fit the model's context")
        need = blocks_for(payload.num_tokens)
        with self.pool.lock:  # may run on another thread than step() (engine_api.import_kv)
            if not self.pool.can_allocate(need):
                raise MemoryError(
                    f"KV pool full: {payload.num_tokens} tokens need {need} blocks, {self.pool.free_blocks} free"
                )
            table = BlockTable(self.pool.allocate(need))
            ready_at = time.monotonic() + self.timing.transfer_s(payload.num_tokens) / self.speed
            self._imported[rid] = (table, payload.num_tokens, ready_at)

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
            backend="sim",
            model=self.model_name,
            **sched.load_fields(),  # type: ignore[arg-type]
            extra={
                "batching": self.batching,
                "profile": self.profile,
                "held_kv_requests": len(held),
                "imported_kv_requests": len(self._imported),
                "preemptions": sched.preemptions,
                "steps": self.steps,
                "busy_s": self.busy_s,
            },
        )

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "backend": "sim",
            "profile": self.profile,
            "timing": self.timing.describe(),
            "block_size": BLOCK_SIZE,
            "total_kv_tokens": self.pool.total_tokens,
            "dtype": "float16",
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 1,
            "chunk_size": self.chunk_size,
            "max_context": self.max_context,
            "vocab_size": SIM_VOCAB,
            "device": "sim",
            "role": self.role,
            "batching": self.batching,
            "max_batch": self.max_batch,
            "eos_token_ids": [EOS_ID],
            "kv_bytes_per_token": self.timing.kv_bytes_per_token,
            "speed": self.speed,
        }

    # ---- internals --------------------------------------------------------------------------
    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.pool.release(seq.table)
        seq.status = Status.FINISHED
        self._seqs.pop(seq.request_id, None)
        self._not_before.pop(seq.request_id, None)
