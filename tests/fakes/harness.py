"""Start protocol fakes and register them with an orchestrator through its admin API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from tests.fakes.server import ServerThread
from tests.fakes.sglang_fake import SGLangFake, SGLangFakeConfig
from tests.fakes.trtllm_fake import TRTFake, TRTFakeConfig


@dataclass
class Running:
    fake: Any
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


class Fakes:
    """Fake engine servers started for one test, stopped together."""

    def __init__(self) -> None:
        self.running: list[Running] = []

    def sglang(self, mode: str | None = None, **cfg: Any) -> Running:
        fake = SGLangFake(SGLangFakeConfig(mode=mode, **cfg))
        run = Running(fake, ServerThread(fake.app).start())
        self.running.append(run)
        return run

    def trtllm(self, **cfg: Any) -> Running:
        fake = TRTFake(TRTFakeConfig(**cfg))
        run = Running(fake, ServerThread(fake.app).start())
        self.running.append(run)
        return run

    def stop(self) -> None:
        for run in self.running:
            run.server.stop()


@contextmanager
def fakes() -> Iterator[Fakes]:
    group = Fakes()
    try:
        yield group
    finally:
        group.stop()


def settle(*runs: Running, timeout: float = 10.0) -> None:
    """Wait until the fakes hold no request, then reset them (configuration and records)."""
    deadline = time.monotonic() + timeout
    for run in runs:
        fake = run.fake
        while getattr(fake, "live", None) or getattr(fake, "running", None):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        fake.reset()


def register(orchestrator_url: str, token: str, url: str, backend: str, role: str, model: str,
             instance_id: str | None = None, **options: Any) -> dict[str, Any]:
    body = {"url": url, "backend": backend, "role": role, "model": model, "options": options}
    if instance_id:
        body["id"] = instance_id
    resp = httpx.post(f"{orchestrator_url}/admin/instances", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 201, resp.text
    return resp.json()


def sse_events(resp: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an OpenAI SSE stream, up to [DONE] (which must come)."""
    out: list[dict[str, Any]] = []
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return out
        out.append(json.loads(payload))
    raise AssertionError("stream ended without [DONE]")
