"""Prefix caching in the built-in engine (issue 18): hash-chained full blocks shared by reference
count, LRU eviction of unreferenced cached blocks, the sequence-numbered event log the load report
carries, KV pushes into a worker that holds the prefix, and greedy outputs unchanged by hits (equal
to transformers')."""

from __future__ import annotations

import asyncio
import random
import re

import httpx
import pytest
import torch

from backends.base import SamplingParams
from backends.engines.api import EngineRequest
from backends.engines.native.kv_cache import KVEventLog, KVPool
from backends.engines.native.model_source import load_model
from backends.prefix import BLOCK_TOKENS, block_hashes, reusable_tokens
from tests.engine.helpers import disaggregated, hf_greedy, make, run

B = BLOCK_TOKENS


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_hf():
    model, _tokenizer, _ = load_model("random:tiny-llama", dtype=torch.float32)
    return model


@pytest.fixture(scope="module")
def system() -> list[int]:
    rng = random.Random(11)
    return [rng.randrange(3, 49000) for _ in range(75)]  # 4 full blocks and a partial one


def tails(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def assert_idle_and_empty(eng) -> None:
    """No leaked references: every block unreferenced (cached or not), nothing held."""
    assert not eng.has_work() and not eng._seqs and not eng._imported
    assert eng.pool.used_blocks == 0 and eng.pool.free_tokens == eng.pool.total_tokens
    assert all(r == 0 for r in eng.pool._ref[1:])


# ---- greedy equivalence --------------------------------------------------------------------------
@pytest.mark.parametrize("batching,chunk", [("sarathi", 16), ("sarathi", 64), ("vllm", 16)])
def test_greedy_with_hits_equals_without_and_transformers(tiny_hf, system, batching, chunk):
    cached, plain = (
        make(batching=batching, chunk_size=chunk),
        make(batching=batching, chunk_size=chunk, prefix_caching=False),
    )
    prompts = [system + t for t in tails(4, seed=1)]
    first = run(cached, [EngineRequest("warm", prompts[0], greedy(20))])["warm"]
    assert first["outputs"][0].cached_tokens == 0
    # The rest share the 4 system blocks, some admitted together (one may hit what another registers).
    got = run(cached, [EngineRequest(f"p{i}", p, greedy()) for i, p in enumerate(prompts[1:])], stagger=True)
    ref = run(plain, [EngineRequest(f"p{i}", p, greedy()) for i, p in enumerate(prompts[1:])], stagger=True)
    for i, p in enumerate(prompts[1:]):
        out = got[f"p{i}"]
        assert out["outputs"][0].cached_tokens == 4 * B
        assert out["tokens"] == ref[f"p{i}"]["tokens"] == hf_greedy(tiny_hf, p, 12)
        assert out["text"] == ref[f"p{i}"]["text"]
    # A second turn: the prompt is the first turn's prompt and answer (generated blocks hit too).
    turn2 = prompts[0] + first["tokens"] + [7, 8, 9]
    out = run(cached, [EngineRequest("t2", turn2, greedy())])["t2"]
    computed = len(prompts[0]) + 19  # the last token sampled was never fed
    assert out["outputs"][0].cached_tokens == reusable_tokens(len(turn2), computed // B) == computed // B * B
    assert computed // B * B > len(prompts[0])  # a block of generated tokens hit
    assert out["tokens"] == hf_greedy(tiny_hf, turn2, 12)
    assert_idle_and_empty(cached)


def test_a_fully_cached_prompt_recomputes_its_last_token(tiny_hf, system):
    eng = make(chunk_size=32)
    prompt = system[: 4 * B]  # exactly 4 full blocks
    run(eng, [EngineRequest("a", prompt, greedy(1))])
    before = eng.tokens_processed
    out = run(eng, [EngineRequest("b", prompt, greedy(6))])["b"]
    assert out["outputs"][0].cached_tokens == 3 * B  # (n - 1) // B blocks: the last one holds the last token
    assert eng.tokens_processed - before == B + 5  # that block's tokens, then 5 decode steps
    assert out["tokens"] == hf_greedy(tiny_hf, prompt, 6)
    assert_idle_and_empty(eng)


def test_hit_and_query_counters_and_load_report(system):
    eng = make(chunk_size=64)
    a, b = system + [5] * 10, system + [6] * 30
    run(eng, [EngineRequest("a", a, greedy(3))])
    run(eng, [EngineRequest("b", b, greedy(3))])
    load = eng.load()
    assert load.prefix_query_tokens == len(a) + len(b)
    assert load.prefix_hit_tokens == 4 * B
    # a: 5 full blocks of prompt+outputs computed (85 + 2 > 80); b: 6 (105 + 2), 4 of them shared.
    assert load.cached_blocks == (len(a) + 2) // B + (len(b) + 2) // B - 4
    assert load.extra["used_kv_blocks"] == 0
    assert eng.info()["prefix_caching"] is True


# ---- eviction, leaks, preemption -----------------------------------------------------------------
def test_eviction_under_memory_pressure_is_lru_and_keeps_outputs_exact(system):
    eng = make(kv_tokens=16 * B, chunk_size=32)  # 16 blocks
    plain = make(kv_tokens=16 * B, chunk_size=32, prefix_caching=False)
    rng = random.Random(4)
    others = [[rng.randrange(3, 49000) for _ in range(60)] for _ in range(3)]
    keep = system + [1, 2, 3]
    run(eng, [EngineRequest("keep", keep, greedy(4))])
    since = eng.pool.events.seq
    for i, p in enumerate(others):  # each leaves 3 cached blocks (60 + 3 tokens computed)
        run(eng, [EngineRequest(f"o{i}", p, greedy(4))])
        run(eng, [EngineRequest(f"k{i}", keep, greedy(4))])  # touching `keep` keeps its prefix recent
    assert not eng.kv_events(since).removed  # so far the unhashed free blocks sufficed
    # A prompt of 10 blocks: 2 are unhashed, so 8 cached ones go, least recently used first.
    big = [rng.randrange(3, 49000) for _ in range(150)]
    got = run(eng, [EngineRequest("big", big, greedy(8))])["big"]
    assert got["tokens"] == run(plain, [EngineRequest("big", big, greedy(8))])["big"]["tokens"]
    events = eng.kv_events(since)
    assert events is not None and len(events.removed) == 8
    assert set(block_hashes(keep, eng.model_name)[:4]) <= set(eng.pool._by_hash)  # the recent prefix survived
    assert not set(block_hashes(others[0], eng.model_name)) & set(eng.pool._by_hash)  # the oldest went
    assert eng.pool.cached_blocks <= eng.pool.num_blocks
    again = run(eng, [EngineRequest("k", keep, greedy(4))])["k"]
    assert again["outputs"][0].cached_tokens == 4 * B
    assert_idle_and_empty(eng)


def test_pools_return_to_empty_after_aborts_preemption_and_pushes(system):
    eng = make(kv_tokens=24 * B, chunk_size=32, max_batch=8)
    rng = random.Random(9)
    rs = [
        EngineRequest(f"m{i}", system[: rng.choice((20, 40, 75))] + t, greedy(rng.randint(1, 30)))
        for i, t in enumerate(tails(24, seed=5))
    ]
    pending = list(rs)
    steps = 0
    while pending or eng.has_work():
        for _ in range(2):
            if pending:
                eng.add_request(pending.pop(0))
        eng.step()
        steps += 1
        if steps % 5 == 0 and eng._seqs:  # abort one in flight: waiting, mid-prefill or decoding
            eng.abort(sorted(eng._seqs)[0])
    assert eng.scheduler.preemptions > 0  # the small pool preempted decodes (recomputed from the cache)
    assert eng.load().prefix_hit_tokens > 0
    assert_idle_and_empty(eng)

    pre, dec = make("prefill"), make("decode")
    run(dec, [EngineRequest("warm", system + [4], greedy(2))])
    for i in range(3):
        disaggregated(pre, dec, f"d{i}", system + tails(1, seed=20 + i)[0], greedy(5))
    pre.add_request(EngineRequest("x", system + [9], greedy(), mode="prefill_only"))
    run(pre, [])
    payload = pre.export_kv("x")
    pre.release_kv("x")
    dec.import_kv(payload)  # imported (sharing cached blocks), never claimed
    dec.abort("x")
    assert_idle_and_empty(pre)
    assert_idle_and_empty(dec)


# ---- namespaces ----------------------------------------------------------------------------------
def test_cached_blocks_are_never_shared_across_models(system):
    assert block_hashes(system, "model-a") != block_hashes(system, "model-b")
    eng = make(chunk_size=64)
    run(eng, [EngineRequest("a", system, greedy(2))])
    stored = eng.kv_events(0).stored  # a new asker: the whole cached set
    assert set(stored) == set(block_hashes(system, eng.model_name)[:4])
    assert not set(stored) & set(block_hashes(system, "another-model"))
    # A push that names another model's hashes shares nothing, and its claim is refused.
    pre = make("prefill")
    pre.add_request(EngineRequest("x", system + [1], greedy(), mode="prefill_only"))
    run(pre, [])
    payload = pre.export_kv("x")
    pre.release_kv("x")
    dec = make("decode")
    run(dec, [EngineRequest("w", system + [2], greedy(1), mode="full")])
    payload.extra["block_hashes"] = block_hashes(system + [1], "another-model")
    dec.import_kv(payload)
    assert dec.pool.used_blocks == len(payload.extra["block_hashes"]) + 1  # fresh blocks, none shared
    dec.abort("x")
    # Hashes that name this pool's blocks for another prompt: the claim is refused, nothing leaks.
    payload.extra["block_hashes"] = block_hashes(system, dec.model_name)[:4]
    payload.request_id = "y"
    dec.import_kv(payload)
    with pytest.raises(ValueError, match="do not match"):
        dec.add_request(EngineRequest("y", [5] + system, greedy(), mode="decode_only", first_token=3))
    dec.release_kv("y")
    assert_idle_and_empty(dec)


# ---- the event log -------------------------------------------------------------------------------
def test_event_log_since_and_reset():
    log = KVEventLog(capacity=4)
    start = log.seq
    assert log.since(start, []).stored == [] and not log.since(start, []).reset
    log.append(True, 1)
    log.append(True, 2)
    log.append(False, 1)  # stored then removed: only removed
    ev = log.since(start, [2])
    assert (ev.seq, ev.reset, ev.stored, ev.removed) == (start + 3, False, [2], [1])
    assert log.since(start + 2, [2]).removed == [1] and log.since(start + 2, [2]).stored == []
    for h in (3, 4, 5):
        log.append(True, h)
    ev = log.since(start, [2, 3, 4, 5])  # event start+1 fell out of the ring: too far behind
    assert ev.reset and ev.stored == [2, 3, 4, 5] and ev.seq == start + 6
    assert not log.since(start + 2, []).reset  # the oldest kept is start+3: deltas still complete
    assert log.since(0, [9]).reset and log.since(start + 99, [9]).reset  # new, or another worker's number
    assert KVEventLog().seq >= log.seq - 10  # a restarted worker's numbers start at the clock, not 0


def test_pool_events_follow_registration_and_eviction():
    pool = KVPool(1, 1, 1, 4 * B, torch.float32, "cpu")
    from backends.engines.native.kv_cache import BlockTable

    t = BlockTable(pool.allocate(3))
    pool.register(t, [11, 12, 13], 2)  # only the computed full blocks
    assert pool.cached_blocks == 2 and t.registered == 2
    pool.release(t)
    assert pool.free_blocks == 4 and pool.match([11, 12, 13]) == pool.match([11, 12])  # freed, still hittable
    got = pool.allocate(3)  # the unhashed blocks go first, then the LRU cached one: block of 12 (freed first)
    assert pool.match([11]) and not pool.match([12]) and len(got) == 3
    assert pool.events_since(0).stored == [11]
    pool.free(got)
    assert pool.used_blocks == 0


# ---- through the worker's HTTP API ---------------------------------------------------------------
def test_worker_load_polls_carry_events_and_pushes_share_held_blocks(system):
    from backends.engines.server import create_worker_app
    from backends.worker.client import WorkerBackend
    from tests.conftest import serve_app

    pre, dec = make("prefill"), make("decode")
    dec_app = create_worker_app(dec, backend="native", kv_port=None)  # pushes over HTTP PUT /kv
    with serve_app(dec_app) as dec_url, serve_app(create_worker_app(pre, backend="native")) as pre_url:
        asyncio.run(_polls_and_push(pre_url, dec_url, dec, system, WorkerBackend))
    assert_idle_and_empty(pre)
    assert_idle_and_empty(dec)


async def _polls_and_push(pre_url: str, dec_url: str, dec, system: list[int], backend_cls) -> None:
    client = backend_cls(dec_url, "dec", "decode")
    other = backend_cls(dec_url, "dec-2", "decode")  # a second orchestrator replica polling the same worker
    http = httpx.AsyncClient(timeout=60)
    try:
        first = await client.load()
        assert first.kv_events is not None and first.kv_events.reset and first.kv_events.stored == []
        sampling = {"max_tokens": 2, "ignore_eos": True, "temperature": 0.0}
        body = {"request_id": "w", "prompt_ids": system + [3], "sampling": sampling}
        lines = (await http.post(f"{dec_url}/generate", json=body)).text.splitlines()
        assert '"cached_tokens": 0' in lines[0]
        second = await client.load()
        expected = block_hashes(system, dec.model_name)[:4]
        assert not second.kv_events.reset and second.kv_events.stored == expected
        assert (await client.load()).kv_events.stored == []  # nothing new since
        late = await other.load()
        assert late.kv_events.reset and set(late.kv_events.stored) == set(expected)

        # A prefill whose prompt starts with that prefix: the decode worker shares its 4 cached blocks.
        prompt = system + [4, 5, 6]
        body = {
            "request_id": "d",
            "prompt_ids": prompt,
            "handoff": {"decode_url": dec_url},
            "sampling": {**sampling, "max_tokens": 6},
        }
        resp = (await http.post(f"{pre_url}/prefill", json=body)).json()
        kv = resp["kv"]
        assert resp["first"]["cached_tokens"] == 0
        assert dec._imported["d"].table.blocks[:4] == [dec.pool._by_hash[h] for h in expected]
        decode = {**body, "first_token": kv["first_token_id"], "lease_id": kv["lease_id"]}
        del decode["handoff"]
        text = (await http.post(f"{dec_url}/decode", json=decode)).text
        assert text.count("\n") == 5 and '"finish_reason": "length"' in text
        assert dec.pool.cached_blocks >= 5  # the pushed prompt's 5th block is now cached here too
        ref = make(prefix_caching=False)
        want = run(ref, [EngineRequest("d", prompt, greedy(6))])["d"]["tokens"]
        got = [kv["first_token_id"]] + [int(x) for x in re.findall(r'"token_ids": \[(\d+)\]', text)]
        assert got == want
    finally:
        await http.aclose()
        await client.close()
        await other.close()


def _prefill_push(pre_url: str, dec_url: str, rid: str, prompt: list[int], n: int) -> tuple[dict, str]:
    sampling = {"max_tokens": n, "ignore_eos": True, "temperature": 0.0}
    body = {"request_id": rid, "prompt_ids": prompt, "sampling": sampling, "handoff": {"decode_url": dec_url}}
    resp = httpx.post(f"{pre_url}/prefill", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    kv = resp.json()["kv"]
    decode = {**body, "first_token": kv["first_token_id"], "lease_id": kv["lease_id"]}
    del decode["handoff"]
    text = httpx.post(f"{dec_url}/decode", json=decode, timeout=60).text
    return kv, text


def test_socket_push_skips_the_blocks_the_decode_worker_holds(system):
    from backends.engines.server import create_worker_app
    from tests.conftest import serve_app

    pre, dec = make("prefill"), make("decode")
    ref = make(prefix_caching=False)
    with serve_app(create_worker_app(dec, backend="native")) as dec_url, \
            serve_app(create_worker_app(pre, backend="native")) as pre_url:  # fmt: skip
        run(dec, [])  # (idle)
        warm = {"request_id": "w", "prompt_ids": system + [3], "sampling": {"max_tokens": 1, "ignore_eos": True}}
        assert httpx.post(f"{dec_url}/generate", json=warm, timeout=60).status_code == 200
        prompt = system + [4, 5, 6]
        kv, text = _prefill_push(pre_url, dec_url, "s", prompt, 6)
        assert kv["extra"]["skipped_tokens"] == 4 * B and "wire_s" in kv["extra"]  # the socket sent 14 positions
        got = [kv["first_token_id"]] + [int(x) for x in re.findall(r'"token_ids": \[(\d+)\]', text)]
        assert got == run(ref, [EngineRequest("s", prompt, greedy(6))])["s"]["tokens"]

        # A receiver that announced a prefix it no longer holds refuses the import (410): the sender
        # pushes the whole KV over HTTP instead, and the outputs stay exact.
        dec.held_prefix_tokens = lambda hashes, n: 4 * B  # as if evicted between announce and import
        other = [9] * 75 + [1]
        kv, text = _prefill_push(pre_url, dec_url, "g", other, 4)
        assert "wire_s" not in kv["extra"]  # over HTTP, in full
        got = [kv["first_token_id"]] + [int(x) for x in re.findall(r'"token_ids": \[(\d+)\]', text)]
        assert got == run(ref, [EngineRequest("g", other, greedy(4))])["g"]["tokens"]
    assert_idle_and_empty(pre)
    assert_idle_and_empty(dec)


def test_migration_reprefill_hits_what_is_cached(tiny_hf, system):
    eng = make(chunk_size=32)
    out = run(eng, [EngineRequest("a", system, greedy(20))])["a"]
    # A migrated request continues elsewhere as prompt + the tokens it already produced.
    resumed = system + out["tokens"][:12]
    got = run(eng, [EngineRequest("a2", resumed, greedy(8))])["a2"]
    assert got["outputs"][0].cached_tokens == (len(resumed) - 1) // B * B
    assert got["tokens"] == out["tokens"][12:20]
    assert_idle_and_empty(eng)


def test_prefix_caching_can_be_switched_off_for_a_worker(monkeypatch, system):
    monkeypatch.setenv("TETRI_PREFIX_CACHING", "0")
    eng = make(chunk_size=64)
    run(eng, [EngineRequest("a", system, greedy(2))])
    out = run(eng, [EngineRequest("b", system, greedy(2))])["b"]
    assert out["outputs"][0].cached_tokens == 0 and eng.pool.cached_blocks == 0
    assert eng.kv_events(0) is None and eng.info()["prefix_caching"] is False
    assert_idle_and_empty(eng)


def test_queued_prompt_tokens_count_only_the_uncached_work(system):
    eng = make(chunk_size=64, max_batch=1)
    run(eng, [EngineRequest("warm", system, greedy(1))])
    eng.add_request(EngineRequest("busy", [7] * 40, greedy(30)))
    eng.step()  # the one batch slot is taken: the next request waits
    eng.add_request(EngineRequest("q", system + [1, 2], greedy(2)))
    assert eng.load().queued == 1 and eng.load().queued_prompt_tokens == len(system) + 2 - 4 * B
    run(eng, [])
    assert_idle_and_empty(eng)
