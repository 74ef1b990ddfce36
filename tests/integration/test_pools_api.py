"""GET/PUT /admin/pools with the static provider (the default): counts of registered instances, 409 on
a scale request, 400 on a bad count, 404 on an unknown pool, 401 without the token, 503 before the
provider runs; the registry of providers; the callbacks providers register and drain through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.config import Settings
from orchestrator.launcher import free_port
from orchestrator.pools import make_provider
from orchestrator.pools.base import ReadyInstance
from orchestrator.pools.kubernetes import KubernetesProvider
from orchestrator.pools.static import REFUSAL, StaticProvider
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.integration.test_pools_kubernetes import StubEngine

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def engine() -> Iterator[StubEngine]:
    stub = StubEngine("127.0.0.1", free_port())
    yield stub
    stub.stop()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    from orchestrator.app import create_app

    with TestClient(create_app(make_settings(tmp_path, []))) as test_client:
        yield test_client


def pools(client: TestClient) -> dict[str, dict[str, Any]]:
    body = client.get("/admin/pools", headers=AUTH).json()
    assert body["provider"] == "static"
    return {p["role"]: p for p in body["pools"]}


def test_static_pools_count_registered_instances_and_refuse_to_scale(client: TestClient, engine: StubEngine) -> None:
    assert list(pools(client)) == ["prefill", "decode", "colocated"]
    assert all(p["desired"] == p["ready"] == p["registered"] == 0 and not p["scalable"] for p in pools(client).values())
    r = client.post("/admin/instances", headers=AUTH, json={"url": engine.url, "role": "decode", "id": "d0"})
    assert r.status_code == 201, r.text
    decode = pools(client)["decode"]
    assert (decode["desired"], decode["ready"], decode["registered"], decode["scalable"]) == (1, 1, 1, False)
    r = client.put("/admin/pools/decode", headers=AUTH, json={"replicas": 2})
    assert r.status_code == 409
    assert r.json()["error"] == {"message": REFUSAL, "type": "invalid_request_error", "param": None,
                                 "code": "scale_refused"}  # fmt: skip
    assert "POST /admin/instances" in REFUSAL and "pool_provider=local or kubernetes" in REFUSAL


@pytest.mark.parametrize(
    "body",
    [{"replicas": -1}, {"replicas": 257}, {"replicas": "2"}, {"replicas": 1.5}, {"replicas": True}, {"replicas": None},
     {}, [], "three"],
)  # fmt: skip
def test_bad_replica_counts_are_400(client: TestClient, body: Any) -> None:
    r = client.put("/admin/pools/decode", headers=AUTH, json=body)
    assert r.status_code == 400, (body, r.text)
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.put("/admin/pools/decode", headers={**AUTH, "content-type": "application/json"}, content=b"{replicas")
    assert r.status_code == 400


def test_unknown_pool_is_404_and_the_token_is_required(client: TestClient) -> None:
    r = client.put("/admin/pools/gpu", headers=AUTH, json={"replicas": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "pool_not_found"
    assert client.get("/admin/pools").status_code == 401
    assert client.put("/admin/pools/decode", json={"replicas": 1}).status_code == 401
    assert client.get("/admin/pools", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_no_provider_before_the_lifespan_is_503(tmp_path: Path) -> None:
    from orchestrator.app import create_app

    client = TestClient(create_app(make_settings(tmp_path, [])))  # not entered: no lifespan ran
    r = client.get("/admin/pools", headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"]


def test_provider_callbacks_register_idempotently_and_drain(client: TestClient, engine: StubEngine) -> None:
    state = client.app.state.tetri  # type: ignore[attr-defined]
    ready = ReadyInstance(url=engine.url, role="decode", backend="native", id="pod-a")
    assert client.portal is not None
    client.portal.call(state.pool_ready, ready)
    client.portal.call(state.pool_ready, ready)  # again (a relist): nothing changes
    client.portal.call(state.pool_ready, ReadyInstance(url=engine.url + "/", role="decode", backend="native"))
    instances = client.get("/admin/instances", headers=AUTH).json()["instances"]
    assert [(i["id"], i["url"], i["role"]) for i in instances] == [("pod-a", engine.url, "decode")]
    client.portal.call(state.pool_leaving, "http://127.0.0.1:1")  # not registered: a no-op
    assert not engine.drained
    client.portal.call(state.pool_leaving, engine.url)
    assert engine.drained  # drained before it was let go
    assert client.get("/admin/instances", headers=AUTH).json()["instances"] == []
    client.portal.call(state.pool_leaving, engine.url)  # twice: still fine


def test_unhealthy_instance_is_refused_to_the_provider(client: TestClient) -> None:
    from backends.base import BackendError

    state = client.app.state.tetri  # type: ignore[attr-defined]
    assert client.portal is not None
    with pytest.raises(BackendError):  # the provider retries later
        client.portal.call(state.pool_ready, ReadyInstance(url=f"http://127.0.0.1:{free_port()}", role="decode",
                                                           backend="native"))  # fmt: skip
    assert client.get("/admin/instances", headers=AUTH).json()["instances"] == []


def test_make_provider_by_name() -> None:
    settings = Settings()
    static = make_provider("static", settings, lambda: {"decode": 2})
    assert isinstance(static, StaticProvider) and static.name == "static"
    assert isinstance(make_provider("kubernetes", settings), KubernetesProvider)
    local = make_provider("local", settings)
    assert local.name == "local"
    with pytest.raises(ValueError, match="unknown pool_provider 'ec2'"):
        make_provider("ec2", settings)
