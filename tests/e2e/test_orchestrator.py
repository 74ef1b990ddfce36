"""The orchestrator end to end over real worker processes (tiny random Llama): disaggregated
greedy equivalence, bad input, disconnects, concurrency, leases, the store record."""

from __future__ import annotations

import asyncio
import functools
import json
import time

import httpx
import pytest

from backends.base import SamplingParams
from tests.conftest import ADMIN_TOKEN, TINY, pd_specs, wait_pools_empty

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def pd_orchestrator(tiny_pd_fleet, orchestrator_for):
    return orchestrator_for(pd_specs(tiny_pd_fleet))


@functools.lru_cache(maxsize=1)
def _hf_tiny():
    import torch

    from backends.engines.native.model_source import load_model

    return load_model(TINY, dtype=torch.float32, device="cpu")[0]


def hf_greedy(prompt_ids: list[int], n: int) -> list[int]:
    import torch

    model = _hf_tiny()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_disaggregated_greedy_matches_transformers_across_two_processes(tiny_pd_fleet):
    """Prefill in one process, KV pushed over HTTP to another, decode there: same tokens as HF."""
    prefill, decode = tiny_pd_fleet.workers
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 70)]  # up to > 4 chunks of 16
    for i, prompt in enumerate(prompts):
        rid = f"eq-{i}"
        body = {"request_id": rid, "prompt_ids": prompt,
                "sampling": {"temperature": 0, "max_tokens": 32, "ignore_eos": True}}
        pre = httpx.post(f"{prefill.url}/prefill", json={**body, "handoff": {"decode_url": decode.url}},
                         timeout=60).json()
        assert pre["kv"]["num_tokens"] == len(prompt)
        assert pre["kv"]["nbytes"] > 0
        tokens = pre["first"]["token_ids"]
        with httpx.stream("POST", f"{decode.url}/decode", timeout=60,
                          json={**body, "first_token": tokens[0], "lease_id": pre["kv"]["lease_id"]}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line:
                    tokens += json.loads(line)["token_ids"]
        assert tokens == hf_greedy(prompt, 32), f"prompt {i} diverged"
    wait_pools_empty([prefill.url, decode.url])


def test_chat_through_orchestrator_records_both_instances(pd_orchestrator):
    url, state = pd_orchestrator
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["usage"]["completion_tokens"] == 12
    assert data["choices"][0]["finish_reason"] == "length"
    record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
    assert record["state"] == "finished"
    assert record["prefill_instance"].startswith("prefill") and record["decode_instance"].startswith("decode")
    assert record["completion_tokens"] == 12 and record["prompt_tokens"] == data["usage"]["prompt_tokens"]
    assert record["arrival"] <= record["first_token_at"] <= record["finished_at"]
    assert record["kv_bytes"] > 0


def test_streaming_first_token_then_usage(pd_orchestrator):
    url, _ = pd_orchestrator
    body = {"model": TINY, "messages": [{"role": "user", "content": "Count"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert parsed[-1]["usage"]["completion_tokens"] == 8 and parsed[-1]["choices"] == []
    assert [c["choices"][0]["finish_reason"] for c in parsed[:-1]][-1] == "length"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": TINY, "messages": []}, 400, None),
        ({"model": TINY}, 400, None),
        ({"model": TINY, "messages": "hi"}, 400, None),
        ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, None),
        ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400, None),
        ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7}, 400,
         "context_length_exceeded"),
        ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, None),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": TINY, "messages": [{"role": "user", "content": "word " * 10000}]}, 400,
         "context_length_exceeded"),
    ],
)
def test_bad_input_gets_openai_error_and_server_keeps_serving(pd_orchestrator, body, status, code):
    url, _ = pd_orchestrator
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                    json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_malformed_json_and_admin_auth(pd_orchestrator):
    url, _ = pd_orchestrator
    resp = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{url}/admin/instances", timeout=10).status_code == 401
    assert httpx.get(f"{url}/admin/instances", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    listed = httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=10).json()["instances"]
    assert {i["role"] for i in listed} == {"prefill", "decode"}
    assert all(i["state"] == "healthy" and i["last_load"] for i in listed)
    assert httpx.get(f"{url}/admin/requests/cmpl-nope", headers=AUTH, timeout=10).status_code == 404


def test_client_disconnect_mid_stream_frees_kv_on_both_workers(pd_orchestrator, tiny_pd_fleet):
    url, _ = pd_orchestrator
    body = {"model": TINY, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    decode_url = tiny_pd_fleet.workers[1].url
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
        seen = 0
        lines = resp.iter_lines()  # kept referenced: a finalized iterator would close the connection
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 5:
                break
        busy = httpx.get(f"{decode_url}/load", timeout=5).json()
        assert busy["running"] == 1 and busy["free_kv_tokens"] < busy["total_kv_tokens"]
    loads = wait_pools_empty([w.url for w in tiny_pd_fleet.workers])
    assert all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["running"] == 0 for ld in loads), loads


def test_fifty_concurrent_requests_then_pools_empty(pd_orchestrator, tiny_pd_fleet):
    url, _ = pd_orchestrator

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        body = {"model": TINY, "messages": [{"role": "user", "content": f"request number {i} " * (1 + i % 7)}],
                "max_tokens": 4 + i % 9, "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": i % 2 == 0}
        if body["stream"]:
            text = ""
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["delta"].get("content") or ""
            return {"ok": True}
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == body["max_tokens"]
        return {"ok": True}

    async def main() -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    loads = wait_pools_empty([w.url for w in tiny_pd_fleet.workers])
    assert all(ld["free_kv_tokens"] == ld["total_kv_tokens"] for ld in loads), loads


def test_streamed_prefill_sends_the_first_token_before_the_kv_handle(tiny_pd_fleet):
    """`stream: true`: one NDJSON line with the first token, then one with the KV handle (or the push
    error); the decode then continues from it exactly as after the one-shot /prefill."""
    prefill, decode = tiny_pd_fleet.workers
    prompt = list(range(30, 75))
    body = {"request_id": "streamed-1", "prompt_ids": prompt,
            "sampling": {"temperature": 0, "max_tokens": 12, "ignore_eos": True}}
    with httpx.stream("POST", f"{prefill.url}/prefill", timeout=60,
                      json={**body, "handoff": {"decode_url": decode.url}, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert [sorted(line) for line in lines] == [["first"], ["kv"]]
    tokens = lines[0]["first"]["token_ids"]
    assert lines[1]["kv"]["first_token_id"] == tokens[0] and lines[1]["kv"]["num_tokens"] == len(prompt)
    with httpx.stream("POST", f"{decode.url}/decode", timeout=60,
                      json={**body, "first_token": tokens[0], "lease_id": lines[1]["kv"]["lease_id"]}) as resp:
        tokens += [t for line in resp.iter_lines() if line for t in json.loads(line)["token_ids"]]
    assert tokens == hf_greedy(prompt, 12)
    # A decode worker that cannot be reached: the first token, then the push error; nothing held.
    dead = {**body, "request_id": "streamed-2", "handoff": {"decode_url": "http://127.0.0.1:9"}, "stream": True}
    with httpx.stream("POST", f"{prefill.url}/prefill", timeout=60, json=dead) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[0]["first"]["token_ids"] == tokens[:1]
    assert lines[1]["status"] == 502 and lines[1]["error"]["code"] == "kv_push_failed"
    wait_pools_empty([prefill.url, decode.url])
    # A decode "worker" that accepts connections and never answers: the push cannot finish, yet the
    # first token arrives at once (a push made before the first line would hold it for >= 5 s).
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = {**body, "request_id": "streamed-3", "stream": True,
                "handoff": {"decode_url": f"http://127.0.0.1:{silent.getsockname()[1]}"}}
        with httpx.stream("POST", f"{prefill.url}/prefill", json=hung, timeout=httpx.Timeout(4.0)) as resp:
            first_line = json.loads(next(line for line in resp.iter_lines() if line))
        assert first_line["first"]["token_ids"] == tokens[:1]
    wait_pools_empty([prefill.url])
    assert httpx.get(f"{prefill.url}/health", timeout=5).status_code == 200


def test_unclaimed_kv_push_is_freed_when_its_lease_ends(tiny_pd_fleet):
    prefill, decode = tiny_pd_fleet.workers
    body = {"request_id": "orphan-1", "prompt_ids": list(range(10, 60)),
            "sampling": SamplingParams(temperature=0, max_tokens=8).to_dict(),
            "handoff": {"decode_url": decode.url, "lease_s": 1.0}}
    pre = httpx.post(f"{prefill.url}/prefill", json=body, timeout=60).json()
    held = httpx.get(f"{decode.url}/load", timeout=5).json()
    assert held["active_leases"] == 1 and held["leased_kv_tokens"] == 50
    assert held["free_kv_tokens"] < held["total_kv_tokens"]
    time.sleep(2.0)
    loads = wait_pools_empty([prefill.url, decode.url])
    assert all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["active_leases"] == 0 for ld in loads)
    late = httpx.post(f"{decode.url}/decode", timeout=10, json={
        "request_id": "orphan-1", "prompt_ids": body["prompt_ids"], "sampling": body["sampling"],
        "first_token": pre["first"]["token_ids"][0], "lease_id": pre["kv"]["lease_id"]})
    assert late.status_code == 404 and late.json()["error"]["code"] == "kv_lease_missing"


def test_kv_push_over_http_when_the_decode_worker_has_no_socket_channel(tiny_pd_fleet, tmp_path):
    """The HTTP PUT fallback moves the same KV: greedy tokens still match transformers."""
    from orchestrator.launcher import Fleet

    prefill = tiny_pd_fleet.workers[0]
    fleet = Fleet()
    try:
        decode = fleet.start_worker("decode", TINY, chunk_size="16", kv_tokens=1024, log_dir=tmp_path,
                                    extra_args=["--kv-port", "-1"])
        fleet.wait_healthy()
        assert httpx.get(f"{decode.url}/info", timeout=5).json()["kv_port"] is None
        prompt = list(range(20, 57))
        body = {"request_id": "http-push", "prompt_ids": prompt,
                "sampling": {"temperature": 0, "max_tokens": 16, "ignore_eos": True}}
        pre = httpx.post(f"{prefill.url}/prefill", json={**body, "handoff": {"decode_url": decode.url}},
                         timeout=60).json()
        tokens = pre["first"]["token_ids"]
        with httpx.stream("POST", f"{decode.url}/decode", timeout=60,
                          json={**body, "first_token": tokens[0], "lease_id": pre["kv"]["lease_id"]}) as resp:
            for line in resp.iter_lines():
                if line:
                    tokens += json.loads(line)["token_ids"]
        assert tokens == hf_greedy(prompt, 16)
        wait_pools_empty([decode.url])
    finally:
        fleet.stop()


def test_learned_prediction_is_recorded_next_to_the_true_length(tiny_pd_fleet, orchestrator_for):
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet), predictor="learned", predictor_sample_every=1)
    body = {"model": TINY, "messages": [{"role": "user", "content": "Write a very long story about dragons."}],
            "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    data = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
    assert record["predicted_bucket"] is not None and record["predictor_granularity"] == 200
    assert record["completion_tokens"] == 20
    stats = httpx.get(f"{url}/admin/stats", headers=AUTH, timeout=10).json()["predictor"]
    assert stats["name"] == "learned" and stats["live"]["n"] == 1 and stats["stored"]["n"] == 1
    # 20 tokens is bucket 0 at g=200: the live accuracy agrees with the stored rows.
    assert stats["live"]["accuracy"] == stats["stored"]["accuracy"] == float(record["predicted_bucket"] == 0)
    assert "tetri_predictor_accuracy" in httpx.get(f"{url}/metrics", timeout=10).text


def test_overload_gets_503_with_retry_after_and_accepted_requests_finish(tiny_pd_fleet, orchestrator_for):
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet), max_queued_requests=3)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"model": TINY, "messages": [{"role": "user", "content": f"load {i}"}], "max_tokens": 60,
                "temperature": 0, "ignore_eos": True}
        return await client.post(f"{url}/v1/chat/completions", json=body)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(10)))

    responses = asyncio.run(main())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(refused) == 10 and ok and refused
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == 60
    state.store.flush()
    finished = [row for row in state.store.list_requests(limit=100) if row["state"] == "finished"]
    assert len(finished) == len(ok)


def test_mixed_deployment_runs_heavy_prefill_heavy_decode_colocated(tiny_pd_fleet, orchestrator_for, tmp_path):
    """HPHD (the paper's weak spot) goes to the co-located pool; the other shapes disaggregate."""
    from orchestrator.config import InstanceSpec
    from orchestrator.launcher import Fleet

    extra = Fleet()
    try:
        colo = extra.start_worker("colocated", TINY, chunk_size="64", kv_tokens=4096, log_dir=tmp_path)
        extra.wait_healthy()
        specs = [*pd_specs(tiny_pd_fleet), InstanceSpec(url=colo.url, role="colocated", model=TINY, id="colo")]
        url, _ = orchestrator_for(specs, predictor="oracle")
        long_prompt = "tell me everything about the sea " * 100  # > 512 tokens
        cases = {("heavy", 240): "colo", ("heavy", 20): "prefill-0", ("light", 240): "prefill-0"}
        for (prompt_kind, max_tokens), expected in cases.items():
            content = long_prompt if prompt_kind == "heavy" else "hi"
            body = {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            data = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
            assert data["usage"]["completion_tokens"] == max_tokens
            record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
            assert record["prefill_instance"] == expected, (prompt_kind, max_tokens, record)
    finally:
        extra.stop()


def _token_prompt(i: int, n: int) -> list[int]:
    return [100 + (i * 37 + k * 11) % 20000 for k in range(n)]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer():
    from backends.engines.native.model_source import load_model

    return load_model(TINY, device="cpu")[1]


def _hf_text(prompt_ids: list[int], n: int) -> str:
    """What the orchestrator should stream for a greedy request: transformers' tokens, decoded."""
    return _tiny_tokenizer().decode(hf_greedy(prompt_ids, n), skip_special_tokens=True)


def test_plain_pd_runs_heavy_prefill_heavy_decode_on_the_decode_worker(tiny_pd_fleet, orchestrator_for):
    """Conditional disaggregation without a co-located pool: HPHD runs prefill + decode on the decode
    worker (no KV transfer), the other shapes still go prefill -> decode; greedy text equals HF's."""
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet), predictor="oracle", heavy_prefill_threshold=64,
                                  colocate_backlog_tokens=0)
    cases = [(100, 210, "decode-1"), (100, 20, "prefill-0"), (20, 210, "prefill-0")]
    for i, (prompt_len, max_tokens, expected_prefill) in enumerate(cases):
        prompt = _token_prompt(i, prompt_len)
        body = {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["usage"]["completion_tokens"] == max_tokens
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["choices"][0]["text"] == _hf_text(prompt, max_tokens), (prompt_len, max_tokens)
        record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
        assert record["state"] == "finished" and record["completion_tokens"] == max_tokens
        assert record["prefill_instance"] == expected_prefill, (prompt_len, max_tokens, record)
        if expected_prefill == "decode-1":
            assert record["decode_instance"] == "decode-1" and not record["kv_bytes"]
            assert record["predicted_bucket"] == 1
        else:
            assert record["decode_instance"] == "decode-1" and record["kv_bytes"] > 0
    assert all(i.reserved_kv_tokens == 0 and i.inflight_prefills == 0 for i in state.cluster.instances.values())
    loads = wait_pools_empty([w.url for w in tiny_pd_fleet.workers])
    assert all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["running"] == 0 for ld in loads), loads


def test_backlogged_prefill_falls_back_to_the_decode_worker(tiny_pd_fleet, orchestrator_for):
    """Adaptive fallback: with the prefill queue holding more than colocate_backlog_tokens, requests
    run co-located on the decode worker while it has room; none is lost, the pools end empty."""
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet), colocate_backlog_tokens=50)
    bodies = [{"model": TINY, "prompt": _token_prompt(i, 200), "max_tokens": 8, "temperature": 0,
               "ignore_eos": True} for i in range(16)]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(main())
    ids = []
    for resp, body in zip(responses, bodies, strict=True):
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["usage"]["completion_tokens"] == 8 and data["choices"][0]["finish_reason"] == "length"
        assert data["choices"][0]["text"] == _hf_text(body["prompt"], 8)
        ids.append(data["id"])
    assert len(set(ids)) == 16
    state.store.flush(timeout=10)
    rows = [state.store.get_request(rid) for rid in ids]
    assert all(row is not None and row["state"] == "finished" and row["completion_tokens"] == 8 for row in rows)
    on_decode = [r for r in rows if r["prefill_instance"] == "decode-1"]
    disaggregated = [r for r in rows if r["prefill_instance"] == "prefill-0"]
    assert len(on_decode) + len(disaggregated) == 16
    assert on_decode and disaggregated, [r["prefill_instance"] for r in rows]
    assert all(r["decode_instance"] == "decode-1" and not r["kv_bytes"] for r in on_decode)
    assert all(r["decode_instance"] == "decode-1" and r["kv_bytes"] > 0 for r in disaggregated)
    assert all(i.reserved_kv_tokens == 0 and i.inflight_prefills == 0 for i in state.cluster.instances.values())
    loads = wait_pools_empty([w.url for w in tiny_pd_fleet.workers])
    assert all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["running"] == 0 for ld in loads), loads
