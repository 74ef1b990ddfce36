"""Contract tests: the SGLang adapter and BootstrapRoomStrategy against the protocol fake."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import BackendError, GenRequest, SamplingParams
from backends.sglang import RestartRequired, SGLangBackend, check_pd_pair, sampling_params
from kvbridge.base import HandoffStats
from kvbridge.factory import strategy_for
from kvbridge.sglang import BootstrapRoomStrategy
from tests.adapter_helpers import Node, Nodes, collect, gen_request, joined, run_handoff, wait_for
from tests.fakes import toy_model
from tests.fakes.sglang_fake import SGLangFake, SGLangFakeConfig

PROMPT = [1, 15043, 3186, 42]


@pytest.fixture
async def make_node():
    nodes = Nodes()

    async def make(mode: str | None = None, role: str | None = None, **cfg) -> Node:
        instance_id, role = f"{mode or 'colo'}-{len(nodes)}", role or (mode or "colocated")
        fake = SGLangFake(SGLangFakeConfig(mode=mode, **cfg))
        return nodes.start(fake, lambda url: SGLangBackend(url, instance_id, role, "toy-model"))

    yield make
    await nodes.close()


def req(max_tokens: int = 8, prompt: list[int] | None = None, rid: str = "r1", **kw) -> GenRequest:
    return gen_request(prompt or PROMPT, max_tokens, rid, **kw)


# ---- co-located -----------------------------------------------------------------------------

@pytest.mark.parametrize("incremental", [False, True])
async def test_colocated_generate_exact_output(make_node, incremental):
    node = await make_node(incremental_streaming=incremental)
    events = await collect(node.backend.generate(req(6)))
    exp = toy_model.expected(PROMPT, 6)
    ids, text = joined(events)
    assert ids == exp.tokens and text == exp.text
    assert events[-1].finish_reason == "length" and all(e.phase == "generate" for e in events)
    assert all(e.finish_reason is None for e in events[:-1])
    body = node.fake.bodies[0]
    assert body["input_ids"] == PROMPT and body["stream"] is True
    assert body["sampling_params"] == {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": False}
    assert len(body["rid"]) == 32 and "bootstrap_room" not in body


async def test_sampling_defaults_not_given_are_not_sent(make_node):
    """Temperature and top_p go out only when the client gave them: SGLang then applies the
    model's generation_config.json defaults instead of our 1.0."""
    node = await make_node()
    bare = GenRequest("r1", list(PROMPT), SamplingParams(max_tokens=4))
    await collect(node.backend.generate(bare))
    assert node.fake.bodies[-1]["sampling_params"] == {"max_new_tokens": 4, "ignore_eos": False}
    given = GenRequest("r2", list(PROMPT), SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4))
    await collect(node.backend.generate(given))
    assert node.fake.bodies[-1]["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9,
                                                       "ignore_eos": False}
    assert sampling_params(SamplingParams(temperature=1.0, top_p=1.0)) == {
        "max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "ignore_eos": False}  # given, so sent


async def test_colocated_stop_string_eos_and_seed(make_node):
    node = await make_node()
    exp = toy_model.expected(PROMPT, 10)
    stop = exp.text.split()[2]  # the third token's text
    events = await collect(node.backend.generate(req(10, stop=[stop], seed=7)))
    assert events[-1].finish_reason == "stop"
    assert joined(events)[1] == toy_model.expected(PROMPT, 10, stop=[stop]).text
    assert node.fake.bodies[0]["sampling_params"]["stop"] == [stop]
    assert node.fake.bodies[0]["sampling_params"]["sampling_seed"] == 7
    eos_prompt = [5, 6, toy_model.EOS_AT_THIRD]
    events = await collect(node.backend.generate(req(10, prompt=eos_prompt, rid="r2")))
    assert events[-1].finish_reason == "stop"
    assert joined(events)[0] == toy_model.expected(eos_prompt, 10).tokens


async def test_colocated_http_error_raises(make_node):
    node = await make_node(generate_status=503)
    with pytest.raises(BackendError) as err:
        await collect(node.backend.generate(req()))
    assert err.value.status == 503 and err.value.retryable


async def test_colocated_in_stream_failure_before_first_token_raises(make_node):
    node = await make_node(retract_503_after=0)
    with pytest.raises(BackendError) as err:
        await collect(node.backend.generate(req(5)))
    assert err.value.status == 503 and err.value.retryable


async def test_colocated_disconnect_mid_stream_is_error_event(make_node):
    node = await make_node(disconnect_after=3)
    events = await collect(node.backend.generate(req(10)))
    assert events[-1].finish_reason == "error" and events[-1].error
    assert len(joined(events)[0]) == 3


async def test_colocated_abort_by_request_id(make_node):
    node = await make_node(token_delay_s=0.05)
    agen = node.backend.generate(req(50, rid="client-req"))
    first = await agen.__anext__()
    assert first.token_ids
    await node.backend.abort("client-req")
    rest = await collect(agen)
    assert rest[-1].finish_reason == "abort"
    rid = node.fake.bodies[0]["rid"]
    assert {"rid": rid} in node.fake.abort_calls
    calls = len(node.fake.abort_calls)
    await node.backend.abort(rid[:1])   # unknown ids are never sent (SGLang aborts by rid prefix)
    assert len(node.fake.abort_calls) == calls


# ---- disaggregated --------------------------------------------------------------------------

@pytest.fixture
async def pd(make_node):
    p = await make_node("prefill")
    d = await make_node("decode")
    return p, d


async def run_pd(p: Node, d: Node, request: GenRequest, strategy=None):
    return await run_handoff(strategy or strategy_for("sglang"), p, d, request)


@pytest.mark.parametrize("first_chunk_tokens", [1, 2])
async def test_pd_exact_output_and_identical_bodies(pd, first_chunk_tokens):
    p, d = pd
    d.config.first_chunk_tokens = first_chunk_tokens
    events, stats = await run_pd(p, d, req(8))
    exp = toy_model.expected(PROMPT, 8)
    ids, text = joined(events)
    assert ids == exp.tokens and text == exp.text
    assert events[0].phase == "prefill" and events[0].token_ids == exp.tokens[:1]
    assert all(e.phase == "decode" for e in events[1:])
    assert events[-1].finish_reason == "length"
    (pb,), (db,) = p.fake.bodies, d.fake.bodies
    assert pb == db
    assert pb["bootstrap_host"] == "127.0.0.1" and pb["bootstrap_port"] == p.server.port
    assert 0 <= pb["bootstrap_room"] < 2**63 and len(pb["rid"]) == 32
    assert stats.extra["bootstrap_room"] == pb["bootstrap_room"] and stats.kv_tokens == len(PROMPT)
    assert not p.fake.aborted and not d.fake.aborted and not p.fake.abort_calls and not d.fake.abort_calls


async def test_pd_strategy_type():
    assert isinstance(strategy_for("sglang"), BootstrapRoomStrategy)


async def test_pd_first_token_emitted_before_decode_finishes(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    agen = BootstrapRoomStrategy().run(req(20), p.backend, d.backend, HandoffStats())
    first = await asyncio.wait_for(agen.__anext__(), 2.0)
    assert first.phase == "prefill" and first.token_ids == [toy_model.first_token(PROMPT)]
    assert d.fake.live  # the decode is still generating
    await agen.aclose()


async def test_pd_max_tokens_one(pd):
    p, d = pd
    events, _ = await run_pd(p, d, req(1))
    assert joined(events)[0] == [toy_model.first_token(PROMPT)]
    assert events[-1].finish_reason == "length"


async def test_pd_stop_string(pd):
    p, d = pd
    exp = toy_model.expected(PROMPT, 12)
    stop = exp.text.split()[3]
    events, _ = await run_pd(p, d, req(12, stop=[stop]))
    assert events[-1].finish_reason == "stop"
    assert joined(events)[1] == toy_model.expected(PROMPT, 12, stop=[stop]).text


async def test_pd_early_close_aborts_both(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    agen = BootstrapRoomStrategy().run(req(100), p.backend, d.backend, HandoffStats())
    await agen.__anext__()
    await agen.__anext__()
    await agen.aclose()
    rid = d.fake.bodies[0]["rid"]
    assert {"rid": rid} in d.fake.abort_calls
    await wait_for(lambda: rid in d.fake.aborted)
    await wait_for(lambda: not d.fake.live)  # the decode frees it at its next step


async def test_pd_cancel_before_first_token_aborts_both(pd):
    p, d = pd
    d.config.never_bootstrap = True  # both sides stay waiting
    d.config.waiting_timeout_s = 10
    p.config.bootstrap_timeout_s = 10

    async def consume():
        return await collect(BootstrapRoomStrategy().run(req(5), p.backend, d.backend, HandoffStats()))

    task = asyncio.create_task(consume())
    await wait_for(lambda: p.fake.live and d.fake.live)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rid = p.fake.bodies[0]["rid"]
    await wait_for(lambda: {"rid": rid} in p.fake.abort_calls and {"rid": rid} in d.fake.abort_calls)
    await wait_for(lambda: not p.fake.live and not d.fake.live)


async def test_pd_decode_http_503_raises_and_aborts_prefill(pd):
    p, d = pd
    d.config.generate_status = 503
    p.config.bootstrap_timeout_s = 10
    with pytest.raises(BackendError) as err:
        await run_pd(p, d, req(5))
    assert err.value.status == 503 and err.value.retryable
    assert err.value.instance_id == d.backend.instance_id  # the side that failed
    rid = p.fake.bodies[0]["rid"]
    await wait_for(lambda: {"rid": rid} in p.fake.abort_calls)
    await wait_for(lambda: not p.fake.live)


async def test_pd_decode_retraction_503_in_stream(pd):
    p, d = pd
    d.config.retract_503_after = 3
    events, _ = await run_pd(p, d, req(10))
    assert events[-1].finish_reason == "error"
    assert "503" in events[-1].error and "retryable" in events[-1].error
    assert joined(events)[0] == toy_model.expected(PROMPT, 10).tokens[:3]


async def test_pd_bootstrap_timeout(pd):
    p, d = pd
    d.config.never_bootstrap = True
    d.config.waiting_timeout_s = 5
    p.config.bootstrap_timeout_s = 0.3
    with pytest.raises(BackendError) as err:  # nothing reached the caller: raised, retryable elsewhere
        await run_pd(p, d, req(5))
    assert "Prefill bootstrap failed" in str(err.value) and err.value.status == 500 and err.value.retryable
    assert err.value.instance_id == p.backend.instance_id
    rid = d.fake.bodies[0]["rid"]
    await wait_for(lambda: {"rid": rid} in d.fake.abort_calls)
    await wait_for(lambda: not d.fake.live)


async def test_pd_decode_disconnect_mid_stream(pd):
    p, d = pd
    d.config.disconnect_after = 4
    events, _ = await run_pd(p, d, req(10))
    assert events[-1].finish_reason == "error"
    assert joined(events)[0] == toy_model.expected(PROMPT, 10).tokens[:4]


async def test_pd_prefill_unreachable(make_node):
    p = await make_node("prefill")
    d = await make_node("decode")
    d.config.waiting_timeout_s = 1
    p.backend._bootstrap_port = 1  # nobody listens there: the decode cannot hand-shake
    await p.backend.info()
    p.config.bootstrap_timeout_s = 0.5
    with pytest.raises(BackendError) as err:
        await run_pd(p, d, req(5))
    assert "Decode handshake failed" in str(err.value) and err.value.retryable


async def test_pd_pair_check_refuses_page_size_mismatch(make_node):
    p = await make_node("prefill", page_size=16)
    d = await make_node("decode", page_size=32)
    with pytest.raises(BackendError) as err:
        await run_pd(p, d, req(3))
    assert err.value.status == 409 and "page_size" in str(err.value)
    assert not p.fake.bodies and not d.fake.bodies
    # Both servers' info is now known: the strategy checks it before handing back the pair's stream.
    assert p.backend.known_info is not None and d.backend.known_info is not None
    with pytest.raises(BackendError) as err:
        await run_pd(p, d, req(3))
    assert err.value.status == 409 and not p.fake.bodies and not d.fake.bodies
    with pytest.raises(BackendError):
        check_pd_pair({"page_size": 1, "kv_cache_dtype": "fp8_e5m2"}, {"page_size": 1, "kv_cache_dtype": "auto"})
    check_pd_pair({"page_size": 1, "kv_cache_dtype": "auto"}, {"page_size": 1, "kv_cache_dtype": "auto"})


async def test_disaggregate_is_the_adapters_pd_capability(pd):
    """The adapter's public P/D call (what the strategy hands a request to): one body with the same
    rid and room to both servers, the first token as a prefill event, the rest as decode events."""
    from backends.sglang import disaggregate

    p, d = pd
    stats = HandoffStats()
    events = await collect(disaggregate(req(5), p.backend, d.backend, stats))
    exp = toy_model.expected(PROMPT, 5)
    assert events[0].phase == "prefill" and events[0].token_ids == exp.tokens[:1]
    assert {e.phase for e in events[1:]} == {"decode"} and events[-1].finish_reason == "length"
    assert joined(events) == (exp.tokens, exp.text)
    (p_body,), (d_body,) = p.fake.bodies, d.fake.bodies
    assert p_body == d_body and p_body["rid"] == stats.extra["rid"]
    assert p_body["bootstrap_room"] == stats.extra["bootstrap_room"] and stats.kv_tokens == len(PROMPT)
    assert not p.backend.ledger and not d.backend.ledger  # both sides' books closed


# ---- load, info, role -----------------------------------------------------------------------

async def test_load_from_v1_loads_with_ledger(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    request = req(50)
    request.predicted_output_lo, request.heavy_decode = 400, True
    agen = BootstrapRoomStrategy().run(request, p.backend, d.backend, HandoffStats())
    await agen.__anext__()
    await agen.__anext__()
    report = await d.backend.load()
    assert report.role == "decode" and report.backend == "sglang" and report.model == "toy-model"
    assert report.total_kv_tokens == 100_000 and report.running == 1
    assert 0 < report.total_kv_tokens - report.free_kv_tokens <= len(PROMPT) + 50
    assert report.heavy_decodes == 1 and report.light_decodes == 0 and report.decode_remaining[0] < 400
    assert report.extra["endpoint"] == "/v1/loads"
    await agen.aclose()
    assert (await d.backend.load()).heavy_decodes == 0  # our ledger forgets it at once
    await wait_for(lambda: not d.fake.live)  # the server frees it at its next step
    report = await d.backend.load()
    assert report.heavy_decodes == 0 and report.running == 0 and report.free_kv_tokens == 100_000


@pytest.mark.parametrize("api,endpoint", [("legacy", "/get_load"), ("metrics", "/metrics")])
async def test_load_fallbacks(make_node, api, endpoint):
    node = await make_node(load_api=api, version="0.5.20", max_total_num_tokens=5000)
    report = await node.backend.load()
    assert report.extra["endpoint"] == endpoint
    assert report.total_kv_tokens == 5000 and report.free_kv_tokens == 5000 and report.role == "colocated"


async def test_load_unreachable_raises():
    backend = SGLangBackend("http://127.0.0.1:1", "gone", "decode")
    with pytest.raises(BackendError):
        await backend.load()
    assert not await backend.health()
    await backend.close()


async def test_info_reads_server_info(make_node):
    node = await make_node("prefill", page_size=16, chunked_prefill_size=2048)
    info = await node.backend.info()
    assert info["page_size"] == 16 and info["total_kv_tokens"] == 100_000 and info["chunk_size"] == 2048
    assert info["disaggregation_mode"] == "prefill" and info["bootstrap_port"] == node.server.port
    assert node.backend.bootstrap_port == node.server.port
    assert (await node.backend.load()).chunk_size == 2048


async def test_set_role_switch_in_place(make_node):
    node = await make_node("decode", enable_role_switch=True)
    result = await node.backend.set_role("prefill")
    assert result["role"] == "prefill" and node.backend.role == "prefill" and node.fake.config.mode == "prefill"
    assert node.fake.role_switches == [{"new_role": "prefill", }]
    assert (await node.backend.load()).role == "prefill" and node.backend.accepting
    # flipping back to decode: this instance has decode graphs from before, so no memory budget needed
    result = await node.backend.set_role("decode")
    assert node.fake.config.mode == "decode"


async def test_set_role_to_decode_needs_graph_memory(make_node):
    node = await make_node("prefill", enable_role_switch=True)
    with pytest.raises(BackendError) as err:
        await node.backend.set_role("decode")
    assert err.value.status == 409 and "decode_cuda_graph_memory_gb" in str(err.value)
    assert node.backend.accepting  # safe_to_restore: back in service in its old role
    node.backend.decode_cuda_graph_memory_gb = 0.5
    await node.backend.set_role("decode")
    assert node.backend.role == "decode"


async def test_set_role_not_enabled_reports_restart(make_node):
    node = await make_node("decode")
    with pytest.raises(RestartRequired) as err:
        await node.backend.set_role("prefill")
    assert err.value.status == 409 and "restart" in str(err.value)


async def test_set_role_old_server_reports_restart_and_stays_drained(make_node):
    node = await make_node("decode", version="0.5.20", load_api="legacy")
    with pytest.raises(RestartRequired):
        await node.backend.set_role("prefill")
    assert not node.backend.accepting and not (await node.backend.load()).accepting


async def test_set_role_colocated_needs_restart(make_node):
    node = await make_node(None)
    with pytest.raises(RestartRequired):
        await node.backend.set_role("prefill")


async def test_fake_refuses_missing_room_and_unknown_sampling_key(make_node):
    import httpx

    node = await make_node("decode")
    async with httpx.AsyncClient(base_url=node.server.url) as client:
        resp = await client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {}})
        assert resp.status_code == 400 and "bootstrap room" in resp.json()["error"]["message"]
        resp = await client.post("/generate", json={"input_ids": [1, 2], "bootstrap_room": 1,
                                                    "sampling_params": {"max_tokens": 3}})
        assert resp.status_code == 400 and "unknown field `max_tokens`" in resp.json()["error"]["message"]
