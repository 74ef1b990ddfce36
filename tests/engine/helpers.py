"""Helpers for the built-in engine's tests: the tiny random model, greedy sampling, running requests
to completion, a disaggregated run, transformers' greedy reference."""

from __future__ import annotations

import torch

from backends.base import SamplingParams
from backends.engines.api import EngineRequest, StepOutput
from backends.engines.native.engine import NativeEngine

TINY = "random:tiny-llama"


N_TOKENS = 32


# Different lengths; several longer than three chunks of 16 (> 48 tokens).


PROMPT_LENGTHS = (1, 7, 16, 33, 50, 77, 130)


def greedy(max_tokens: int = N_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(engine: NativeEngine, requests: list[EngineRequest], stagger: bool = False) -> dict[str, dict]:
    """Drive the engine until idle; collect tokens, text and finish reason per request."""
    out: dict[str, dict] = {}
    pending = list(requests)
    if not stagger:
        for r in pending:
            engine.add_request(r)
        pending = []
    while pending or engine.has_work():
        if pending:  # continuous batching: one new request joins per step
            engine.add_request(pending.pop(0))
        for o in engine.step():
            rec = out.setdefault(o.request_id, {"tokens": [], "text": "", "finish": None, "outputs": []})
            assert rec["finish"] is None, f"output after finish: {o}"
            if o.token_id is not None:
                rec["tokens"].append(o.token_id)
            rec["text"] += o.text
            rec["finish"] = o.finish_reason
            rec["outputs"].append(o)
    return out


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        gen = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return gen[0, len(prompt) :].tolist()


def disaggregated(prefill: NativeEngine, decode: NativeEngine, rid: str, prompt: list[int], sp: SamplingParams) -> dict:
    """Prefill on one engine, move the KV, decode on the other; return tokens/text/finish."""
    prefill.add_request(EngineRequest(rid, prompt, sp, mode="prefill_only"))
    first: StepOutput | None = None
    while prefill.has_work():
        for o in prefill.step():
            first = o
    assert first is not None
    if first.finish_reason != "prefilled":  # the first token already ended it
        assert not prefill.has_work() and prefill.pool.free_tokens == prefill.pool.total_tokens
        return {"tokens": [first.token_id], "text": first.text, "finish": first.finish_reason}
    payload = prefill.export_kv(rid)
    assert payload.num_tokens == len(prompt)
    prefill.release_kv(rid)
    decode.import_kv(payload)
    decode.add_request(EngineRequest(rid, prompt, sp, mode="decode_only", first_token=first.token_id))
    rest = run(decode, [])[rid]
    return {
        "tokens": [first.token_id] + rest["tokens"],
        "text": first.text + rest["text"],
        "finish": rest["finish"],
    }


def make(role="colocated", **kw) -> NativeEngine:
    kw.setdefault("chunk_size", 16)
    kw.setdefault("kv_tokens", 8192)
    eng = NativeEngine(TINY, role=role, dtype="float32", **kw)
    # Poison every slot but the null block: a read of never-written KV turns outputs into garbage.
    eng.pool.k[:, eng.pool.block_size :] = float("nan")
    eng.pool.v[:, eng.pool.block_size :] = float("nan")
    return eng


def reqs(prompts, **kw) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", p, greedy(**kw)) for i, p in enumerate(prompts)]
