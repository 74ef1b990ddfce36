"""The built-in engine (backends/engines/native): greedy equivalence with transformers, batching styles,
chunked prefill, KV export/import, pool accounting (sampling and validation: test_engine_sampling.py)."""

from __future__ import annotations

import random

import pytest
import torch

from backends.base import SamplingParams
from backends.engines.api import EngineRequest, KVPayload
from backends.engines.native.engine import NativeEngine
from backends.engines.native.model_source import load_model
from tests.engine.helpers import N_TOKENS, TINY, disaggregated, greedy, hf_greedy, make, reqs, run


# ---- greedy equivalence ----------------------------------------------------------------------
def test_random_model_has_clear_greedy_margins(tiny_hf, prompts, references):
    """The equivalence tests are honest: at every greedy position, the gap between the top two
    logits is far larger than the numerical difference between our forward pass and transformers'."""
    from backends.engines.native.kv_cache import BlockTable, blocks_for
    from backends.engines.native.llama import ForwardBatch, PrefillSeq

    eng = make()
    worst_gap, worst_diff = float("inf"), 0.0
    for prompt, ref in zip(prompts, references, strict=True):
        seq = prompt + ref[:-1]
        n = len(seq)
        with torch.inference_mode():
            hf_logits = tiny_hf(torch.tensor([seq])).logits[0]
        # Our forward pass in 16-token chunks, later chunks reading earlier K/V from the pool.
        table = BlockTable(eng.pool.allocate(blocks_for(n)))
        parts = []
        for start in range(0, n, 16):
            end = min(n, start + 16)
            part = PrefillSeq(q_start=0, q_len=end - start, ctx_len=end)
            if start:
                part.ctx_slots = eng.pool.slots(table, 0, end)
                part.mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            batch = ForwardBatch(
                input_ids=torch.tensor(seq[start:end]),
                positions=torch.arange(start, end),
                write_slots=eng.pool.slots(table, start, end),
                prefill=[part] if end - start > 1 else [],
                num_single=1 if end - start == 1 else 0,
                single_slots=eng.pool.slots(table, 0, end)[None, :] if end - start == 1 else None,
            )
            parts.append(eng.model.forward(batch, eng.pool))
        ours = torch.cat(parts)
        eng.pool.release(table)
        gen = slice(len(prompt) - 1, n)  # the positions whose argmax is a generated token
        top2 = hf_logits[gen].topk(2, dim=-1).values
        worst_gap = min(worst_gap, float((top2[:, 0] - top2[:, 1]).min()))
        worst_diff = max(worst_diff, float((ours[gen] - hf_logits[gen]).abs().max()))
        assert ours[gen].argmax(-1).tolist() == ref
    assert worst_diff < 1e-3
    assert worst_gap > 20 * worst_diff, (worst_gap, worst_diff)
    print(f"greedy margin {worst_gap:.2e} vs forward-pass difference {worst_diff:.2e}")


@pytest.mark.parametrize(
    "batching,chunk,stagger",
    [("vllm", 16, False), ("sarathi", 16, False), ("sarathi", 64, False), ("sarathi", 16, True)],
    ids=["vllm", "sarathi-16", "sarathi-64", "sarathi-16-staggered"],
)
def test_greedy_equals_transformers_colocated(prompts, references, batching, chunk, stagger):
    eng = make(batching=batching, chunk_size=chunk)
    out = run(eng, reqs(prompts), stagger=stagger)
    for i, ref in enumerate(references):
        assert out[f"r{i}"]["tokens"] == ref, f"prompt {i} ({len(prompts[i])} tokens)"
        assert out[f"r{i}"]["finish"] == "length"
    assert eng.pool.free_tokens == eng.pool.total_tokens


def test_greedy_equals_transformers_disaggregated(prompts, references):
    pre, dec = make("prefill"), make("decode")
    for i, (p, ref) in enumerate(zip(prompts, references, strict=True)):
        got = disaggregated(pre, dec, f"r{i}", p, greedy())
        assert got["tokens"] == ref, f"prompt {i} ({len(p)} tokens)"
    assert pre.pool.free_tokens == pre.pool.total_tokens
    assert dec.pool.free_tokens == dec.pool.total_tokens


@pytest.mark.parametrize("batching", ["sarathi", "vllm"])
def test_decode_role_serves_full_requests_in_hybrid_chunks(prompts, references, batching):
    """The orchestrator's co-located fallback: a decode engine prefills a `full` request's prompt in
    chunks inside its token budget, next to its running decodes (imported and its own), and the
    greedy tokens equal transformers'. The batching style does not change that: whole-prompt
    (vLLM) passes are for the co-located role only."""
    pre, dec = make("prefill"), make("decode", batching=batching)
    # A disaggregated request decoding from imported KV ...
    pre.add_request(EngineRequest("kv", prompts[2], greedy(), mode="prefill_only"))
    first = [o for _ in range(8) for o in pre.step()][-1]
    payload = pre.export_kv("kv")
    pre.release_kv("kv")
    dec.import_kv(payload)
    dec.add_request(EngineRequest("kv", prompts[2], greedy(), mode="decode_only", first_token=first.token_id))
    # ... and a short full request that is decoding too, then a long prompt (130 tokens) arrives.
    dec.add_request(EngineRequest("short", prompts[1], greedy()))
    out: dict[str, list[int]] = {"kv": [first.token_id], "short": [], "long": []}
    finish: dict[str, str | None] = {}
    hybrid = 0
    while dec.has_work():
        if dec.steps == 1:
            dec.add_request(EngineRequest("long", prompts[6], greedy()))
        for o in dec.step():
            if o.token_id is not None:
                out[o.request_id].append(o.token_id)
            finish[o.request_id] = o.finish_reason
        shape = dec.last_pass
        if shape is not None:
            assert shape.tokens + shape.dseqs <= dec.chunk_size, shape  # inside the token budget
            hybrid += shape.tokens > 0 and shape.dseqs > 0
    assert hybrid >= len(prompts[6]) // dec.chunk_size  # the long prompt ran beside decodes, chunk by chunk
    assert out["kv"] == references[2]
    assert out["short"] == references[1]
    assert out["long"] == references[6]
    assert finish == {"kv": "length", "short": "length", "long": "length"}
    assert dec.pool.free_tokens == dec.pool.total_tokens


def test_greedy_equivalence_survives_preemption(prompts, references):
    # A pool far too small for everything at once: decodes run out of blocks and preempt.
    eng = make(kv_tokens=16 * 24, max_batch=8)
    out = run(eng, reqs(prompts))
    assert eng.scheduler.preemptions > 0
    for i, ref in enumerate(references):
        assert out[f"r{i}"]["tokens"] == ref
    assert eng.pool.free_tokens == eng.pool.total_tokens


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers():
    hf, tokenizer, _ = load_model("smollm2-135m-instruct", dtype=torch.float32)
    eng = NativeEngine("smollm2-135m-instruct", chunk_size=16, kv_tokens=4096, dtype="float32")
    dec = NativeEngine("smollm2-135m-instruct", role="decode", chunk_size=16, kv_tokens=4096)
    pre = NativeEngine("smollm2-135m-instruct", role="prefill", chunk_size=16, kv_tokens=4096)
    messages = [
        {
            "role": "user",
            "content": (
                "Write two sentences about the ocean. Explain in simple words why tides happen on "
                "Earth twice a day, and what the Moon has to do with it."
            ),
        }
    ]
    prompt = eng.apply_chat_template(messages)
    assert len(prompt) > 48  # more than three chunks of 16
    ref = hf_greedy(hf, prompt, N_TOKENS)
    got = run(eng, [EngineRequest("s", prompt, greedy())])["s"]
    assert got["tokens"] == ref
    assert got["text"] == eng.detokenize(ref)
    assert len(got["text"]) > 20
    split = disaggregated(pre, dec, "s", prompt, greedy())
    assert split["tokens"] == ref
    assert split["text"] == got["text"]


# ---- batching mechanics ----------------------------------------------------------------------
def test_chunked_prefill_packs_prompts_and_spreads_long_ones():
    eng = make(chunk_size=64)
    rng = random.Random(1)
    for i in range(3):
        eng.add_request(EngineRequest(f"p{i}", [rng.randrange(3, 4000) for _ in range(10)], greedy(4)))
    outs = eng.step()  # three 10-token prompts share one 64-token chunk
    assert eng.tokens_processed == 30
    assert sorted(o.request_id for o in outs) == ["p0", "p1", "p2"]
    run(eng, [])

    eng = make(chunk_size=16)
    eng.add_request(EngineRequest("long", list(range(5, 105)), greedy(4)))  # 100 tokens
    steps = 0
    while True:
        steps += 1
        outs = eng.step()
        assert eng.tokens_processed <= 16 * steps
        if outs:
            break
    assert steps == 7  # ceil(100 / 16) chunks before the first token
    load = eng.load()
    assert load.running == 1 and load.running_prompt_tokens == 0
    run(eng, [])


def test_sarathi_runs_decodes_first_then_chunks_in_budget():
    eng = make(chunk_size=16)
    eng.add_request(EngineRequest("d", list(range(5, 15)), greedy(20)))
    eng.step()  # d prefilled, now decoding
    eng.add_request(EngineRequest("p", list(range(5, 105)), greedy(4)))
    before = eng.tokens_processed
    outs = eng.step()  # hybrid: d's decode token + 15 prompt tokens
    assert eng.tokens_processed - before == 16
    assert [o.request_id for o in outs] == ["d"]
    assert eng.load().running_prompt_tokens == 100 - 15
    run(eng, [])


def test_vllm_style_prefills_whole_prompts_first():
    eng = make(batching="vllm", chunk_size=16)
    eng.add_request(EngineRequest("d", list(range(5, 15)), greedy(20)))
    eng.step()
    eng.add_request(EngineRequest("p", list(range(5, 105)), greedy(4)))
    before = eng.tokens_processed
    outs = eng.step()  # the waiting prompt, whole, and no decode
    assert eng.tokens_processed - before == 100
    assert [o.request_id for o in outs] == ["p"]
    outs = eng.step()  # then one decode batch with both
    assert sorted(o.request_id for o in outs) == ["d", "p"]
    run(eng, [])


def test_full_pool_keeps_prompts_waiting():
    eng = make(kv_tokens=16 * 8, chunk_size=64)  # 128 tokens of KV
    for i in range(4):
        # 60 + 8 tokens each, no two sharing a block (the queued ones would hit the prefix cache)
        eng.add_request(EngineRequest(f"w{i}", list(range(5 + 100 * i, 65 + 100 * i)), greedy(8)))
    eng.step()
    load = eng.load()
    assert load.running >= 1 and load.queued >= 1
    assert load.queued_prompt_tokens == 60 * load.queued
    out = run(eng, [])
    assert all(out[f"w{i}"]["finish"] == "length" for i in range(4))
    assert eng.pool.free_tokens == eng.pool.total_tokens


# ---- KV export / import, release, abort -------------------------------------------------------
def test_kv_export_import_roundtrip(prompts):
    pre = make("prefill")
    pre.add_request(EngineRequest("k", prompts[4], greedy(), mode="prefill_only"))
    while pre.has_work():
        pre.step()
    assert pre.load().extra["held_kv_requests"] == 1
    payload = pre.export_kv("k")
    info = pre.info()
    assert tuple(payload.data.shape) == (
        info["num_layers"],
        2,
        len(prompts[4]),
        info["num_kv_heads"],
        info["head_dim"],
    )
    assert payload.data.abs().sum() > 0
    used = pre.pool.total_tokens - pre.pool.free_tokens
    assert used == 16 * ((len(prompts[4]) + 15) // 16)  # held until released
    pre.release_kv("k")
    assert pre.pool.free_tokens == pre.pool.total_tokens

    dec = make("decode")
    dec.import_kv(payload)
    assert dec.load().extra["imported_kv_tokens"] == len(prompts[4])
    imported = dec._imported["k"]
    table, n = imported.table, imported.num_tokens
    assert torch.equal(dec.pool.read(table, n), payload.data)
    with pytest.raises(ValueError):
        dec.import_kv(payload)  # already there
    dec.release_kv("k")  # nobody claimed it
    assert dec.pool.free_tokens == dec.pool.total_tokens

    small = make("decode", kv_tokens=32)
    with pytest.raises(MemoryError):
        small.import_kv(payload)
    assert small.pool.free_tokens == small.pool.total_tokens
    bad = KVPayload("b", 4, torch.zeros(1, 2, 4, 1, 1), model="x")
    with pytest.raises(ValueError):
        dec.import_kv(bad)
    with pytest.raises(ValueError):  # decode_only without imported KV
        dec.add_request(EngineRequest("nokv", prompts[4], greedy(), mode="decode_only", first_token=5))


def test_prefill_only_that_finishes_frees_its_kv(engine, prompts):
    pre = make("prefill")
    out = run(pre, [EngineRequest("one", prompts[2], greedy(1), mode="prefill_only")])["one"]
    assert out["finish"] == "length" and len(out["tokens"]) == 1
    assert pre.pool.free_tokens == pre.pool.total_tokens
    with pytest.raises(KeyError):
        pre.export_kv("one")


def test_abort_everywhere_frees_the_pool(prompts):
    eng = make(chunk_size=16, max_batch=4)
    rs = reqs(prompts, max_tokens=64)
    for r in rs:
        eng.add_request(r)
    for _ in range(6):
        eng.step()
    # Some are waiting, one is mid-prefill, some decode.
    states = {s.status.value for s in eng._seqs.values()}
    assert "waiting" in states and "running" in states
    for r in rs[::2]:
        eng.abort(r.request_id)
    out = run(eng, [])
    assert not any(r.request_id in out for r in rs[::2])  # nothing after an abort
    assert all(out[r.request_id]["finish"] == "length" for r in rs[1::2])
    assert eng.pool.free_tokens == eng.pool.total_tokens

    # Held (prefilled) and imported-but-unclaimed KV.
    pre, dec = make("prefill"), make("decode")
    pre.add_request(EngineRequest("h", prompts[3], greedy(), mode="prefill_only"))
    run(pre, [])
    payload = pre.export_kv("h")
    pre.abort("h")
    dec.import_kv(payload)
    dec.abort("h")
    assert pre.pool.free_tokens == pre.pool.total_tokens
    assert dec.pool.free_tokens == dec.pool.total_tokens
    assert not eng.has_work() and not pre.has_work() and not dec.has_work()


def test_pool_returns_to_empty_after_many_requests():
    eng = make(kv_tokens=16 * 64, chunk_size=32, max_batch=16)
    rng = random.Random(3)
    rs = [
        EngineRequest(
            f"m{i}",
            [rng.randrange(3, 49000) for _ in range(rng.randint(1, 90))],
            SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=rng.randint(1, 24), seed=i),
            predicted_output_lo=rng.choice([None, 0, 50, 200]),
            heavy_decode=rng.choice([None, True, False]),
        )
        for i in range(60)
    ]
    out: dict[str, dict] = {}
    pending = list(rs)
    while pending or eng.has_work():
        for _ in range(3):
            if pending:
                eng.add_request(pending.pop(0))
        load = eng.load()
        assert load.heavy_decodes + load.light_decodes <= load.running + load.queued
        assert load.free_kv_tokens <= load.total_kv_tokens
        for o in eng.step():
            out.setdefault(o.request_id, []).append(o)
    assert len(out) == 60
    assert all(v[-1].finish_reason in ("length", "stop") for v in out.values())
    for r in rs:
        n = sum(o.token_id is not None for o in out[r.request_id])
        assert 1 <= n <= r.sampling.max_tokens
    assert eng.pool.free_tokens == eng.pool.total_tokens
    assert not eng._seqs


def test_load_report(engine, prompts):
    engine.add_request(EngineRequest("h", prompts[2], greedy(40), predicted_output_lo=30, heavy_decode=True))
    engine.add_request(EngineRequest("l", prompts[1], greedy(40), predicted_output_lo=5))
    engine.add_request(EngineRequest("q", prompts[6], greedy(4)))
    load = engine.load()
    assert load.queued == 3 and load.running == 0
    assert load.queued_prompt_tokens == len(prompts[2]) + len(prompts[1]) + len(prompts[6])
    for _ in range(4):
        engine.step()
    load = engine.load()
    assert load.backend == "native" and load.model == TINY and load.chunk_size == 16
    assert load.heavy_decodes == 1 and load.light_decodes == 1
    h, lo = engine._seqs["h"], engine._seqs["l"]
    assert sorted(load.decode_remaining) == sorted([30 - len(h.outputs), max(0, 5 - len(lo.outputs))])
    assert load.free_kv_tokens < load.total_kv_tokens
    info = engine.info()
    assert info["block_size"] == 16 and info["total_kv_tokens"] == load.total_kv_tokens
    for rid in ("h", "l", "q"):
        engine.abort(rid)
    assert engine.load().free_kv_tokens == load.total_kv_tokens


def test_kv_imports_on_another_thread_beside_steps_keep_outputs_and_the_pool_exact(prompts, references):
    # The worker imports pushed KV off the engine thread (the copy overlaps a forward pass). Run
    # imports on a second thread while the decode engine steps other requests; every request must
    # still decode exactly as transformers does, and no block may end up in two places.
    import threading

    pre = make("prefill")
    payloads, firsts = {}, {}
    for i, p in enumerate(prompts):
        rid = f"t{i}"
        pre.add_request(EngineRequest(rid, p, greedy(), mode="prefill_only"))
        while pre.has_work():
            for o in pre.step():
                firsts[o.request_id] = o.token_id
        payloads[rid] = pre.export_kv(rid)
        pre.release_kv(rid)
    dec = make("decode", kv_tokens=1024)
    imported: list[str] = []
    errors: list[BaseException] = []

    def importer() -> None:
        try:
            for rid, payload in payloads.items():
                for _ in range(20):  # churn: import, drop, import again while steps run
                    dec.import_kv(payload)
                    dec.release_kv(rid)
                dec.import_kv(payload)
                imported.append(rid)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=importer)
    thread.start()
    out: dict[str, list[int]] = {}
    added: set[str] = set()
    while thread.is_alive() or len(added) < len(payloads) or dec.has_work():
        for rid in list(imported):
            if rid not in added:
                i = int(rid[1:])
                dec.add_request(EngineRequest(rid, prompts[i], greedy(), mode="decode_only", first_token=firsts[rid]))
                added.add(rid)
        for o in dec.step():
            out.setdefault(o.request_id, []).append(o.token_id)
        if errors:
            break
    thread.join()
    assert not errors, errors
    for i, ref in enumerate(references):
        assert [firsts[f"t{i}"], *out[f"t{i}"]] == ref
    assert dec.pool.free_tokens == dec.pool.total_tokens
    # Each block once among the free ones (unhashed, or cached and evictable): none leaked or doubled.
    assert sorted([*dec.pool._free, *dec.pool._evictable]) == list(range(1, dec.pool.num_blocks + 1))
