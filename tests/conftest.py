"""Shared fixtures: real worker processes and an in-process orchestrator on loopback ports."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from orchestrator.config import InstanceSpec, Settings  # noqa: E402
from orchestrator.launcher import Fleet, free_port  # noqa: E402

TINY = "random:tiny-llama"
ADMIN_TOKEN = "test-admin-token"


@contextmanager
def serve_app(app, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread; yield its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_pd_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One prefill and one decode worker of the tiny random Llama, shared by the session."""
    fleet = Fleet()
    log_dir = tmp_path_factory.mktemp("worker-logs")
    try:
        fleet.start_worker("prefill", TINY, chunk_size="16", kv_tokens=4096, log_dir=log_dir)
        fleet.start_worker("decode", TINY, chunk_size="16", kv_tokens=4096, log_dir=log_dir)
        fleet.wait_healthy(timeout_s=300)
        yield fleet
    finally:
        fleet.stop()


def make_settings(tmp_path: Path, instances: list[InstanceSpec], **overrides) -> Settings:
    # The learned predictor takes seconds to load: tests that don't look at predictions skip it.
    overrides.setdefault("predictor", "constant")
    # The protocol fakes serve toy model names: they tokenize with the default model's tokenizer,
    # which an operator has to configure explicitly (no silent fallback).
    overrides.setdefault("tokenizers", {"*": "smollm2-135m-instruct"})
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'tetri.db'}", admin_token=ADMIN_TOKEN, instances=instances,
        model=TINY, **overrides,
    )


@pytest.fixture
def orchestrator_for(tmp_path: Path) -> Callable:
    """Factory: start an orchestrator over given instances; stopped at test end."""
    from orchestrator.app import create_app

    stack: list = []

    def start(instances: list[InstanceSpec], **overrides):
        settings = make_settings(tmp_path, instances, **overrides)
        app = create_app(settings)
        ctx = serve_app(app)
        url = ctx.__enter__()
        stack.append(ctx)
        return url, app.state.tetri

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def fake_cluster(members: list[tuple[str, str, object]], kv_tokens: int = 4096):
    """A control-plane Cluster over in-process fake backends: (instance id, role, backend) each,
    healthy, with a load report of `kv_tokens` free KV."""
    from backends.base import LoadReport
    from orchestrator.cluster import Cluster

    cluster = Cluster()
    for iid, role, backend in members:
        inst = cluster.add(InstanceSpec(url=f"http://{iid}.invalid", backend="native", role=role, model=TINY, id=iid))
        inst.backend = backend  # type: ignore[assignment]
        inst.state = "healthy"
        inst.load = LoadReport(role=role, free_kv_tokens=kv_tokens, total_kv_tokens=kv_tokens)  # type: ignore[arg-type]
    return cluster


def pd_specs(fleet: Fleet) -> list[InstanceSpec]:
    return [InstanceSpec(url=w.url, backend="native", role=w.role, model=TINY, id=f"{w.role}-{i}")
            for i, w in enumerate(fleet.workers)]


def wait_pools_empty(urls: list[str], timeout_s: float = 20.0) -> list[dict]:
    """Poll workers until no KV is in use or leased; return the last load reports."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [httpx.get(f"{u}/load", timeout=5).json() for u in urls]
        empty = all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["active_leases"] == 0
                    and ld["running"] == 0 for ld in loads)
        if empty or time.monotonic() > deadline:
            return loads
        time.sleep(0.1)
