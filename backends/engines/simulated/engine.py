"""SimEngine: the built-in engine's scheduler with the model replaced by a timing model.

`tetri worker --backend sim --profile PROFILE` serves the same HTTP API as the native worker over this
EngineCore. Each ``step()`` asks the native ``Scheduler`` (same chunked / whole-prompt batching, same
paged-KV admission and preemption) for the next pass, sleeps the pass time the ``TimingModel`` gives
for its prefill tokens, decode batch and KV context (divided by ``speed``), and samples deterministic
token ids: a request's tokens depend only on its prompt and position, so every run of a workload
produces the same text. Everything around the pass (admission, finishing, KV bookkeeping, load) is
``ScheduledEngine``'s, shared with the native engine, so a sim worker behaves like a native one.

* Output length: with ``ignore_eos`` the request runs to ``max_tokens`` ("length"); without it, it
  stops with EOS ("stop") after a deterministic pseudo-random length in [1, max_tokens] drawn from
  its prompt (like a real model, but reproducible).
* KV export/import: payloads are tiny tensors ``[1, 2, tokens, 1, 1]`` (the pool is bookkeeping only),
  so HTTP transfers are cheap; the modelled transfer time of the profile's link
  (``TimingModel.transfer_s``) is charged on the decode side: an imported request cannot join a
  batch before the transfer would have finished.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import torch

from backends.base import Role
from backends.engines.api import EngineRequest, PassShape
from backends.engines.native.engine_base import ScheduledEngine, check_role
from backends.engines.native.kv_cache import KVPool
from backends.engines.native.sequence import Sequence
from backends.engines.simulated.profiles import get_timing

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


class SimEngine(ScheduledEngine):
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
        check_role(role)
        self.timing = get_timing(profile, network=network, kv_tokens=kv_tokens)
        self.profile = profile
        self.model_name = model_name or ("smollm2-135m-instruct" if profile.startswith("cpu") else profile)
        self.max_context = int(self.timing.max_context)
        self.eos_ids = {EOS_ID}
        self.speed = float(speed)
        self.sleep = sleep
        total = int(kv_tokens or self.timing.total_kv_tokens)
        if chunk_size in ("auto", None):
            chunk_size = self.timing.knee()
        # The built-in engine's default batch cap on the CPU profile, vLLM's (256) on GPU profiles.
        max_batch = max_batch or (64 if profile.startswith("cpu") else 256)
        pool = KVPool(1, 1, 1, total, torch.float16, "cpu")  # bookkeeping only: one 1-wide "layer"
        super().__init__(pool, role, batching, int(chunk_size), max_batch, max_batched_tokens)
        # When each imported request's modelled KV transfer has finished (time.monotonic()).
        self._not_before: dict[str, float] = {}
        self._wake_at: float | None = None  # the earliest transfer the last _plan() held back for
        self.busy_s = 0.0

    # ---- helpers --------------------------------------------------------------------------
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

    # ---- ScheduledEngine hooks: a pass is a modelled sleep plus deterministic tokens ------
    def _detokenizer(self, request: EngineRequest) -> _Detok:  # type: ignore[override]
        return _Detok(request.sampling.stop)

    def _hold_back_transfers(self) -> list[Sequence]:
        """Imported requests whose modelled KV transfer has not finished wait outside the queue."""
        if not self._not_before or not self.scheduler.ready:
            return []
        now = time.monotonic()
        held = [s for s in self.scheduler.ready if self._not_before.get(s.request_id, 0.0) > now]
        for s in held:
            self.scheduler.ready.remove(s)
        return held

    def _plan(self) -> list[tuple[Sequence, int]]:
        held = self._hold_back_transfers()
        try:
            plan = self.scheduler.schedule()
        finally:
            for s in held:
                self.scheduler.ready.append(s)
        self._wake_at = min(self._not_before[s.request_id] for s in held) if held else None
        return plan

    def _idle(self, has_outputs: bool) -> None:
        if self._wake_at is not None and self.sleep:
            # Only a transfer still in flight can unblock us: wait for it (a little) rather than spin.
            time.sleep(min(0.005, max(0.0, self._wake_at - time.monotonic())))

    def _run_pass(self, plan: list[tuple[Sequence, int]], shape: PassShape) -> list[tuple[Sequence, int]]:
        dt = self.timing.iter_s(shape.tokens, shape.units, shape.seqs, shape.dseqs, shape.ctx) / self.speed
        if self.sleep and dt > 0:
            time.sleep(dt)
        self.busy_s += dt
        return [(seq, self._next_token(seq)) for seq, n in plan if seq.num_computed + n == len(seq.tokens)]

    def _next_token(self, seq: Sequence) -> int:
        pos = len(seq.outputs)
        req = seq.req
        if not req.sampling.ignore_eos and pos + 1 >= self._natural_length(req) and pos + 1 < req.sampling.max_tokens:
            return EOS_ID
        return token_id(self._seed(req.prompt_ids), pos)

    def _kv_data(self, seq: Sequence) -> torch.Tensor:
        # A stand-in of the right token count: the transfer's cost is modelled on import instead.
        return torch.zeros((1, 2, seq.num_computed, 1, 1), dtype=torch.float16)

    def _kv_extra(self) -> dict[str, Any]:
        return {"sim_profile": self.profile}

    def _on_import(self, request_id: str, num_tokens: int) -> None:
        self._not_before[request_id] = time.monotonic() + self.timing.transfer_s(num_tokens) / self.speed

    def _load_extra(self) -> dict[str, Any]:
        return {"profile": self.profile, "busy_s": self.busy_s}

    def _model_info(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "timing": self.timing.describe(),
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 1,
            "vocab_size": SIM_VOCAB,
            "device": "sim",
            "kv_bytes_per_token": self.timing.kv_bytes_per_token,
            "speed": self.speed,
        }

    # ---- internals --------------------------------------------------------------------------
    def release_kv(self, request_id: str) -> None:
        super().release_kv(request_id)
        self._not_before.pop(request_id, None)

    def _finish(self, seq: Sequence) -> None:
        super()._finish(seq)
        self._not_before.pop(seq.request_id, None)
