"""The kubernetes pool provider against a fake API server that answers the real API's shapes
(tests/fakes/k8s_api.py): scale through the scale subresource, pods found with a watch and
registered once Ready, drained once terminating or gone, the watch resumed from its
resourceVersion (and listed again when that expired), RBAC as deploy/k8s grants it; and one run
through the admin API of a real orchestrator whose pods are in-process tetri-protocol engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from backends.base import LoadReport
from orchestrator.config import Settings
from orchestrator.pools.base import ReadyInstance, ScaleRefused
from orchestrator.pools.kubernetes import KubernetesProvider
from tests.conftest import ADMIN_TOKEN, make_settings, serve_app
from tests.fakes.k8s_api import FakeKubernetes, parse_selector
from tests.fakes.server import ServerThread

NS = "tetri"
LABELS = {"app.kubernetes.io/part-of": "tetri"}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RBAC = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "rbac.yaml"


def ips(first: int) -> Iterator[str]:
    n = first
    while True:
        yield f"127.0.0.{n}"
        n += 1


class Recorder:
    """The orchestrator's side of the provider: what was registered and drained, in order."""

    def __init__(self, fail_first: int = 0) -> None:
        self.ready: list[ReadyInstance] = []
        self.leaving: list[str] = []
        self.fail_first = fail_first

    async def on_ready(self, inst: ReadyInstance) -> None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("instance at that URL did not become healthy")
        self.ready.append(inst)

    async def on_leaving(self, url: str) -> None:
        self.leaving.append(url)


async def until(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    api = FakeKubernetes(NS).start()
    api.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, 9000, ips(20))
    api.add_workload("statefulsets", "tetri-prefill", {**LABELS, "tetri/role": "prefill"}, 9000, ips(40))
    yield api
    api.stop()


def settings_for(api: FakeKubernetes, **overrides: Any) -> Settings:
    pools = {"decode": {"workload": "deployment/tetri-decode", "backend": "native", "model": "m"},
             "prefill": {"workload": "statefulset/tetri-prefill", "backend": "sglang", "model": "m", "port": "http",
                         "options": {"bootstrap_port": 8998}}}  # fmt: skip
    return Settings(pool_provider="kubernetes", k8s_api_url=api.url, k8s_namespace=NS, k8s_pools=pools, **overrides)


@contextlib.asynccontextmanager
async def provider_for(api: FakeKubernetes, rec: Recorder, **overrides: Any):
    provider = KubernetesProvider(settings_for(api, **overrides))
    await provider.start(rec.on_ready, rec.on_leaving)
    try:
        await until(lambda: provider.resource_version is not None)
        yield provider
    finally:
        await provider.stop()


async def test_scale_up_registers_pods_once_ready(fake: FakeKubernetes) -> None:
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        status = await provider.scale("decode", 2)
        assert (status.desired, status.scalable, status.detail) == (2, True, "deployment/tetri-decode")
        assert fake.replicas("deployments", "tetri-decode") == 2
        pods = fake.pod_names("tetri-decode")
        assert len(pods) == 2
        await asyncio.sleep(0.2)
        assert rec.ready == []  # Pending pods, no IP: nothing to register yet
        for pod in pods:
            fake.make_ready(pod)
        await until(lambda: len(rec.ready) == 2)
        got = {r.id: r for r in rec.ready}
        assert set(got) == set(pods)
        assert {r.url for r in rec.ready} == {"http://127.0.0.20:9000", "http://127.0.0.21:9000"}
        assert {(r.role, r.backend, r.model) for r in rec.ready} == {("decode", "native", "m")}
        pools = {p.role: p for p in await provider.pools()}
        assert (pools["decode"].desired, pools["decode"].ready) == (2, 2)
        assert (pools["colocated"].scalable, pools["colocated"].desired) == (False, 0)
        # The statefulset's pods: named port, options passed through, ordinal names.
        await provider.scale("prefill", 1)
        fake.make_ready("tetri-prefill-0")
        await until(lambda: len(rec.ready) == 3)
        assert rec.ready[-1] == ReadyInstance("http://127.0.0.40:9000", "prefill", "sglang", "m", "tetri-prefill-0",
                                              {"bootstrap_port": 8998})  # fmt: skip
    # The scale went through get + merge-patch of the scale subresource, the pods through one list
    # and a watch (never a poll of each pod).
    methods = {(m, p) for m, p, _ in fake.requests}
    assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/tetri-decode/scale") in methods
    assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/statefulsets/tetri-prefill/scale") in methods
    assert not any("/pods/" in p for _, p, _ in fake.requests)


async def test_terminating_pods_are_drained_then_forgotten(fake: FakeKubernetes) -> None:
    fake.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, 9000, ips(20), replicas=3)
    for pod in fake.pod_names("tetri-decode"):
        fake.make_ready(pod)
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        await until(lambda: len(rec.ready) == 3)  # found by the first list
        await provider.scale("decode", 1)
        await until(lambda: len(rec.leaving) == 2)  # deletionTimestamp set: drained before SIGTERM
        left = set(rec.leaving)
        assert len(left) == 2 and left < {r.url for r in rec.ready}
        for pod in fake.pod_names("tetri-decode"):
            if fake.pods[pod]["metadata"].get("deletionTimestamp"):
                fake.delete(pod)
        await asyncio.sleep(0.2)
        assert len(rec.leaving) == 2  # DELETED of a pod already let go: nothing more
        assert [p.ready for p in await provider.pools() if p.role == "decode"] == [1]
        # A pod deleted outright (evicted, node lost) is let go as well.
        (last,) = fake.pod_names("tetri-decode")
        fake.delete(last)
        await until(lambda: len(rec.leaving) == 3)


async def test_watch_resumes_from_its_resource_version(fake: FakeKubernetes) -> None:
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        await provider.scale("decode", 1)
        (pod,) = fake.pod_names("tetri-decode")
        fake.make_ready(pod)
        await until(lambda: len(rec.ready) == 1)
        seen = provider.resource_version
        assert seen == fake.pods[pod]["metadata"]["resourceVersion"]
        fake.drop_watches()  # the API server ends the stream (its timeout, a restart)
        await until(lambda: len(fake.watch_requests()) >= 2)
        assert fake.watch_requests()[-1]["resourceVersion"] == seen  # resumed, not started over
        await provider.scale("decode", 2)
        (new,) = [p for p in fake.pod_names("tetri-decode") if p != pod]
        fake.make_ready(new)
        await until(lambda: len(rec.ready) == 2)
        assert provider.relists == 1
        watches = fake.watch_requests()
        assert all(w["labelSelector"] == "app.kubernetes.io/part-of=tetri,tetri/role" for w in watches)


async def test_expired_watch_lists_again_and_applies_what_it_missed(fake: FakeKubernetes) -> None:
    fake.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, 9000, ips(20), replicas=2)
    first, second = fake.pod_names("tetri-decode")
    for pod in (first, second):
        fake.make_ready(pod)
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        await until(lambda: len(rec.ready) == 2)
        first_url = f"http://{fake.pods[first]['status']['podIP']}:9000"
        with fake.partitioned():  # events the watch never sees, then history compacted away
            fake.delete(first)
            fake.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, 9000, ips(30),
                              replicas=2)  # fmt: skip
            (third,) = [p for p in fake.pod_names("tetri-decode") if p != second]
            fake.make_ready(third)
        await until(lambda: provider.relists == 2)
        await until(lambda: len(rec.ready) == 3)
        assert rec.leaving == [first_url]  # the pod deleted unseen is let go
        assert rec.ready[-1].url == "http://127.0.0.30:9000" and rec.ready[-1].id == third


async def test_registration_is_retried_while_the_pod_is_ready(fake: FakeKubernetes) -> None:
    rec = Recorder(fail_first=2)
    async with provider_for(fake, rec) as provider:
        await provider.scale("decode", 1)
        fake.make_ready(fake.pod_names("tetri-decode")[0])
        await until(lambda: len(rec.ready) == 1, timeout_s=15)


async def test_pods_outside_the_configured_pools_are_ignored(fake: FakeKubernetes) -> None:
    fake.add_workload("deployments", "other", {**LABELS, "tetri/role": "colocated"}, 9000, ips(60), replicas=1)
    fake.add_workload("deployments", "unrelated", {"app": "db"}, 5432, ips(70), replicas=1)
    for pod in fake.pod_names():
        fake.make_ready(pod)
    rec = Recorder()
    async with provider_for(fake, rec):
        await asyncio.sleep(0.3)
        assert rec.ready == []
    assert all("labelSelector" in q for m, p, q in fake.requests if p.endswith("/pods"))


async def test_scale_refusals(fake: FakeKubernetes) -> None:
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        with pytest.raises(ScaleRefused, match="no Kubernetes workload for the colocated pool"):
            await provider.scale("colocated", 1)
    pools = {"decode": {"workload": "deployment/missing"}}
    provider = KubernetesProvider(Settings(k8s_api_url=fake.url, k8s_namespace=NS, k8s_pools=pools))
    await provider.start(rec.on_ready, rec.on_leaving)
    try:
        with pytest.raises(ScaleRefused, match='deployments.apps "missing" not found'):
            await provider.scale("decode", 1)
        status = {p.role: p for p in await provider.pools()}["decode"]
        assert not status.scalable and "not found" in status.detail
    finally:
        await provider.stop()


async def test_the_rbac_of_deploy_k8s_is_enough_and_no_more(fake: FakeKubernetes) -> None:
    """The provider's calls all pass the Role deploy/k8s grants; a workload it does not name is 403."""
    role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == "Role")
    fake.rules = role["rules"]
    fake.add_workload("deployments", "not-ours", {"app": "x"}, 80, ips(80))
    rec = Recorder()
    async with provider_for(fake, rec) as provider:
        await provider.scale("decode", 1)
        fake.make_ready(fake.pod_names("tetri-decode")[0])
        await until(lambda: len(rec.ready) == 1)
        assert [p.desired for p in await provider.pools() if p.role == "decode"] == [1]
    pools = {"decode": {"workload": "deployment/not-ours"}}
    provider = KubernetesProvider(Settings(k8s_api_url=fake.url, k8s_namespace=NS, k8s_pools=pools))
    await provider.start(rec.on_ready, rec.on_leaving)
    try:
        with pytest.raises(ScaleRefused, match="forbidden"):
            await provider.scale("decode", 1)
    finally:
        await provider.stop()
    assert fake.replicas("deployments", "not-ours") == 0


def test_label_selectors_of_the_fake() -> None:
    labels = {"a": "1", "b": "2"}
    for selector, expected in [("a=1", True), ("a==1,b", True), ("a!=1", False), ("!c", True), ("c", False),
                               ("a in (1,3),b notin (3)", True), ("b in (3, 4)", False)]:  # fmt: skip
        assert all(p(labels) for p in parse_selector(selector)) is expected, selector


# ---- end to end: the admin API of a real orchestrator, pods that are tetri-protocol engines ------------
class StubEngine:
    """A tetri worker's protocol on a pod's IP: /load (its running count), /info, /drain, and a
    /generate that streams `tokens` tokens `delay_s` apart: what registration health-checks, what
    a drain calls and waits for, and what serves requests meanwhile."""

    def __init__(self, host: str, port: int, role: str = "decode", tokens: int = 20, delay_s: float = 0.05) -> None:
        self.role, self.drained = role, False
        self.running = self.served = self.running_at_drain = self.started_after_drain = 0
        app = FastAPI()

        @app.get("/load")
        async def load() -> dict[str, Any]:
            report = LoadReport(role=self.role, running=self.running, free_kv_tokens=4096, total_kv_tokens=4096)  # type: ignore[arg-type]
            return report.to_dict()

        @app.get("/info")
        async def info() -> dict[str, Any]:
            return {"max_context": 2048}

        @app.post("/drain")
        async def drain() -> dict[str, Any]:
            self.drained, self.running_at_drain = True, self.running
            return {"accepting": False}

        @app.post("/generate")
        async def generate(request: Request) -> StreamingResponse:
            await request.json()
            self.running += 1
            self.started_after_drain += self.drained

            async def lines() -> AsyncIterator[str]:
                try:
                    for i in range(tokens):
                        await asyncio.sleep(delay_s)
                        yield json.dumps({"token_ids": [100 + i], "text": "a"}) + "\n"
                    yield json.dumps({"token_ids": [7], "text": "b", "finish_reason": "stop"}) + "\n"
                    self.served += 1
                finally:
                    self.running -= 1

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        self.url = f"http://{host}:{port}"
        self.server = _bind(app, host, port)

    def stop(self) -> None:
        self.server.stop()


def _bind(app: FastAPI, host: str, port: int) -> ServerThread:
    server = ServerThread(app, host=host)
    server.sock.close()
    server.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.sock.bind((host, port))
    server.host, server.port = host, port
    return server.start()


def test_admin_api_scales_a_kubernetes_pool_end_to_end(fake: FakeKubernetes, tmp_path: Path) -> None:
    from orchestrator.app import create_app

    probe = socket.socket()
    probe.bind(("127.0.0.50", 0))
    port = probe.getsockname()[1]
    probe.close()
    engines = {e.url: e for e in (StubEngine(f"127.0.0.{50 + i}", port) for i in range(2))}
    fake.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, port, ips(50))
    pools = {"decode": {"workload": "deployment/tetri-decode", "backend": "native"}}
    settings = make_settings(tmp_path, [], pool_provider="kubernetes", k8s_api_url=fake.url, k8s_namespace=NS,
                             k8s_pools=pools, monitor_interval_ms=50)  # fmt: skip
    try:
        with serve_app(create_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:

            def instances() -> dict[str, dict[str, Any]]:
                return {i["url"]: i for i in client.get("/admin/instances").json()["instances"]}

            def wait(check: Callable[[], Any]) -> Any:
                deadline = time.monotonic() + 15
                while not (value := check()):
                    assert time.monotonic() < deadline, "condition not met in time"
                    time.sleep(0.05)
                return value

            r = client.put("/admin/pools/decode", json={"replicas": 2})
            assert r.status_code == 200, r.text
            assert r.json() == {"provider": "kubernetes", "role": "decode", "desired": 2, "ready": 0,
                                "registered": 0, "scalable": True, "detail": "deployment/tetri-decode"}  # fmt: skip
            pods = fake.pod_names("tetri-decode")
            for pod in pods:
                fake.make_ready(pod)
            wait(lambda: len(instances()) == 2)
            assert set(instances()) == set(engines)
            assert {i["id"] for i in instances().values()} == set(pods)
            assert {i["role"] for i in instances().values()} == {"decode"}
            body = client.get("/admin/pools").json()
            assert body["provider"] == "kubernetes"
            decode = next(p for p in body["pools"] if p["role"] == "decode")
            assert (decode["desired"], decode["ready"], decode["registered"]) == (2, 2, 2)

            assert client.put("/admin/pools/decode", json={"replicas": 1}).json()["desired"] == 1
            (gone,) = [p for p in pods if fake.pods[p]["metadata"].get("deletionTimestamp")]
            gone_url = f"http://{fake.pods[gone]['status']['podIP']}:{port}"
            wait(lambda: set(instances()) == set(engines) - {gone_url})
            assert engines[gone_url].drained  # drained before it was let go
            assert not any(e.drained for u, e in engines.items() if u != gone_url)
            kinds = wait(lambda: (k := [e["kind"] for e in client.get("/admin/events").json()["events"]])
                         and "deregister" in k and k)  # fmt: skip
            assert kinds.count("pool_scale") == 2 and kinds.count("register") == 2
            # Refusals: a pool without a workload is 409, as are bad roles 404 and counts 400.
            r = client.put("/admin/pools/prefill", json={"replicas": 1})
            assert r.status_code == 409 and "k8s_pools.prefill" in r.json()["error"]["message"]
            assert client.put("/admin/pools/gpu", json={"replicas": 1}).status_code == 404
            assert client.put("/admin/pools/decode", json={"replicas": -1}).status_code == 400
    finally:
        for engine in engines.values():
            engine.stop()


def test_scale_down_under_load_drains_with_nothing_lost(fake: FakeKubernetes, tmp_path: Path) -> None:
    """Requests stream from both pods while the pool goes 2 -> 1: the terminating pod gets no new
    work, finishes what it runs, and only then leaves; every request completes."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.app import create_app

    probe = socket.socket()
    probe.bind(("127.0.0.60", 0))
    port = probe.getsockname()[1]
    probe.close()
    engines = {e.url: e for e in (StubEngine(f"127.0.0.{60 + i}", port, "colocated", tokens=40) for i in range(2))}
    fake.add_workload("deployments", "tetri-colocated", {**LABELS, "tetri/role": "colocated"}, port, ips(60),
                      replicas=2)  # fmt: skip
    for pod in fake.pod_names("tetri-colocated"):
        fake.make_ready(pod)
    pools = {"colocated": {"workload": "deployment/tetri-colocated", "backend": "native"}}
    settings = make_settings(tmp_path, [], pool_provider="kubernetes", k8s_api_url=fake.url, k8s_namespace=NS,
                             k8s_pools=pools, monitor_interval_ms=50)  # fmt: skip
    try:
        with serve_app(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 15
            while len(client.get("/admin/instances", headers=AUTH).json()["instances"]) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)

            def complete(i: int) -> httpx.Response:
                return client.post("/v1/completions", json={"model": settings.public_model_name,
                                                             "prompt": f"hello {i}", "max_tokens": 64})  # fmt: skip

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(complete, i) for i in range(4)]
                while not all(e.running for e in engines.values()):  # work on both pods
                    assert time.monotonic() < deadline + 15, [e.running for e in engines.values()]
                    futures.append(pool.submit(complete, len(futures)))
                    time.sleep(0.05)
                r = client.put("/admin/pools/colocated", headers=AUTH, json={"replicas": 1})
                assert r.status_code == 200, r.text
                futures += [pool.submit(complete, len(futures) + i) for i in range(4)]  # arriving meanwhile
                answers = [f.result() for f in futures]
            assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.is_error]
            assert all(a.json()["choices"][0]["finish_reason"] == "stop" for a in answers)
            (gone,) = [e for e in engines.values() if e.drained]
            assert gone.running_at_drain > 0  # drained while it had work
            assert gone.started_after_drain == 0 and gone.running == 0
            assert sum(e.served for e in engines.values()) == len(answers)
            deadline = time.monotonic() + 15
            while gone.url in {i["url"] for i in client.get("/admin/instances", headers=AUTH).json()["instances"]}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for engine in engines.values():
            engine.stop()


def test_the_fake_answers_in_the_api_s_schemas(fake: FakeKubernetes) -> None:
    """Every object the fake serves validates (strictly: no unknown fields) against the Kubernetes
    1.30 OpenAPI schemas: PodList, Pod (watch events), Scale, Status."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    def valid(obj: dict[str, Any]) -> dict[str, Any]:
        if obj.get("kind") == "Status":  # a meta/v1 type served as v1: filed as status-meta-v1
            schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.30.0-local-strict"
            schema, defs = (json.loads((schemas / f).read_text()) for f in ("status-meta-v1.json", "_definitions.json"))
            registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
            jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
        else:
            kubernetes_validate.validate(obj, "1.30", strict=True)
        return obj

    fake.add_workload("deployments", "tetri-decode", {**LABELS, "tetri/role": "decode"}, 9000, ips(20), replicas=2)
    pods = fake.pod_names("tetri-decode")
    fake.make_ready(pods[0])
    fake.terminate(pods[1])
    base = f"{fake.url}/api/v1/namespaces/{NS}/pods"
    with httpx.Client(timeout=5) as client:
        listing = valid(client.get(base, params={"labelSelector": "tetri/role=decode"}).json())
        assert len(listing["items"]) == 2 and listing["metadata"]["resourceVersion"]
        for item in listing["items"]:
            valid({"kind": "Pod", "apiVersion": "v1", **item})
        with client.stream("GET", base, params={"watch": "true", "resourceVersion": "0", "timeoutSeconds": "1"}) as r:
            assert r.headers["content-type"] == "application/json"
            events = [json.loads(line) for line in r.iter_lines() if line]
        assert {e["type"] for e in events} == {"ADDED"} and len(events) == 2
        for event in events:
            valid(event["object"])
        scale_url = f"{fake.url}/apis/apps/v1/namespaces/{NS}/deployments/tetri-decode/scale"
        assert valid(client.get(scale_url).json())["spec"] == {"replicas": 2}
        patched = client.patch(scale_url, content=b'{"spec": {"replicas": 3}}',
                               headers={"content-type": "application/merge-patch+json"})  # fmt: skip
        assert valid(patched.json())["spec"] == {"replicas": 3}
        missing = client.get(f"{fake.url}/apis/apps/v1/namespaces/{NS}/deployments/nope/scale")
        assert missing.status_code == 404 and valid(missing.json())["reason"] == "NotFound"
        fake.compact()
        with client.stream("GET", base, params={"watch": "true", "resourceVersion": "1"}) as r:
            (expired,) = [json.loads(line) for line in r.iter_lines() if line]
        assert expired["type"] == "ERROR" and valid(expired["object"])["code"] == 410
