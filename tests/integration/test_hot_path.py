"""orchestrator/hot_path.py: well-formed completion requests skip FastAPI's machinery and get the same
answers; everything else gets the FastAPI routes' answers, byte for byte the same as with it off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends.base import LoadReport
from orchestrator.config import InstanceSpec
from orchestrator.hot_path import HotPath
from tests.conftest import TINY, make_settings, serve_app
from tests.integration.test_openai_input import Scripted, tokens

KEY = {"Authorization": "Bearer k1"}


def _hot(app: Any) -> HotPath | None:
    layer = app.middleware_stack
    while layer is not None:
        if isinstance(layer, HotPath):
            return layer
        layer = getattr(layer, "app", None)
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, tuple[str, Any]]]:
    from orchestrator.app import create_app

    out: dict[bool, tuple[str, Any]] = {}
    contexts = []
    try:
        for hot in (True, False):
            settings = make_settings(tmp_path_factory.mktemp(f"hot-{hot}"), [], mode="colocated", hot_path=hot,
                                     api_keys=["k1", "k2"], max_request_body_bytes=64 * 1024)
            app = create_app(settings)
            ctx = serve_app(app)
            url = ctx.__enter__()
            contexts.append(ctx)
            engine = Scripted("colo-0")
            engine.script = lambda e, r: tokens(3)
            spec = InstanceSpec(url=engine.url, backend="native", role="colocated", model=TINY, id="colo-0")
            inst = app.state.tetri.cluster.add(spec)
            inst.backend = engine
            inst.state = "healthy"
            inst.load = LoadReport(role="colocated", free_kv_tokens=4096, total_kv_tokens=4096, model=TINY)
            out[hot] = (url, app)
        yield out
    finally:
        for ctx in contexts:
            ctx.__exit__(None, None, None)


def _post(url: str, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30)


def _comparable(resp: httpx.Response) -> tuple[int, Any]:
    """Status and body, without what differs per request (ids, times)."""
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in resp.text.split("\n\n") if x]
        for line in lines:
            if isinstance(line, dict):
                line.pop("id", None), line.pop("created", None)
        return resp.status_code, lines
    body = resp.json()
    if isinstance(body, dict):
        body.pop("id", None), body.pop("created", None)
    return resp.status_code, body


GOOD = [
    ("/v1/completions", {"model": TINY, "prompt": "Hello there", "max_tokens": 8, "temperature": 0}),
    ("/v1/completions", {"model": TINY, "prompt": [1, 2, 3], "max_tokens": 8, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
    ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), GOOD)
def test_well_formed_requests_take_the_hot_path_and_get_the_same_answer(servers, path, body):
    hot_url, hot_app = servers[True]
    cold_url, cold_app = servers[False]
    content = json.dumps(body).encode()
    headers = {**KEY, "Content-Type": "application/json"}
    before = _hot(hot_app).served if _hot(hot_app) else 0
    hot, cold = _post(hot_url, path, content, headers), _post(cold_url, path, content, headers)
    assert hot.status_code == 200, hot.text
    assert _comparable(hot) == _comparable(cold)
    assert hot.headers["content-type"] == cold.headers["content-type"]
    assert _hot(hot_app) is not None and _hot(hot_app).served == before + 1
    assert _hot(cold_app) is None


BAD = [
    ("not json", b"{not json", {"Content-Type": "application/json", **KEY}),
    ("a list", b"[1, 2]", {"Content-Type": "application/json", **KEY}),
    ("no model", json.dumps({"prompt": "x"}).encode(), {"Content-Type": "application/json", **KEY}),
    ("wrong type", json.dumps({"model": TINY, "prompt": "x", "max_tokens": "many"}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("unsupported", json.dumps({"model": TINY, "prompt": "x", "logprobs": 3}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("unknown model", json.dumps({"model": "nope", "prompt": "x"}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("too long", json.dumps({"model": TINY, "prompt": "x", "max_tokens": 10_000_000}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("token ids out of range", json.dumps({"model": TINY, "prompt": [-1]}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("no key", json.dumps({"model": TINY, "prompt": "x"}).encode(), {"Content-Type": "application/json"}),
    ("wrong key", json.dumps({"model": TINY, "prompt": "x"}).encode(),
     {"Content-Type": "application/json", "Authorization": "Bearer k3"}),
    ("second key", json.dumps({"model": TINY, "prompt": "x", "max_tokens": 2}).encode(),
     {"Content-Type": "application/json", "Authorization": "Bearer k2"}),
    ("text/plain", json.dumps({"model": TINY, "prompt": "x", "max_tokens": 2}).encode(),
     {"Content-Type": "text/plain", **KEY}),
    ("too large", json.dumps({"model": TINY, "prompt": "x" * 100_000}).encode(),
     {"Content-Type": "application/json", **KEY}),
    ("empty", b"", {"Content-Type": "application/json", **KEY}),
]


@pytest.mark.parametrize(("case", "content", "headers"), BAD, ids=[c for c, _, _ in BAD])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_other_request_gets_exactly_the_routes_answer(servers, case, content, headers, path):
    hot_url, _ = servers[True]
    cold_url, _ = servers[False]
    hot, cold = _post(hot_url, path, content, headers), _post(cold_url, path, content, headers)
    assert _comparable(hot) == _comparable(cold), case
    assert hot.headers.get("retry-after") == cold.headers.get("retry-after")


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_is_the_same_json_500_on_either_path(servers, stream):
    async def broken(_engine: Scripted, _request: Any) -> Any:
        raise RuntimeError("a bug")
        yield  # an async generator that fails at its first step

    body = json.dumps({"model": TINY, "prompt": "Hello", "max_tokens": 4, "stream": stream}).encode()
    headers = {**KEY, "Content-Type": "application/json"}
    answers = []
    for hot in (True, False):
        url, app = servers[hot]
        engine = app.state.tetri.cluster.instances["colo-0"].backend
        engine.script = broken
        try:
            answers.append(_post(url, "/v1/completions", body, headers))
        finally:
            engine.script = lambda e, r: tokens(3)
    hot_resp, cold_resp = answers
    assert hot_resp.status_code == 500, hot_resp.text
    assert hot_resp.json()["error"]["code"] == "internal_error"
    assert _comparable(hot_resp) == _comparable(cold_resp)


BODIES = [b'{"a": NaN}', b'{"a": 123456789012345678901234567890}', b'{"a": -9223372036854775808}',
          b'{"a": 18446744073709551615}', b'{"a": "\\ud800"}', b'{"a":1,"a":2}', b'{"a": 1e400}',
          b'{"a": 1.5, "b": [1, 2, {"c": null}], "d": "\xc3\xa9"}', b'[1, 2]', b'{"a": 0.1234567890123456789}',
          b'\xef\xbb\xbf{"a": 1}', b'{"a": "\\u00e9\\n"}', b'{"a": "\xff"}',
          b'{"prompt": [1, 2, 3], "max_tokens": 1e3}']


@pytest.mark.parametrize("raw", BODIES)
def test_the_hot_path_reads_a_body_as_json_loads_does(raw):
    from orchestrator.hot_path import _loads

    def outcome(load: Any) -> Any:
        try:
            return repr(load(raw))
        except ValueError as exc:
            return type(exc).__name__
    assert outcome(_loads) == outcome(json.loads)


def test_requests_leave_no_garbage_cycles(servers):
    """A request's objects are freed by reference counting: a cycle per request (a cancelled task,
    its exception and traceback) made the collector run every few requests under load."""
    import gc
    import http.client
    from urllib.parse import urlsplit

    url, _ = servers[True]
    parts = urlsplit(url)
    headers = {**KEY, "Content-Type": "application/json"}
    bodies = [json.dumps({"model": TINY, "prompt": "Hello", "max_tokens": 3, "stream": stream}).encode()
              for stream in (False, True)]
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)  # one keep-alive connection

    def post(body: bytes) -> None:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()

    try:
        for body in bodies:
            post(body)
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                for body in bodies:
                    post(body)
            found = gc.collect()
        finally:
            gc.enable()
    finally:
        conn.close()
    assert found < 40, f"{found} objects in cycles after 40 requests"
