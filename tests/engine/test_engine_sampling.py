"""The built-in engine: sampling, stop strings, EOS, max_tokens, detokenization, validation."""

from __future__ import annotations

import pytest

from backends.base import SamplingParams
from backends.engines.api import EngineRequest
from tests.engine.helpers import N_TOKENS, disaggregated, greedy, make, run


# ---- sampling, stop, EOS, max_tokens ---------------------------------------------------------
def test_max_tokens(engine, prompts):
    out = run(engine, [EngineRequest("m", prompts[2], greedy(5))])["m"]
    assert len(out["tokens"]) == 5 and out["finish"] == "length"
    out = run(engine, [EngineRequest("one", prompts[2], greedy(1))])["one"]
    assert len(out["tokens"]) == 1 and out["finish"] == "length"


def test_eos_stops_unless_ignored(engine, prompts, references):
    eos = references[4][5]
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS)
        out = run(engine, [EngineRequest("e", prompts[4], sp)])["e"]
        first = references[4].index(eos)
        assert out["tokens"] == references[4][: first + 1]
        assert out["finish"] == "stop"
        out = run(engine, [EngineRequest("i", prompts[4], greedy())])["i"]
        assert out["tokens"] == references[4] and out["finish"] == "length"
    finally:
        engine.eos_ids = saved


def test_text_deltas_and_stop_strings(engine, prompts):
    full = run(engine, [EngineRequest("t", prompts[5], greedy())])["t"]
    text = full["text"]
    assert text == engine.detokenize(full["tokens"])
    assert len(text) > 20
    # A stop string whose first occurrence is well past the first token.
    stop = next(text[i : i + 4] for i in range(len(text) // 2, len(text) - 4) if text.index(text[i : i + 4]) > 8)
    cut = text[: text.index(stop)]
    out = run(engine, [EngineRequest("s", prompts[5], greedy(stop=["@@never@@", stop]))])["s"]
    assert out["finish"] == "stop"
    assert out["text"] == cut
    assert stop not in out["text"]
    # The same cut when the stop string is found on the decode side of a disaggregated run.
    pre, dec = make("prefill"), make("decode")
    split = disaggregated(pre, dec, "s", prompts[5], greedy(stop=[stop]))
    assert split["text"] == cut and split["finish"] == "stop"


def test_incremental_detokenizer_multibyte(engine):
    from backends.engines.native.detokenize import IncrementalDetokenizer

    text = "Grüße aus Köln 🙂🚀 — 東京で会いましょう! ok"
    ids = engine.encode(text)
    detok = IncrementalDetokenizer(engine.tokenizer, [1, 2, 3])
    deltas = [detok.push(t)[0] for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == engine.detokenize(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len(engine.encode("Grüße aus Köln")) + 2  # emoji split over tokens

    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=["Köln"])
    got = ""
    for t in ids:
        delta, stopped = detok.push(t)
        got += delta
        if stopped:
            break
    assert stopped and got == "Grüße aus "


def test_seeded_sampling_reproducible(prompts):
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    a = make()
    alone = run(a, [EngineRequest("x", prompts[3], sp)])["x"]["tokens"]
    # Batched with other work, at another chunk size, and split across two engines.
    b = make(chunk_size=64)
    others = [EngineRequest(f"o{i}", p, greedy(8)) for i, p in enumerate(prompts[:3])]
    batched = run(b, others + [EngineRequest("x", prompts[3], sp)], stagger=True)["x"]["tokens"]
    split = disaggregated(make("prefill"), make("decode"), "x", prompts[3], sp)["tokens"]
    assert alone == batched == split
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=99, ignore_eos=True)
    assert run(a, [EngineRequest("y", prompts[3], other_seed)])["y"]["tokens"] != alone
    # top_p tiny: only the most likely token survives, so sampling equals greedy.
    narrow = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, ignore_eos=True)
    assert (
        run(a, [EngineRequest("z", prompts[3], narrow)])["z"]["tokens"]
        == run(a, [EngineRequest("g", prompts[3], greedy(8))])["g"]["tokens"]
    )


# ---- validation ------------------------------------------------------------------------------
def test_rejects_requests_it_can_never_serve(engine):
    ctx = engine.max_context
    with pytest.raises(ValueError, match="context"):
        engine.add_request(EngineRequest("long", [5] * (ctx + 1), greedy(1)))
    with pytest.raises(ValueError, match="context"):
        engine.add_request(EngineRequest("long2", [5] * (ctx - 10), greedy(20)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest("empty", [], greedy(1)))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(EngineRequest("zero", [5], greedy(0)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(EngineRequest("vocab", [10**9], greedy(1)))
    engine.add_request(EngineRequest("dup", [5, 6], greedy(1)))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(EngineRequest("dup", [5, 6], greedy(1)))
    run(engine, [])
    pre = make("prefill")
    with pytest.raises(ValueError, match="prefill engine"):
        pre.add_request(EngineRequest("full", [5, 6], greedy(1)))
    with pytest.raises(ValueError, match="KV pool"):
        make(kv_tokens=64).add_request(EngineRequest("big", [5] * 60, greedy(20)))
    assert engine.pool.free_tokens == engine.pool.total_tokens


def test_set_role_and_chat_template(engine):
    ids = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids and all(isinstance(i, int) for i in ids)
    assert "hi" in engine.detokenize(ids)
    eng = make()
    eng.set_role("prefill")
    assert eng.load().role == "prefill"
    eng.add_request(EngineRequest("p", [5, 6, 7], greedy(4), mode="prefill_only"))
    with pytest.raises(RuntimeError):
        eng.set_role("decode")
