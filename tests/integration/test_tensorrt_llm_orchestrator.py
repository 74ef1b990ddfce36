"""The whole orchestrator over fake trtllm-serve workers, through the OpenAI API, streamed and not;
and one deployment holding an SGLang pool and a TensorRT-LLM pool."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.config import InstanceSpec
from tests.adapter_helpers import chat_body as shared_chat_body
from tests.adapter_helpers import orchestrator_over, settled, wait_until
from tests.conftest import ADMIN_TOKEN
from tests.fakes import toy_model
from tests.fakes.harness import fakes, sse_events

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PD_MODEL = "toy-trtllm-pd"
COLO_MODEL = "toy-trtllm-colo"


@pytest.fixture(scope="module")
def trt_module(tmp_path_factory):
    """One orchestrator and its fake trtllm-serve workers for the whole module."""
    with fakes() as group:
        ctx = group.trtllm(model=PD_MODEL)
        gen = group.trtllm(model=PD_MODEL)
        colo = group.trtllm(model=COLO_MODEL)
        with orchestrator_over(tmp_path_factory.mktemp("trt-orch"),
                               (ctx, "tensorrt-llm", "prefill", PD_MODEL, "trt-ctx"),
                               (gen, "tensorrt-llm", "decode", PD_MODEL, "trt-gen"),
                               (colo, "tensorrt-llm", "colocated", COLO_MODEL, "trt-colo")) as (url, state):
            yield url, state, ctx, gen, colo


@pytest.fixture
def trt_cluster(trt_module):
    yield from settled(trt_module)


def chat_body(model: str, **kw) -> dict:
    return shared_chat_body(model, "What is disaggregated serving?", **kw)


def test_chat_disaggregated_non_streamed(trt_cluster):
    url, _, ctx, gen, _ = trt_cluster
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL), timeout=30)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    prompt = ctx.fake.bodies[0]["prompt"]
    exp = toy_model.expected(prompt, 12)
    assert data["choices"][0]["message"]["content"] == exp.text
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 12 and data["usage"]["prompt_tokens"] == len(prompt)
    assert ctx.fake.bodies[0]["disaggregated_params"]["request_type"] == "context_only"
    assert gen.fake.bodies[0]["disaggregated_params"]["request_type"] == "generation_only"
    assert gen.fake.bodies[0]["model"] == PD_MODEL  # from the worker's /v1/models
    record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
    assert record["backend"] == "tensorrt-llm" and record["state"] == "finished"
    assert record["prefill_instance"] == "trt-ctx" and record["decode_instance"] == "trt-gen"


def test_chat_disaggregated_streamed(trt_cluster):
    url, _, ctx, gen, _ = trt_cluster
    gen.fake.config.first_chunk_tokens = 2
    body = chat_body(PD_MODEL, stream=True, max_tokens=10, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    exp = toy_model.expected(ctx.fake.bodies[0]["prompt"], 10)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == exp.text
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 10


def test_context_stop_is_the_whole_answer(trt_cluster):
    url, _, ctx, gen, _ = trt_cluster
    prompt = [21, 22, toy_model.STOP_AT_FIRST]
    for stream in (False, True):
        body = {"model": PD_MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
                events = sse_events(resp)
            assert "".join(e["choices"][0]["text"] for e in events) == ""
            assert events[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0] == {"index": 0, "finish_reason": "stop", "logprobs": None, "text": ""}
    assert len(ctx.fake.bodies) == 2 and not gen.fake.bodies
    assert not ctx.fake.pending


def test_completions_colocated(trt_cluster):
    url, _, ctx, gen, colo = trt_cluster
    prompt = [31, 32, 33]
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": COLO_MODEL, "prompt": prompt, "max_tokens": 7, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == toy_model.expected(prompt, 7).text
    assert "disaggregated_params" not in colo.fake.bodies[0]
    assert not ctx.fake.bodies and not gen.fake.bodies


def test_streamed_client_disconnect_closes_generation(trt_cluster):
    url, _, _, gen, _ = trt_cluster
    gen.fake.config.token_delay_s = 0.05
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, stream=True, max_tokens=200),
                      timeout=30) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data:")
            if seen >= 3:
                break
    wait_until(lambda: len(gen.fake.aborted) == 1)
    wait_until(lambda: not gen.fake.running)


def test_generation_failure_everywhere_ends_stream_with_error(trt_cluster):
    """The only generation server fails every KV transfer: each retry fails as well, and the
    stream (its first token already sent) ends with the error."""
    url, _, ctx, gen, _ = trt_cluster
    gen.fake.config.transfer_fail = True
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, stream=True),
                      timeout=30) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert any("error" in e and "KV cache transfer failed" in e["error"]["message"] for e in events)
    assert len(gen.fake.bodies) > 1   # retried


@pytest.mark.parametrize("fault", ["transfer", 400, 500])
def test_generation_failure_before_its_first_token_is_retried_on_another_generation_server(
        orchestrator_for, fault):
    """A generation server that fails before its first token (a failed KV transfer, an HTTP 400
    handler error, a 5xx) is avoided and the request runs again on the other one: the client gets
    the whole answer, not one token and finish_reason "error"."""
    with fakes() as group:
        ctx = group.trtllm(model="toy-retry")
        bad = group.trtllm(model="toy-retry", transfer_fail=fault == "transfer",
                           generation_error_status=None if fault == "transfer" else fault)
        good = group.trtllm(model="toy-retry")
        url, _ = orchestrator_for([
            InstanceSpec(url=ctx.url, backend="tensorrt-llm", role="prefill", model="toy-retry", id="r-ctx"),
            InstanceSpec(url=bad.url, backend="tensorrt-llm", role="decode", model="toy-retry", id="r-bad"),
            InstanceSpec(url=good.url, backend="tensorrt-llm", role="decode", model="toy-retry", id="r-good"),
        ])
        for stream in (False, True, False, True, False, True):
            body = {"model": "toy-retry", "prompt": [41, 42, 43], "max_tokens": 6, "temperature": 0, "stream": stream}
            if stream:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
                    events = sse_events(resp)
                text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
                finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
                assert not any("error" in e for e in events)
            else:
                resp = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
                assert resp.status_code == 200, resp.text
                text, finish = resp.json()["choices"][0]["text"], resp.json()["choices"][0]["finish_reason"]
                assert resp.json()["usage"]["completion_tokens"] == 6
            # (the toy model's continuation after a migration is not the uninterrupted one: check the shape)
            first = toy_model.token_text(toy_model.first_token([41, 42, 43]))
            assert finish == "length" and text.startswith(first) and text.count(" t") == 6
        assert bad.fake.bodies and good.fake.bodies   # the failing one was tried, and avoided


def test_streamed_client_gone_during_the_context_step_frees_the_context_kv(trt_cluster):
    """A streaming client leaves while the context step runs: the context server does not keep
    the request's KV for kv_transfer_timeout_ms (60 s here). Either the context request is aborted
    (the API layer noticed in time) or the KV is pulled right after it (noticed at the first token)."""
    url, _, ctx, gen, _ = trt_cluster
    ctx.fake.config.context_delay_s = 1.0
    body = {"model": PD_MODEL, "prompt": [51, 52, 53], "max_tokens": 50, "temperature": 0, "stream": True}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3)) as resp:
            sse_events(resp)
    wait_until(lambda: ctx.fake.bodies and not ctx.fake.running, timeout=5)
    wait_until(lambda: not ctx.fake.pending, timeout=3)
    assert not ctx.fake.expired and len(ctx.fake.aborted + ctx.fake.pulled) == 1
    wait_until(lambda: not gen.fake.running)
    assert not gen.fake.finished   # no generation ran past the KV pull


def test_max_tokens_one_frees_the_context_kv(trt_cluster):
    url, _, ctx, gen, _ = trt_cluster
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": PD_MODEL, "prompt": [61, 62, 63], "max_tokens": 1, "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == toy_model.expected([61, 62, 63], 1).text
    assert resp.json()["usage"]["completion_tokens"] == 1
    wait_until(lambda: ctx.fake.pulled and not ctx.fake.pending, timeout=3)
    assert not ctx.fake.expired and [b["max_tokens"] for b in gen.fake.bodies] == [1]


def test_sampling_fields_not_given_are_not_sent(trt_cluster):
    """The client's omitted temperature/top_p are not sent as 1.0: the worker applies the model's
    own defaults (generation_config.json on newer builds)."""
    url, _, ctx, gen, _ = trt_cluster
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={"model": PD_MODEL, "prompt": [7, 8], "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    for body in (ctx.fake.bodies[-1], gen.fake.bodies[-1]):
        assert "temperature" not in body and "top_p" not in body
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": PD_MODEL, "prompt": [7, 8], "max_tokens": 3, "temperature": 0.5, "top_p": 0.8})
    assert resp.status_code == 200, resp.text
    for body in (ctx.fake.bodies[-1], gen.fake.bodies[-1]):
        assert body["temperature"] == 0.5 and body["top_p"] == 0.8


def test_load_reports_from_metrics(trt_cluster):
    url, state, _, gen, _ = trt_cluster
    httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, max_tokens=4), timeout=30)
    wait_until(lambda: state.cluster.get("trt-gen").load is not None
               and state.cluster.get("trt-gen").load.total_kv_tokens > 0)
    load = state.cluster.get("trt-gen").load
    assert load.backend == "tensorrt-llm"
    assert load.total_kv_tokens == gen.fake.config.max_num_blocks * gen.fake.config.tokens_per_block
    listed = httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=10).json()["instances"]
    assert {i["id"] for i in listed} == {"trt-ctx", "trt-gen", "trt-colo"}


def test_mixed_sglang_and_tensorrt_llm_pools(orchestrator_for):
    """One orchestrator, two P/D pools of different backends serving different model names."""
    with fakes() as group:
        sp, sd = group.sglang("prefill"), group.sglang("decode")
        tc, tg = group.trtllm(model="toy-b"), group.trtllm(model="toy-b")
        url, _ = orchestrator_for([
            InstanceSpec(url=sp.url, backend="sglang", role="prefill", model="toy-a", id="a-p"),
            InstanceSpec(url=sd.url, backend="sglang", role="decode", model="toy-a", id="a-d"),
            InstanceSpec(url=tc.url, backend="tensorrt-llm", role="prefill", model="toy-b", id="b-p"),
            InstanceSpec(url=tg.url, backend="tensorrt-llm", role="decode", model="toy-b", id="b-d"),
        ])
        models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert {"toy-a", "toy-b"} <= models
        for model, backend, fake_p in (("toy-a", "sglang", sp), ("toy-b", "tensorrt-llm", tc)):
            resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(model, max_tokens=5), timeout=30)
            assert resp.status_code == 200, resp.text
            record = httpx.get(f"{url}/admin/requests/{resp.json()['id']}", headers=AUTH, timeout=10).json()
            assert record["backend"] == backend
            prompt = fake_p.fake.bodies[-1].get("input_ids") or fake_p.fake.bodies[-1].get("prompt")
            assert resp.json()["choices"][0]["message"]["content"] == toy_model.expected(prompt, 5).text


def test_ab_split_same_model_across_sglang_and_tensorrt_llm(orchestrator_for):
    """The same model on an SGLang pool and a TensorRT-LLM pool, split 50/50: every request is
    served by one backend end to end (KV never crosses engines) and its record says which."""
    with fakes() as group:
        sp, sd = group.sglang("prefill"), group.sglang("decode")
        tc, tg = group.trtllm(model="toy-ab"), group.trtllm(model="toy-ab")
        url, _ = orchestrator_for([
            InstanceSpec(url=sp.url, backend="sglang", role="prefill", model="toy-ab", id="s-p"),
            InstanceSpec(url=sd.url, backend="sglang", role="decode", model="toy-ab", id="s-d"),
            InstanceSpec(url=tc.url, backend="tensorrt-llm", role="prefill", model="toy-ab", id="t-p"),
            InstanceSpec(url=tg.url, backend="tensorrt-llm", role="decode", model="toy-ab", id="t-d"),
        ], ab_split={"sglang": 50, "tensorrt-llm": 50})
        seen = {}
        for _ in range(16):
            resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body("toy-ab", max_tokens=3), timeout=30)
            assert resp.status_code == 200, resp.text
            record = httpx.get(f"{url}/admin/requests/{resp.json()['id']}", headers=AUTH, timeout=10).json()
            pair = (record["prefill_instance"], record["decode_instance"])
            assert pair in {("s-p", "s-d"), ("t-p", "t-d")}
            seen[record["backend"]] = seen.get(record["backend"], 0) + 1
        assert set(seen) == {"sglang", "tensorrt-llm"}  # P(one backend only in 16 draws) = 2^-15
        assert len(sp.fake.bodies) == len(sd.fake.bodies) == seen["sglang"]
        assert len(tg.fake.bodies) == seen["tensorrt-llm"]


def test_generation_server_drops_the_stream_mid_decode_and_the_request_migrates(trt_cluster):
    """The generation server drops the connection after 3 tokens. With real token ids
    (`detokenize: false`) the orchestrator runs a new context + generation pair for the prompt plus
    the tokens sent and the client gets all 6; with the default text-only stream (placeholder ids)
    it cannot, and the non-streamed client gets a 503."""
    url, state, ctx, gen, _ = trt_cluster
    gen.fake.config.disconnect_after = 3
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, max_tokens=6), timeout=30)
    assert resp.status_code == 503 and "failed after" in resp.text and len(ctx.fake.bodies) == 1
    ctx.fake.bodies.clear()
    adapters = [state.cluster.instances[i].backend for i in ("trt-ctx", "trt-gen")]
    for adapter in adapters:
        adapter.detokenize = False
    try:
        resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, max_tokens=6), timeout=30)
    finally:
        for adapter in adapters:
            adapter.detokenize = True
    assert resp.status_code == 200, resp.text
    data = resp.json()
    prompt = ctx.fake.bodies[0]["prompt"]
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 6
    assert len(ctx.fake.bodies) == 2 and len(ctx.fake.bodies[1]["prompt"]) > len(prompt)  # the continuation
    sent = ctx.fake.bodies[1]["prompt"][len(prompt):]
    assert ctx.fake.bodies[1]["prompt"][: len(prompt)] == prompt
    assert sent == toy_model.expected(prompt, len(sent)).tokens  # the ids sent, real ones (no text without detokenize)
    assert ctx.fake.bodies[1]["max_tokens"] == 6 - len(sent)
