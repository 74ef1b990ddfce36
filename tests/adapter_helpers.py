"""Helpers the SGLang and TensorRT-LLM adapter and orchestrator tests share.

Adapter tests drive one adapter against one protocol fake (`Nodes`); orchestrator tests run a whole
orchestrator over fakes registered through its admin API (`orchestrator_over`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import Backend, GenRequest, SamplingParams, TokenEvent
from kvbridge.base import HandoffStats
from tests.conftest import ADMIN_TOKEN, make_settings, serve_app
from tests.fakes.harness import Running, register, settle
from tests.fakes.server import ServerThread


# ---- adapter tests ----------------------------------------------------------------------------
@dataclass
class Node(Running):
    """A running protocol fake and the adapter under test that talks to it."""

    backend: Any = None

    @property
    def config(self) -> Any:
        return self.fake.config


class Nodes:
    """The nodes one test started, torn down together (adapters closed, servers stopped)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self, fake: Any, adapter: Callable[[str], Backend]) -> Node:
        """Serve `fake` and connect `adapter(url)` to it."""
        server = ServerThread(fake.app).start()
        node = Node(fake, server, adapter(server.url))
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.backend.close()
            node.server.stop()


def gen_request(prompt: list[int], max_tokens: int = 8, rid: str = "r1", **sampling: Any) -> GenRequest:
    """A request at temperature 0, as every adapter test sends."""
    return GenRequest(request_id=rid, prompt_ids=list(prompt),
                      sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling))


async def collect(agen: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in agen]


def joined(events: list[TokenEvent]) -> tuple[list[int], str]:
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events)


async def run_handoff(strategy: Any, p: Node, d: Node, request: GenRequest) -> tuple[list[TokenEvent], HandoffStats]:
    """One disaggregated request from prefill node `p` to decode node `d`: (events, HandoffStats)."""
    stats = HandoffStats()
    events = await collect(strategy.run(request, p.backend, d.backend, stats))
    return events, stats


async def wait_for(cond: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# ---- orchestrator tests -----------------------------------------------------------------------
@contextmanager
def orchestrator_over(data_dir: Path, *instances: tuple[Running, str, str, str, str]) -> Iterator[tuple[str, Any]]:
    """An orchestrator with no configured instances, serving; `instances` (fake, backend, role,
    model, instance id) are registered through its admin API, as an operator would. Yields its
    URL and its state (`app.state.tetri`)."""
    from orchestrator.app import create_app

    app = create_app(make_settings(data_dir, []))
    with serve_app(app) as url:
        for run, backend, role, model, instance_id in instances:
            register(url, ADMIN_TOKEN, run.url, backend, role, model, instance_id)
        yield url, app.state.tetri


def settled(module: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    """Body of a per-test fixture over a module-scoped (url, state, *fakes) tuple: the fakes hold no
    request and are reset before and after each test, so tests sharing them stay independent."""
    settle(*module[2:])
    yield module
    settle(*module[2:])


def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def chat_body(model: str, content: str, stream: bool = False, max_tokens: int = 12, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, **kw}
