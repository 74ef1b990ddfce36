"""Client keys of the OpenAI API, `tetri serve` off loopback, and secrets in `tetri config show`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from typer.testing import CliRunner

from backends.base import LoadReport
from orchestrator import cli
from orchestrator.auth import api_key_dependencies
from orchestrator.config import InstanceSpec, Settings
from orchestrator.errors import install_error_handlers
from tests.conftest import ADMIN_TOKEN, TINY, make_settings, serve_app

KEYS = ["key-one", "kéy-two"]
UNAUTHORIZED = {"type": "authentication_error", "param": None, "code": "invalid_api_key"}


def _tiny_app(keys: list[str]) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": []}

    @router.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    app.include_router(router, dependencies=api_key_dependencies(keys))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def tiny_url() -> Iterator[str]:
    with serve_app(_tiny_app(KEYS)) as url:
        yield url


def _assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert {k: body["error"][k] for k in UNAUTHORIZED} == UNAUTHORIZED


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer wrong", "Basic key-one", "key-one", "Bearer key-one-and-more",
    "Bearer key-on", "Bearer kéy-two".encode("latin-1"),  # é as one latin-1 byte, not the key's UTF-8
    b"Bearer \xff\xfe\x80", "Bearer \u00e9t\u00e9".encode(),
])
def test_a_request_without_a_valid_key_gets_an_openai_401(tiny_url: str, authorization: str | bytes | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    _assert_401(httpx.get(f"{tiny_url}/v1/models", headers=headers, timeout=10))
    # Before the body is looked at: a bad body without a key is still a 401.
    _assert_401(httpx.post(f"{tiny_url}/v1/completions", headers=headers, content=b"{", timeout=10))


@pytest.mark.parametrize("authorization", ["Bearer key-one", "bearer key-one", "Bearer  key-one",
                                           "Bearer kéy-two".encode()])
def test_any_configured_key_opens_the_api(tiny_url: str, authorization: str | bytes) -> None:
    resp = httpx.get(f"{tiny_url}/v1/models", headers={"Authorization": authorization}, timeout=10)
    assert resp.status_code == 200, resp.text


def test_health_stays_open(tiny_url: str) -> None:
    assert httpx.get(f"{tiny_url}/health", timeout=10).status_code == 200


def test_no_keys_no_check() -> None:
    assert api_key_dependencies([]) == [] and api_key_dependencies([""]) == []
    with serve_app(_tiny_app([])) as url:
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETRI_API_KEYS", " a, b ,,")
    assert Settings().api_keys == ["a", "b"]
    monkeypatch.setenv("TETRI_API_KEYS", '["x,y", "z"]')
    assert Settings().api_keys == ["x,y", "z"]
    monkeypatch.setenv("TETRI_API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.delenv("TETRI_API_KEYS")
    assert Settings().api_keys == []


class _Engine:
    """A co-located engine that answers every request with two tokens."""

    role = "colocated"
    generates_on_decode = True
    instance_id = "colo-0"
    url = "http://colo-0.invalid"

    async def generate(self, request: Any):
        from backends.base import TokenEvent

        yield TokenEvent([101], " a")
        yield TokenEvent([102], " b", finish_reason="length")

    async def load(self) -> LoadReport:
        return LoadReport(role="colocated", free_kv_tokens=4096, total_kv_tokens=4096, model=TINY)

    async def close(self) -> None:
        pass


def test_the_orchestrator_checks_keys_on_v1_only(tmp_path) -> None:
    from orchestrator.app import create_app

    app = create_app(make_settings(tmp_path, [], mode="colocated", api_keys=KEYS))
    state = app.state.tetri
    with serve_app(app) as url:
        inst = state.cluster.add(InstanceSpec(url=_Engine.url, role="colocated", model=TINY, id=_Engine.instance_id))
        inst.backend, inst.state = _Engine(), "healthy"
        inst.load = LoadReport(role="colocated", free_kv_tokens=4096, total_kv_tokens=4096, model=TINY)
        body = {"model": TINY, "prompt": "Hello", "max_tokens": 2}
        for path in ("/v1/completions", "/v1/chat/completions"):
            _assert_401(httpx.post(f"{url}{path}", json=body, timeout=30))
        _assert_401(httpx.get(f"{url}/v1/models", headers={"Authorization": b"Bearer \xe9"}, timeout=10))
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"},
                        timeout=30)
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}".encode()},
                         timeout=10).status_code == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        # The admin API keeps its own token: a client key does not open it.
        admin = f"{url}/admin/instances"
        assert httpx.get(admin, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10).status_code == 401
        assert httpx.get(admin, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).status_code == 200


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("TETRI_CONFIG", "TETRI_ADMIN_TOKEN", "TETRI_API_KEYS", "TETRI_DATABASE_URL", "TETRI_HOST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_show_masks_tokens_keys_and_passwords(clean_env: pytest.MonkeyPatch, tmp_path) -> None:
    clean_env.setenv("TETRI_ADMIN_TOKEN", "admin-s3cret")
    clean_env.setenv("TETRI_API_KEYS", "client-key-1,client-key-2")
    clean_env.setenv("TETRI_DATABASE_URL", "postgresql+psycopg://tetri:db-p@ss:word@db.internal:5432/tetri")
    config = tmp_path / "deploy.yaml"
    config.write_text("instances:\n  - url: http://user:inst-pass@10.0.0.5:30000\n    backend: sglang\n"
                      "    options: {api_key: sglang-key, bootstrap_port: 8998}\n")
    result = CliRunner().invoke(cli.app, ["config", "show", "--config", str(config)])
    assert result.exit_code == 0, result.output
    for secret in ("admin-s3cret", "client-key", "db-p@ss", "word@", "inst-pass", "sglang-key"):
        assert secret not in result.output
    shown = json.loads(result.output)
    assert shown["admin_token"] == "***" and shown["api_keys"] == ["***", "***"]
    assert shown["database_url"] == "postgresql+psycopg://tetri:***@db.internal:5432/tetri"
    instance = shown["instances"][0]
    assert instance["url"] == "http://user:***@10.0.0.5:30000"
    assert instance["options"] == {"api_key": "***", "bootstrap_port": 8998}
    # What is not secret is shown as it is.
    assert shown["default_max_tokens"] == 256 and shown["host"] == "127.0.0.1"


def test_config_show_leaves_unset_secrets_and_plain_urls_alone(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TETRI_DATABASE_URL", "sqlite:////tmp/tetri.db")
    shown = json.loads(CliRunner().invoke(cli.app, ["config", "show"]).output)
    assert shown["admin_token"] is None and shown["api_keys"] == []
    assert shown["database_url"] == "sqlite:////tmp/tetri.db"


@pytest.fixture
def fake_server(clean_env: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`tetri serve` up to uvicorn.run, which records its arguments instead of serving."""
    import uvicorn

    import orchestrator.app

    runs: list[dict[str, Any]] = []
    clean_env.setattr(orchestrator.app, "create_app", lambda settings: settings)
    clean_env.setattr(uvicorn, "run", lambda app, **kw: runs.append({"settings": app, **kw}))
    return runs


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "tetri.example.com"])
def test_serve_off_loopback_needs_an_admin_token(fake_server: list[dict[str, Any]], host: str) -> None:
    result = CliRunner().invoke(cli.app, ["serve", "--host", host])
    assert result.exit_code == 2 and fake_server == []
    assert "TETRI_ADMIN_TOKEN" in result.output and host in result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_serve_on_loopback_starts_without_a_token(fake_server: list[dict[str, Any]], host: str) -> None:
    result = CliRunner().invoke(cli.app, ["serve", "--host", host])
    assert result.exit_code == 0, result.output
    assert [run["host"] for run in fake_server] == [host]


def test_serve_off_loopback_starts_with_an_admin_token(fake_server: list[dict[str, Any]],
                                                      clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TETRI_ADMIN_TOKEN", "t0ken")
    result = CliRunner().invoke(cli.app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert fake_server[0]["host"] == "0.0.0.0" and fake_server[0]["settings"].admin_token == "t0ken"
