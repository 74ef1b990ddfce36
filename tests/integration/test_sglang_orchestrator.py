"""The whole orchestrator over fake SGLang servers, through the OpenAI API, streamed and not."""

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
PD_MODEL = "toy-sglang-pd"
COLO_MODEL = "toy-sglang-colo"


@pytest.fixture(scope="module")
def sglang_module(tmp_path_factory):
    """One orchestrator and its fake SGLang servers for the whole module (startup is the slow part)."""
    with fakes() as group:
        p = group.sglang("prefill")
        d = group.sglang("decode")
        c = group.sglang(None)
        with orchestrator_over(tmp_path_factory.mktemp("sglang-orch"),
                               (p, "sglang", "prefill", PD_MODEL, "sg-prefill"),
                               (d, "sglang", "decode", PD_MODEL, "sg-decode"),
                               (c, "sglang", "colocated", COLO_MODEL, "sg-colo")) as (url, state):
            yield url, state, p, d, c


@pytest.fixture
def sglang_cluster(sglang_module):
    yield from settled(sglang_module)


def chat_body(model: str, **kw) -> dict:
    return shared_chat_body(model, "Tell me about KV caches.", **kw)


def test_chat_disaggregated_non_streamed(sglang_cluster):
    url, _, p, d, _ = sglang_cluster
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL), timeout=30)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    prompt = d.fake.bodies[0]["input_ids"]
    assert p.fake.bodies[0] == d.fake.bodies[0]
    exp = toy_model.expected(prompt, 12)
    assert data["choices"][0]["message"]["content"] == exp.text
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
    assert record["backend"] == "sglang" and record["state"] == "finished"
    assert record["prefill_instance"] == "sg-prefill" and record["decode_instance"] == "sg-decode"
    assert record["completion_tokens"] == 12 and record["first_token_at"] is not None


def test_chat_disaggregated_streamed(sglang_cluster):
    url, _, _, d, _ = sglang_cluster
    d.fake.config.first_chunk_tokens = 2
    body = chat_body(PD_MODEL, stream=True, max_tokens=9, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    prompt = d.fake.bodies[0]["input_ids"]
    exp = toy_model.expected(prompt, 9)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == exp.text
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 9


def test_completions_colocated_with_stop(sglang_cluster):
    url, _, p, d, c = sglang_cluster
    prompt = [11, 12, 13, 14]
    full = toy_model.expected(prompt, 10)
    stop = full.text.split()[3]
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": COLO_MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "stop": stop})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == toy_model.expected(prompt, 10, stop=[stop]).text and choice["finish_reason"] == "stop"
    assert c.fake.bodies[0]["input_ids"] == prompt and c.fake.bodies[0]["sampling_params"]["stop"] == [stop]
    assert not p.fake.bodies and not d.fake.bodies


def test_streamed_client_disconnect_aborts_both_sides(sglang_cluster):
    url, _, p, d, _ = sglang_cluster
    d.fake.config.token_delay_s = 0.05
    body = chat_body(PD_MODEL, stream=True, max_tokens=200)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data:"):
                seen += 1
            if seen >= 3:
                break
    rid = d.fake.bodies[0]["rid"]
    wait_until(lambda: rid in d.fake.aborted)
    wait_until(lambda: not d.fake.live and not p.fake.live)
    assert {"rid": rid} in d.fake.abort_calls


def test_decode_failure_before_first_token_is_an_openai_error(sglang_cluster):
    url, _, p, d, _ = sglang_cluster
    d.fake.config.generate_status = 503
    p.fake.config.bootstrap_timeout_s = 10
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL), timeout=60)
    assert resp.status_code >= 500
    assert "error" in resp.json()
    wait_until(lambda: not p.fake.live)  # the prefill's room was aborted, not left to time out
    d.fake.config.generate_status = None
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL), timeout=60)
    assert resp.status_code == 200


def test_decode_retracted_on_every_attempt_ends_with_error(sglang_cluster):
    """Every attempt is retracted after 2 tokens: the request migrates twice (3 attempts in all),
    then the stream ends with an error event after the 6 tokens it got."""
    url, _, _, d, _ = sglang_cluster
    d.fake.config.retract_503_after = 2
    body = chat_body(PD_MODEL, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        events = sse_events(r)
    assert any("error" in e for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][-1] == "error"
    assert len(d.fake.bodies) == 3


def test_instances_from_config_and_load_reports(orchestrator_for):
    with fakes() as group:
        p = group.sglang("prefill")
        d = group.sglang("decode")
        specs = [InstanceSpec(url=p.url, backend="sglang", role="prefill", model=PD_MODEL, id="p0",
                              options={"bootstrap_port": p.server.port}),
                 InstanceSpec(url=d.url, backend="sglang", role="decode", model=PD_MODEL, id="d0")]
        url, state = orchestrator_for(specs)
        listed = httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=10).json()["instances"]
        assert {i["id"]: (i["backend"], i["role"], i["state"]) for i in listed} == {
            "p0": ("sglang", "prefill", "healthy"), "d0": ("sglang", "decode", "healthy")}
        wait_until(lambda: state.cluster.get("d0").load is not None)
        load = state.cluster.get("d0").load
        assert load.backend == "sglang" and load.total_kv_tokens == 100_000
        assert state.cluster.get("p0").info["page_size"] == 1
        resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, max_tokens=4), timeout=30)
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == toy_model.expected(
            d.fake.bodies[0]["input_ids"], 4).text


def test_flip_through_admin_api(orchestrator_for):
    with fakes() as group:
        p = group.sglang("prefill")
        d1 = group.sglang("decode", enable_role_switch=True)
        d2 = group.sglang("decode")
        url, state = orchestrator_for([
            InstanceSpec(url=p.url, backend="sglang", role="prefill", model=PD_MODEL, id="p0"),
            InstanceSpec(url=d1.url, backend="sglang", role="decode", model=PD_MODEL, id="d1"),
            InstanceSpec(url=d2.url, backend="sglang", role="decode", model=PD_MODEL, id="d2"),
        ])
        resp = httpx.post(f"{url}/admin/instances/d1/flip", json={"role": "prefill"}, headers=AUTH, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["role"] == "prefill" and d1.fake.config.mode == "prefill"
        resp = httpx.post(f"{url}/admin/instances/d2/flip", json={"role": "prefill"}, headers=AUTH, timeout=30)
        assert resp.status_code == 409 and "restart" in resp.text


def test_decode_retraction_mid_stream_migrates_the_request(sglang_cluster):
    """SGLang retracts a running decode with an in-stream 503 after 3 tokens: the orchestrator
    continues the request (prompt + the 3 tokens sent, 3 more to go) and the client gets all 6."""
    url, state, _, d, _ = sglang_cluster
    d.fake.config.retract_503_after = 3
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body(PD_MODEL, max_tokens=6), timeout=30)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    prompt = d.fake.bodies[0]["input_ids"]
    sent = toy_model.expected(prompt, 6).tokens[:3]
    # The continuation is a new request for the prompt plus the tokens already sent.
    assert d.fake.bodies[1]["input_ids"] == prompt + sent
    assert d.fake.bodies[1]["sampling_params"]["max_new_tokens"] == 3
    rest = toy_model.expected(prompt + sent, 3)
    assert data["choices"][0]["message"]["content"] == toy_model.detokenize(sent) + rest.text
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 6
    record = httpx.get(f"{url}/admin/requests/{data['id']}", headers=AUTH, timeout=10).json()
    assert record["state"] == "finished" and record["completion_tokens"] == 6


@pytest.mark.parametrize("broken_after", [1, 2, 5])
@pytest.mark.parametrize("stream", [True, False])
def test_a_decode_stream_broken_after_n_tokens_migrates_without_repeating_or_dropping_text(
        sglang_cluster, broken_after, stream):
    """The decode server drops the connection after 1, 2 or n tokens. The request continues from the
    prompt plus what was sent (asking for the rest, which stays under the break point so the
    continuation completes), and the client sees every token exactly once."""
    url, _, _, d, _ = sglang_cluster
    d.fake.config.disconnect_after = broken_after
    max_tokens = 2 * broken_after
    body = {"model": PD_MODEL, "prompt": [11, 12, 13, 14], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            events = sse_events(r)
        text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        finishes = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
        assert finishes[-1] == "length" and "error" not in finishes
    else:
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        text = resp.json()["choices"][0]["text"]
        assert resp.json()["usage"]["completion_tokens"] == max_tokens
    prompt = d.fake.bodies[0]["input_ids"]
    sent = toy_model.expected(prompt, max_tokens).tokens[:broken_after]
    assert d.fake.bodies[1]["input_ids"] == prompt + sent  # the continuation
    rest = toy_model.expected(prompt + sent, max_tokens - broken_after)
    assert text == toy_model.detokenize(sent) + rest.text


@pytest.mark.parametrize("model", [PD_MODEL, COLO_MODEL])
def test_cached_tokens_come_from_sglang_meta_info(sglang_cluster, model):
    """SGLang's `meta_info.cached_tokens` (its radix cache's hit) reaches usage and the store: P/D
    takes the prefill server's, co-located the server's own."""
    url = sglang_cluster[0]
    prompt = list(range(100, 140))
    sent = [httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": model, "prompt": p, "max_tokens": 3, "temperature": 0}).json()
            for p in (prompt, prompt + [7, 8, 9])]
    assert [s["usage"]["prompt_tokens_details"]["cached_tokens"] for s in sent] == [0, len(prompt)]
    record = httpx.get(f"{url}/admin/requests/{sent[1]['id']}", headers=AUTH, timeout=10).json()
    assert record["cached_tokens"] == len(prompt)
