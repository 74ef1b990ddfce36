"""Contract tests: the TensorRT-LLM adapter and DisaggregatedParamsStrategy against the protocol fake."""

from __future__ import annotations

import asyncio
import time

import pytest

from backends.base import BackendError, GenRequest, SamplingParams
from backends.common import RestartRequired
from backends.tensorrt_llm import PLACEHOLDER_ID, TensorRTLLMBackend, new_disagg_request_id
from kvbridge.base import HandoffStats
from kvbridge.factory import strategy_for
from kvbridge.tensorrt_llm import DisaggregatedParamsStrategy
from tests.adapter_helpers import Node, Nodes, collect, gen_request, joined, run_handoff, wait_for
from tests.fakes import toy_model
from tests.fakes.trtllm_fake import TRTFake, TRTFakeConfig

PROMPT = [1, 450, 7483, 310, 3444, 338]


@pytest.fixture
async def make_node():
    nodes = Nodes()

    async def make(role: str = "colocated", options: dict | None = None, **cfg) -> Node:
        instance_id = f"{role}-{len(nodes)}"
        fake = TRTFake(TRTFakeConfig(**cfg))
        return nodes.start(fake, lambda url: TensorRTLLMBackend(url, instance_id, role, "toy-model", **(options or {})))

    yield make
    await nodes.close()


@pytest.fixture
async def pd(make_node):
    return await make_node("prefill"), await make_node("decode")


def req(max_tokens: int = 8, prompt: list[int] | None = None, rid: str = "r1", **kw) -> GenRequest:
    return gen_request(prompt or PROMPT, max_tokens, rid, **kw)


async def run_pd(p: Node, d: Node, request: GenRequest):
    return await run_handoff(strategy_for("tensorrt-llm"), p, d, request)


# ---- ids ----------------------------------------------------------------------------------------

def test_disagg_request_ids_unique_and_in_range():
    ids = [new_disagg_request_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(1 << 40 <= i < 1 << 63 for i in ids)
    assert ids == sorted(ids)
    assert new_disagg_request_id(node=1) != new_disagg_request_id(node=2)


async def test_strategy_type():
    assert isinstance(strategy_for("tensorrt-llm"), DisaggregatedParamsStrategy)


# ---- co-located ---------------------------------------------------------------------------------

async def test_colocated_generate_text_mode(make_node):
    node = await make_node()
    events = await collect(node.backend.generate(req(6)))
    exp = toy_model.expected(PROMPT, 6)
    ids, text = joined(events)
    assert text == exp.text and len(ids) == len(exp.tokens) and set(ids) == {PLACEHOLDER_ID}
    assert events[-1].finish_reason == "length"
    body = node.fake.bodies[0]
    assert body == {"model": "toy-model", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


async def test_colocated_generate_token_mode_stop_and_seed(make_node):
    node = await make_node(options={"detokenize": False})
    exp = toy_model.expected(PROMPT, 10)
    stop = exp.text.split()[2]
    events = await collect(node.backend.generate(req(10, stop=[stop], seed=3, ignore_eos=True)))
    ids, _ = joined(events)
    assert ids == toy_model.expected(PROMPT, 10, ignore_eos=True, stop=[stop]).tokens
    assert events[-1].finish_reason == "stop"
    body = node.fake.bodies[0]
    assert body["detokenize"] is False and body["stop"] == [stop] and body["seed"] == 3 and body["ignore_eos"]


async def test_sampling_defaults_not_given_are_not_sent(pd):
    """Temperature and top_p go out only when the client gave them (newer builds default to the
    model's generation_config.json), on the context and the generation request alike."""
    p, d = pd
    bare = GenRequest("r1", list(PROMPT), SamplingParams(max_tokens=4))
    await run_pd(p, d, bare)
    for body in (p.fake.bodies[-1], d.fake.bodies[-1]):
        assert "temperature" not in body and "top_p" not in body
    given = GenRequest("r2", list(PROMPT), SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4))
    await run_pd(p, d, given)
    for body in (p.fake.bodies[-1], d.fake.bodies[-1]):
        assert body["temperature"] == 0.7 and body["top_p"] == 0.9


async def test_colocated_schema_error_raises(make_node):
    node = await make_node()
    node.backend.served_model = "toy-model"
    bad = req(4)
    with pytest.raises(BackendError) as err:
        body = node.backend.completion_body(bad, stream=False)
        body["stream_options"] = {"include_usage": True}
        resp = await node.backend._open_stream("x", body)
        await resp.aclose()
    assert err.value.status == 400 and "Stream options" in str(err.value)


# ---- disaggregated ------------------------------------------------------------------------------

@pytest.mark.parametrize("first_chunk_tokens", [1, 2])
async def test_pd_exact_output_and_wire(pd, first_chunk_tokens):
    p, d = pd
    d.config.first_chunk_tokens = first_chunk_tokens
    events, stats = await run_pd(p, d, req(8))
    exp = toy_model.expected(PROMPT, 8)
    ids, text = joined(events)
    assert text == exp.text and len(ids) == len(exp.tokens)
    assert events[0].phase == "prefill" and events[0].token_ids == exp.tokens[:1]
    assert events[0].text == toy_model.token_text(exp.tokens[0])
    assert all(e.phase == "decode" for e in events[1:]) and events[-1].finish_reason == "length"
    (ctx_body,), (gen_body,) = p.fake.bodies, d.fake.bodies
    disagg_id = stats.extra["disagg_request_id"]
    assert ctx_body == {"model": "toy-model", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
                        "stream": False,
                        "disaggregated_params": {"request_type": "context_only", "disagg_request_id": disagg_id}}
    assert 1 << 40 <= disagg_id < 1 << 63
    params = gen_body["disaggregated_params"]
    assert params["request_type"] == "generation_only"
    assert params["disagg_request_id"] == params["ctx_request_id"] == disagg_id
    assert params["first_gen_tokens"] == exp.tokens[:1]
    assert params["schedule_style"] is None and params["ctx_usage"] is None  # echoed unchanged
    assert gen_body["prompt"] == PROMPT and gen_body["stream"] is True
    assert p.fake.pulled == [disagg_id] and not p.fake.pending and not p.fake.aborted and not d.fake.aborted
    assert stats.kv_tokens == len(PROMPT) and stats.transfer_s > 0


async def test_pd_token_mode_drops_duplicate_by_count(make_node):
    p = await make_node("prefill", options={"detokenize": False})
    d = await make_node("decode", options={"detokenize": False}, first_chunk_tokens=3)
    events, _ = await run_pd(p, d, req(7))
    assert joined(events)[0] == toy_model.expected(PROMPT, 7).tokens


@pytest.mark.parametrize("detokenize", [True, False])
async def test_pd_generation_without_reemitted_first_token_keeps_all(make_node, detokenize):
    p = await make_node("prefill", options={"detokenize": detokenize})
    d = await make_node("decode", options={"detokenize": detokenize}, reemit_first_token=False)
    events, _ = await run_pd(p, d, req(7))
    exp = toy_model.expected(PROMPT, 7)
    ids, text = joined(events)
    assert len(ids) == len(exp.tokens)
    if detokenize:
        assert text == exp.text
    else:
        assert ids == exp.tokens


async def test_pd_first_token_before_generation(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    agen = DisaggregatedParamsStrategy().run(req(30), p.backend, d.backend, HandoffStats())
    first = await asyncio.wait_for(agen.__anext__(), 2.0)
    assert first.phase == "prefill" and first.token_ids == [toy_model.first_token(PROMPT)]
    assert not d.fake.bodies  # the generation request has not even been sent
    await agen.aclose()


async def test_pd_context_stop_answers_without_generation(pd):
    p, d = pd
    prompt = [5, 9, toy_model.STOP_AT_FIRST]
    events, stats = await run_pd(p, d, req(8, prompt=prompt))
    assert len(events) == 1 and events[0].finish_reason == "stop" and events[0].phase == "prefill"
    assert events[0].token_ids == [toy_model.EOS] and events[0].text == ""
    assert not d.fake.bodies and not p.fake.pending and stats.extra["generation_step"] is False


async def test_pd_context_stop_string_on_first_token(pd):
    p, d = pd
    stop = toy_model.token_text(toy_model.first_token(PROMPT)).strip()
    events, _ = await run_pd(p, d, req(8, stop=[stop]))
    assert len(events) == 1 and events[0].finish_reason == "stop" and not d.fake.bodies


async def test_pd_max_tokens_one_answers_at_once_and_frees_the_context_kv(pd):
    """`length` at max_tokens 1 is the whole answer, but the context server keeps the KV for a
    generation server (TensorRT-LLM's proxy continues on `length`): it is pulled right away."""
    p, d = pd
    events, stats = await run_pd(p, d, req(1))
    assert len(events) == 1 and events[0].finish_reason == "length"
    disagg_id = stats.extra["disagg_request_id"]
    await wait_for(lambda: p.fake.pulled == [disagg_id])
    assert not p.fake.pending and not p.fake.expired   # freed by the pull, not after kv_transfer_timeout_ms
    (gen_body,) = d.fake.bodies
    assert gen_body["disaggregated_params"]["request_type"] == "generation_only"
    assert gen_body["max_tokens"] == 1 and gen_body["stream"] is False
    await wait_for(lambda: not len(d.backend.ledger))


async def test_pd_stop_string_in_generation(pd):
    p, d = pd
    exp = toy_model.expected(PROMPT, 12)
    stop = exp.text.split()[3]
    events, _ = await run_pd(p, d, req(12, stop=[stop]))
    assert events[-1].finish_reason == "stop"
    assert joined(events)[1] == toy_model.expected(PROMPT, 12, stop=[stop]).text


async def test_pd_each_request_new_id(pd):
    p, d = pd
    _, s1 = await run_pd(p, d, req(3, rid="a"))
    _, s2 = await run_pd(p, d, req(3, rid="b"))
    assert s1.extra["disagg_request_id"] != s2.extra["disagg_request_id"]


async def test_pd_early_close_closes_generation_connection(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    agen = DisaggregatedParamsStrategy().run(req(100), p.backend, d.backend, HandoffStats())
    await agen.__anext__()
    await agen.__anext__()
    await agen.aclose()
    await wait_for(lambda: len(d.fake.aborted) == 1)
    assert not d.fake.running


async def test_pd_cancel_during_context_step(pd):
    p, d = pd
    p.config.context_delay_s = 2.0

    async def consume():
        return await collect(DisaggregatedParamsStrategy().run(req(5), p.backend, d.backend, HandoffStats()))

    task = asyncio.create_task(consume())
    await wait_for(lambda: p.fake.running)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: len(p.fake.aborted) == 1)
    assert not d.fake.bodies


async def test_pd_caller_gone_at_first_token_frees_the_context_kv(pd):
    """The caller leaves at the first token, before the generation request: the context's KV is
    pulled by the generation server at once instead of waiting for kv_transfer_timeout_ms."""
    p, d = pd
    stats = HandoffStats()
    agen = DisaggregatedParamsStrategy().run(req(30), p.backend, d.backend, stats)
    first = await agen.__anext__()
    assert first.phase == "prefill" and p.fake.pending
    await agen.aclose()
    await wait_for(lambda: p.fake.pulled == [stats.extra["disagg_request_id"]])
    assert not p.fake.pending and not p.fake.expired and stats.extra["kv_released"]
    assert [b["max_tokens"] for b in d.fake.bodies] == [1]


async def test_pd_caller_gone_during_the_kv_pull_lets_the_pull_finish(pd):
    """The caller leaves while the generation server pulls the KV: the pull is let finish (an
    abort then could leave the context holding the KV), and the stream is closed after it."""
    p, d = pd
    d.config.transfer_delay_s = 0.5
    d.config.token_delay_s = 0.05
    stats = HandoffStats()
    task = asyncio.create_task(collect(DisaggregatedParamsStrategy().run(req(30), p.backend, d.backend, stats)))
    await wait_for(lambda: d.fake.bodies)        # the generation request is out, its pull under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: p.fake.pulled == [stats.extra["disagg_request_id"]])
    assert not p.fake.pending and not p.fake.expired
    await wait_for(lambda: d.fake.aborted)       # then the generation was aborted
    assert not d.fake.finished and not d.fake.running


async def test_abort_during_context_step_drops_the_context_request(pd):
    """abort(request_id) reaches a context request still computing (no response yet to close)."""
    p, d = pd
    p.config.context_delay_s = 2.0
    task = asyncio.create_task(collect(DisaggregatedParamsStrategy().run(req(5), p.backend, d.backend,
                                                                         HandoffStats())))
    await wait_for(lambda: p.fake.running)
    await p.backend.abort("r1")
    with pytest.raises(BackendError) as err:
        await asyncio.wait_for(task, 1.5)
    assert err.value.status == 499
    await wait_for(lambda: len(p.fake.aborted) == 1)
    assert not p.fake.pending and not d.fake.bodies and not len(p.backend.ledger)


async def test_abort_by_request_id_closes_stream(make_node):
    node = await make_node(token_delay_s=0.05)
    agen = node.backend.generate(req(100, rid="client-1"))
    await agen.__anext__()
    await node.backend.abort("client-1")
    rest = await collect(agen)
    assert rest[-1].finish_reason == "abort"
    await wait_for(lambda: len(node.fake.aborted) == 1)


async def test_pd_generation_stream_error(pd):
    p, d = pd
    d.config.stream_error_after = 3
    events, _ = await run_pd(p, d, req(10))
    assert events[-1].finish_reason == "error" and "injected engine error" in events[-1].error


async def test_pd_generation_disconnect_mid_stream(pd):
    p, d = pd
    d.config.disconnect_after = 4
    events, _ = await run_pd(p, d, req(10))
    assert events[-1].finish_reason == "error"
    assert events[-1].error and "stream broke" in events[-1].error


async def _first_then_failure(p, d, strategy: DisaggregatedParamsStrategy) -> tuple[list, BackendError]:
    events = []
    with pytest.raises(BackendError) as err:
        async for event in strategy.run(req(10), p.backend, d.backend, HandoffStats()):
            events.append(event)
    return events, err.value


@pytest.mark.parametrize("fault", ["transfer", 400, 500, 503])
async def test_pd_generation_failure_before_its_first_token_is_retryable(pd, fault):
    """A generation server failing before its first token (a failed KV transfer in the stream, an
    HTTP 400 handler error, a 5xx) raises a retryable error naming it, so the control plane runs
    the request again on another generation instance (migrating from the first token, sent
    early)."""
    p, d = pd
    if fault == "transfer":
        d.config.transfer_fail = True
    else:
        d.config.generation_error_status = fault
    events, exc = await _first_then_failure(p, d, DisaggregatedParamsStrategy())
    assert [e.phase for e in events] == ["prefill"] and events[0].finish_reason is None
    assert exc.retryable and exc.instance_id == d.backend.instance_id
    assert ("KV cache transfer failed" if fault == "transfer" else f"HTTP {fault}") in str(exc)


async def test_pd_first_token_held_for_the_generation_step(pd):
    """Without early_first_token the first token waits for the generation's first output: a
    generation failure then comes before any token (the control plane re-places the request)."""
    p, d = pd
    strategy = DisaggregatedParamsStrategy(early_first_token=False)
    events, stats = await run_handoff(strategy, p, d, req(8))
    assert joined(events)[1] == toy_model.expected(PROMPT, 8).text and events[0].phase == "prefill"
    d.config.transfer_fail = True
    events, exc = await _first_then_failure(p, d, strategy)
    assert events == [] and exc.retryable and exc.instance_id == d.backend.instance_id


async def test_pd_context_kv_expires_between_phases(pd):
    p, d = pd
    p.config.kv_transfer_timeout_ms = 100
    ctx = await p.backend.context_step(req(5), new_disagg_request_id())
    assert p.fake.pending
    await wait_for(lambda: not p.fake.pending)
    from backends.base import KVHandle

    kv = KVHandle("r1", len(PROMPT), ctx.first.token_ids[0],
                  extra={"disaggregated_params": ctx.params, "prompt_token_ids": ctx.prompt_token_ids,
                         "first_text": ctx.first.text})
    with pytest.raises(BackendError) as err:   # nothing reached the caller from decode(): it raises
        await collect(d.backend.decode(req(5), kv))
    assert "expired" in str(err.value) and err.value.retryable


async def test_pd_context_without_transceiver_or_with_overlap(make_node):
    d = await make_node("decode")
    p = await make_node("prefill", overlap_scheduler=True)
    with pytest.raises(BackendError) as err:
        await run_pd(p, d, req(4))
    assert err.value.status == 400 and "overlap" in str(err.value)
    p2 = await make_node("prefill", has_transceiver=False)
    with pytest.raises(BackendError) as err:
        await run_pd(p2, d, req(4))
    assert "cache_transceiver_config" in str(err.value)


async def test_pd_auth_header(make_node):
    p = await make_node("prefill", auth_key="s3cret")
    d = await make_node("decode", options={"auth_key": "s3cret"}, auth_key="s3cret")
    events, _ = await run_pd(p, d, req(4))
    assert events[-1].finish_reason == "length"
    assert d.fake.headers[0]["x-trtllm-disagg-auth"].startswith("sha256=")
    d2 = await make_node("decode", auth_key="s3cret")  # adapter without the key
    events, exc = await _first_then_failure(p, d2, DisaggregatedParamsStrategy())
    assert len(events) == 1 and exc.status == 400 and "authentication" in str(exc)
    assert exc.retryable and exc.instance_id == d2.backend.instance_id


async def test_pd_legacy_build_without_disagg_request_id(make_node):
    p = await make_node("prefill", newest_fields=False)
    d = await make_node("decode", newest_fields=False)
    events, _ = await run_pd(p, d, req(6))
    assert joined(events)[1] == toy_model.expected(PROMPT, 6).text
    assert "disagg_request_id" not in p.fake.bodies[-1]["disaggregated_params"]


def _upgrade(*nodes: Node) -> None:
    for node in nodes:
        node.config.newest_fields, node.config.version = True, "1.3.0rc5"


async def test_pd_legacy_fallback_is_probed_again_after_a_while(make_node):
    """The 1.0-era fallback is per worker and not for good: after legacy_recheck_s the next
    context request offers disagg_request_id again, so an upgraded worker gets it."""
    p = await make_node("prefill", newest_fields=False, version="1.0.0")
    d = await make_node("decode", newest_fields=False, version="1.0.0")
    await run_pd(p, d, req(3))
    assert ["disagg_request_id" in b["disaggregated_params"] for b in p.fake.bodies] == [True, False]
    await run_pd(p, d, req(3))                  # within legacy_recheck_s: straight to the fallback
    assert "disagg_request_id" not in p.fake.bodies[-1]["disaggregated_params"] and len(p.fake.bodies) == 3
    _upgrade(p, d)
    p.backend.legacy_recheck_s = 0.0
    events, stats = await run_pd(p, d, req(3))
    assert len(p.fake.bodies) == 4 and events[-1].finish_reason == "length"
    assert p.fake.bodies[-1]["disaggregated_params"]["disagg_request_id"] == stats.extra["disagg_request_id"]
    p.backend.legacy_recheck_s = 300.0
    await run_pd(p, d, req(3))                  # accepted: it stays on the field
    assert "disagg_request_id" in p.fake.bodies[-1]["disaggregated_params"] and len(p.fake.bodies) == 5


@pytest.mark.parametrize("sign", ["came back", "new version"])
async def test_pd_legacy_fallback_forgotten_when_the_worker_changes(make_node, sign):
    """A worker that was down and is back (perhaps restarted on a newer build), or reports a new
    version, is offered disagg_request_id again at once."""
    p = await make_node("prefill", newest_fields=False, version="1.0.0")
    d = await make_node("decode", newest_fields=False, version="1.0.0")
    await p.backend.info()
    await run_pd(p, d, req(3))
    _upgrade(p, d)
    if sign == "came back":
        p.config.health_status = 503
        assert not await p.backend.health()
        p.config.health_status = 200
        assert await p.backend.health()
    else:
        assert (await p.backend.info(refresh=True))["version"] == "1.3.0rc5"
    _, stats = await run_pd(p, d, req(3))
    assert p.fake.bodies[-1]["disaggregated_params"]["disagg_request_id"] == stats.extra["disagg_request_id"]


# ---- load, info, role ---------------------------------------------------------------------------

async def test_load_from_drained_metrics(pd):
    p, d = pd
    d.config.token_delay_s = 0.05
    request = req(64)
    request.predicted_output_lo, request.heavy_decode = 300, True
    agen = DisaggregatedParamsStrategy().run(request, p.backend, d.backend, HandoffStats())
    for _ in range(3):
        await agen.__anext__()
    report = await d.backend.load()
    tpb = d.config.tokens_per_block
    blocks = -(-(len(PROMPT) + 64) // tpb)
    assert report.total_kv_tokens == d.config.max_num_blocks * tpb
    assert report.free_kv_tokens == (d.config.max_num_blocks - blocks) * tpb
    assert report.running == 1 and report.heavy_decodes == 1 and report.backend == "tensorrt-llm"
    assert report.extra["tokens_per_block"] == tpb and report.chunk_size == d.config.max_num_tokens
    await agen.aclose()
    await wait_for(lambda: not d.fake.running)
    await d.backend.load()            # drains what is left ...
    again = await d.backend.load()    # ... so /metrics now answers []: idle, all blocks free again
    assert again.total_kv_tokens == report.total_kv_tokens == again.free_kv_tokens
    assert again.extra["idle"] and again.running == 0 and again.heavy_decodes == 0


async def test_load_of_a_fresh_worker_runs_one_health_generation(make_node):
    node = await make_node("decode")
    report = await node.backend.load()
    assert node.fake.health_generations == 1
    assert report.total_kv_tokens == report.free_kv_tokens == node.config.max_num_blocks * node.config.tokens_per_block
    await node.backend.load()
    assert node.fake.health_generations == 1   # once only


async def test_load_while_busy_keeps_the_last_sample(pd):
    p, d = pd
    d.config.token_delay_s = 0.3              # fewer iterations than polls: some polls see []
    agen = DisaggregatedParamsStrategy().run(req(20), p.backend, d.backend, HandoffStats())
    await agen.__anext__()
    await agen.__anext__()
    await d.backend.load()
    report = await d.backend.load()           # likely [] now, but a request is in flight: not idle
    assert not report.extra["idle"] and report.free_kv_tokens < report.total_kv_tokens
    await agen.aclose()


async def test_load_metrics_empty_list_and_fallback(make_node):
    node = await make_node("decode", enable_iter_perf_stats=False, options={"kv_tokens": 9000})
    report = await node.backend.load()
    assert report.extra == {"stats": "none"} and report.total_kv_tokens == 9000 == report.free_kv_tokens
    bare = await make_node("prefill", enable_iter_perf_stats=False)
    assert (await bare.backend.load()).total_kv_tokens == 0
    blind = await make_node("decode", enable_iter_perf_stats=False)
    with pytest.raises(BackendError) as err:   # a decode without KV numbers cannot be admitted to
        await blind.backend.load()
    assert "enable_iter_perf_stats" in str(err.value)


async def test_load_tolerates_slow_empty_metrics(make_node):
    node = await make_node(metrics_empty_wait_s=2.0)
    started = time.monotonic()
    await node.backend.load()
    assert time.monotonic() - started < 1.5


async def test_load_unreachable_raises():
    backend = TensorRTLLMBackend("http://127.0.0.1:1", "gone", "decode")
    with pytest.raises(BackendError):
        await backend.load()
    assert not await backend.health()
    await backend.close()


async def test_info_and_health(make_node):
    node = await make_node()
    node.backend.model = None
    assert await node.backend.health()
    info = await node.backend.info()
    assert info["model"] == "toy-model" and info["version"] == "1.3.0rc5"
    assert node.backend.served_model == "toy-model"
    node.config.health_status = 503
    assert not await node.backend.health()


async def test_set_role_flip_and_restart(make_node):
    node = await make_node("decode")
    result = await node.backend.set_role("prefill")
    assert result["role"] == "prefill" and node.backend.role == "prefill" and node.backend.accepting
    fixed = await make_node("decode", options={"allow_flip": False})
    with pytest.raises(RestartRequired):
        await fixed.backend.set_role("prefill")
    assert not fixed.backend.accepting


async def test_fake_is_strict_like_trtllm_serve(make_node):
    import httpx

    node = await make_node()
    async with httpx.AsyncClient(base_url=node.server.url) as client:
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 2,
                                                          "stream_options": {"include_usage": True}})
        assert resp.status_code == 400 and "Stream options can only be defined" in resp.json()["error"]
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "bogus": 1})
        assert resp.status_code == 400 and "bogus" in resp.json()["error"]
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 3})
        body = resp.json()
        assert set(body) == {"id", "object", "created", "model", "choices", "usage", "prompt_token_ids"}
        assert set(body["choices"][0]) == {"index", "text", "token_ids", "logprobs", "context_logits",
                                           "finish_reason", "stop_reason", "disaggregated_params",
                                           "avg_decoded_tokens_per_iter"}
        assert (await client.get("/metrics")).json() and (await client.get("/metrics")).json() == []
