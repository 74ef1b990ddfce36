"""The OpenAI API's edges: failures after the first token, clients that leave, input the engine
cannot take, unsupported fields, ids. One orchestrator over in-process scripted engines (no model)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from backends.base import BackendError, LoadReport, SamplingParams, TokenEvent
from orchestrator.config import InstanceSpec
from tests.conftest import TINY, make_settings, serve_app


class Scripted:
    """A co-located engine whose generate() runs `script(self, request)`; load polls fail while `dead`."""

    role = "colocated"
    generates_on_decode = True

    def __init__(self, iid: str) -> None:
        self.instance_id = iid
        self.url = f"http://{iid}.invalid"
        self.script: Callable[[Scripted, Any], AsyncIterator[TokenEvent]] | None = None
        self.dead = False
        self.calls = 0
        self.closed = 0  # generate() streams that ended early (closed or cancelled): the engine's abort

    async def generate(self, request: Any) -> AsyncIterator[TokenEvent]:
        self.calls += 1
        finished = False
        try:
            assert self.script is not None
            async for event in self.script(self, request):
                yield event
            finished = True
        finally:
            if not finished:
                self.closed += 1

    async def load(self) -> LoadReport:
        if self.dead:
            raise BackendError("connection refused", retryable=True)
        return LoadReport(role="colocated", free_kv_tokens=4096, total_kv_tokens=4096, model=TINY)

    async def close(self) -> None:
        pass


async def tokens(n: int, finish: str = "length") -> AsyncIterator[TokenEvent]:
    for i in range(n):
        yield TokenEvent([100 + i], f" t{i}", finish_reason=finish if i == n - 1 else None)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, list[Scripted]]]:
    from orchestrator.app import create_app

    settings = make_settings(tmp_path_factory.mktemp("openai-input"), [], mode="colocated")
    app = create_app(settings)
    state = app.state.tetri
    engines = [Scripted("colo-0")]
    with serve_app(app) as url:
        for engine in engines:
            spec = InstanceSpec(url=engine.url, backend="native", role="colocated", model=TINY, id=engine.instance_id)
            inst = state.cluster.add(spec)
            inst.backend = engine
            inst.state = "healthy"
            inst.load = LoadReport(role="colocated", free_kv_tokens=4096, total_kv_tokens=4096, model=TINY)
        yield url, state, engines


@pytest.fixture
def engine(api) -> Iterator[Scripted]:
    url, state, engines = api
    engine = engines[0]
    engine.script, engine.dead, engine.calls, engine.closed = (lambda e, r: tokens(3)), False, 0, 0
    state.cluster.get(engine.instance_id).state = "healthy"
    yield engine
    engine.dead = False
    state.cluster.get(engine.instance_id).state = "healthy"


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": TINY, "prompt": "Hello there", "max_tokens": 8, "temperature": 0, **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0, **kw}


def stream_lines(url: str, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a streamed response (a broken chunked body raises)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


# ---- item 2: nowhere left to migrate -------------------------------------------------------------
def dies_after_two(state: Any) -> Callable[[Scripted, Any], AsyncIterator[TokenEvent]]:
    """Two tokens, then the instance dies (its stream breaks, load polls fail): the request would
    migrate, but no other instance is left, so placement answers Overloaded mid-way."""

    async def script(engine: Scripted, request: Any) -> AsyncIterator[TokenEvent]:
        if engine.dead:
            raise BackendError("connection refused", retryable=True)
        async for event in tokens(2, finish=None):  # type: ignore[arg-type]
            yield event
        engine.dead = True
        state.cluster.get(engine.instance_id).state = "unhealthy"
        yield TokenEvent([], "", "error", "generate", "colo-0: stream broke", retryable=True)

    return script


@pytest.mark.parametrize("path,body", [("/v1/completions", completion), ("/v1/chat/completions", chat)])
def test_stream_that_cannot_migrate_ends_with_an_error_event_and_done(api, engine, path, body):
    url, state, _ = api
    engine.script = dies_after_two(state)
    lines = stream_lines(url, path, body(stream=True))
    assert lines[-1] == "[DONE]"
    errors = [json.loads(x)["error"] for x in lines[:-1] if "error" in json.loads(x)]
    assert len(errors) == 1 and errors[0]["type"] == "server_error", lines
    assert "no instance could continue" in errors[0]["message"]
    assert errors[0]["code"] == "overloaded" and set(errors[0]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path,body", [("/v1/completions", completion), ("/v1/chat/completions", chat)])
def test_non_streamed_request_that_cannot_migrate_gets_503_with_retry_after(api, engine, path, body):
    url, state, _ = api
    engine.script = dies_after_two(state)
    resp = httpx.post(f"{url}{path}", json=body(), timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/json" and int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["type"] == "server_error" and "after 2 tokens" in err["message"]


def test_engine_error_event_after_tokens_is_503_when_not_streamed(api, engine):
    """Out of attempts (the same instance fails each time): the last failure arrives as an error
    event, not an exception. Streamed, the client sees it in the stream; not streamed, a 503."""
    url, _, _ = api

    async def broken(e: Scripted, request: Any) -> AsyncIterator[TokenEvent]:
        yield TokenEvent([5], " a")
        yield TokenEvent([], "", "error", "generate", "engine exploded", retryable=False)

    engine.script = broken
    resp = httpx.post(f"{url}/v1/completions", json=completion(), timeout=30)
    assert resp.status_code == 503 and "engine exploded" in resp.json()["error"]["message"], resp.text
    lines = stream_lines(url, "/v1/completions", completion(stream=True))
    assert lines[-1] == "[DONE]" and any("engine exploded" in x for x in lines)


def test_any_exception_after_the_first_chunk_ends_the_stream_properly(api, engine):
    url, _, _ = api

    async def bug(e: Scripted, request: Any) -> AsyncIterator[TokenEvent]:
        yield TokenEvent([5], " a")
        raise RuntimeError("a bug")

    engine.script = bug
    lines = stream_lines(url, "/v1/completions", completion(stream=True))
    assert lines[-1] == "[DONE]"
    err = json.loads(lines[-2])["error"]
    assert err["code"] == "internal_error" and "a bug" not in err["message"]  # no internals leak
    resp = httpx.post(f"{url}/v1/completions", json=completion(), timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error", resp.text


def test_stream_chunks_are_the_documented_json(api, engine):
    url, _, _ = api
    lines = stream_lines(url, "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True}))
    events = [json.loads(x) for x in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": " t0"}
    assert [e["choices"][0]["delta"] for e in events[1:3]] == [{"content": " t1"}, {"content": " t2"}]
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, "length"]
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in events[:3])
    assert events[3]["choices"] == [] and events[3]["usage"]["completion_tokens"] == 3
    lines = stream_lines(url, "/v1/completions", completion(stream=True))
    events = [json.loads(x) for x in lines[:-1]]
    assert [e["choices"][0]["text"] for e in events] == [" t0", " t1", " t2"] and "usage" not in events[0]
    assert events[0]["choices"][0] == {"index": 0, "text": " t0", "finish_reason": None, "logprobs": None}


# ---- item 5: a client that leaves ------------------------------------------------------------------
def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tokens_first", [1, 0])
def test_client_that_leaves_aborts_the_request_upstream(api, engine, stream, tokens_first):
    """The client gives up (a read timeout closes its connection) while its request runs, after
    `tokens_first` tokens: the engine's stream is closed (its abort) at once, not at the end."""
    url, state, _ = api

    async def slow(e: Scripted, request: Any) -> AsyncIterator[TokenEvent]:
        for i in range(tokens_first):
            yield TokenEvent([i], f" t{i}")
        await asyncio.sleep(60)
        yield TokenEvent([9], " late", finish_reason="length")

    engine.script = slow
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{url}/v1/completions", json=completion(stream=stream), timeout=1.0) as resp:
            for _ in resp.iter_lines():
                pass
    wait_until(lambda: engine.closed == 1)
    wait_until(lambda: state.server.active == 0)


# ---- item 8: text that is not valid Unicode ----------------------------------------------------------
def post_raw(url: str, path: str, body: str) -> httpx.Response:
    """`body` as it is: JSON escapes such as \\ud800 reach the server unchanged (httpx's json= cannot
    encode a lone surrogate)."""
    return httpx.post(f"{url}{path}", content=body.encode(), headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", f'{{"model": "{TINY}", "prompt": "a\\ud800b"}}', "prompt"),
    ("/v1/completions", f'{{"model": "{TINY}", "prompt": "hi", "stop": ["\\udfff"]}}', "stop"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
    ("/v1/chat/completions", f'{{"model": "{TINY}", "messages": [{{"role": "user", "content": "\\ud800"}}]}}',
     "messages.0.content"),
    ("/v1/chat/completions",
     f'{{"model": "{TINY}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "\\udbff"}}]}}]}}',
     "messages.0.content"),
])
def test_lone_surrogate_is_a_400(api, engine, path, body, param):
    url, _, _ = api
    resp = post_raw(url, path, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and "not valid Unicode" in err["message"]
    assert engine.calls == 0


def test_valid_non_ascii_text_still_works(api, engine):
    url, _, _ = api
    resp = post_raw(url, "/v1/completions", f'{{"model": "{TINY}", "prompt": "caf\\u00e9 \\ud83d\\ude00"}}')
    assert resp.status_code == 200, resp.text


# ---- item 12: unsupported fields are refused, not ignored; booleans are booleans ---------------------
@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "n", 2),
    ("/v1/completions", "logprobs", 0),  # 0 asks for the chosen tokens' logprobs
    ("/v1/completions", "logprobs", 3),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "n", 3),
])
def test_unsupported_field_is_a_400_naming_it(api, engine, path, field, value):
    url, _, _ = api
    body = (chat if "chat" in path else completion)(**{field: value})
    resp = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_parameter" and field in err["message"]
    assert engine.calls == 0


@pytest.mark.parametrize("path,noops", [
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
                              "response_format": {"type": "text"}, "n": 1}),
    ("/v1/chat/completions", {"logprobs": None, "top_logprobs": None, "tools": None, "tool_choice": None,
                              "response_format": None, "n": None}),
    ("/v1/completions", {"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "n": 1}),
    ("/v1/completions", {"logprobs": False, "echo": None, "best_of": None, "suffix": ""}),
])
def test_unsupported_fields_with_their_no_op_values_are_accepted(api, engine, path, noops):
    url, _, _ = api
    body = (chat if "chat" in path else completion)(**noops)
    resp = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("field,value", [
    ("stream", "yes"), ("stream", 1), ("ignore_eos", "true"), ("ignore_eos", 0),
    ("stream_options", {"include_usage": "yes"}), ("echo", "false"),
])
def test_booleans_must_be_booleans(api, engine, field, value):
    url, _, _ = api
    resp = httpx.post(f"{url}/v1/completions", json=completion(**{field: value}), timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(field)
    assert engine.calls == 0


@pytest.mark.parametrize("seed,status", [(2**64, 400), (-(2**70), 400), (2**63 - 1, 200), (-(2**63), 200)])
def test_seed_is_a_64_bit_integer(api, engine, seed, status):
    """Schemathesis found seed=2**64 a 500 (the SGLang adapter cannot encode it): bounded at the API."""
    url, _, _ = api
    resp = httpx.post(f"{url}/v1/completions", json=completion(seed=seed), timeout=30)
    assert resp.status_code == status, resp.text
    if status == 400:
        assert resp.json()["error"]["param"] == "seed"


# ---- item 13: ids -------------------------------------------------------------------------------------
def test_chat_completion_ids_start_with_chatcmpl(api, engine):
    url, state, _ = api
    resp = httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=30)
    assert resp.status_code == 200 and resp.json()["id"].startswith("chatcmpl-"), resp.text
    assert state.request_record(resp.json()["id"]) is not None  # the record is found by the id the client saw
    lines = stream_lines(url, "/v1/chat/completions", chat(stream=True))
    assert {json.loads(x)["id"][:9] for x in lines[:-1]} == {"chatcmpl-"}
    resp = httpx.post(f"{url}/v1/completions", json=completion(), timeout=30)
    assert resp.json()["id"].startswith("cmpl-"), resp.text


# ---- item 9: a tiny top_p keeps the most likely token ----------------------------------------------
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45])
def test_tiny_top_p_samples_the_most_likely_token(top_p: float):
    from backends.engines.native.sampling import sample

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=s) for s in (None, 1, 2)]
    assert sample(logits, params, [0, 1, 2]) == logits.argmax(dim=-1).tolist()
