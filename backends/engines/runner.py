"""Runs a synchronous EngineCore in its own thread and bridges it to asyncio.

The engine thread owns the core: every call into it (add, abort, KV export, role change) is queued
as a command and executed between two steps, so the core needs no locks beyond one exception: a KV
import may run on another thread beside a step (its allocator is locked; see api.import_kv).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from backends.base import LoadReport
from backends.engines.api import EngineCore, EngineRequest, StepOutput

T = TypeVar("T")
_IDLE_WAIT_S = 0.05
_PASS_LOG = 4096


class EngineRunner:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[tuple[Callable[[EngineCore], Any], asyncio.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[StepOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stepping = False  # inside core.step() (the snapshot is refreshed when it returns)
        self.steps = 0
        # (ms, pass shape) of recent forward passes: `tetri bench calibrate --url` fits a timing model to them.
        self.passes: deque[dict[str, float]] = deque(maxlen=_PASS_LOG)
        # The load after the latest step or command, so /load never waits behind a long step.
        self.snapshot: LoadReport | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- async API -------------------------------------------------------------------------
    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run `fn(core)` on the engine thread between two steps and return its result."""
        assert self._loop is not None, "runner not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, future))
        self._wake.set()
        return await future

    async def submit(self, request: EngineRequest) -> AsyncIterator[StepOutput]:
        """Add a request and yield its outputs until it finishes; closing early aborts it."""
        stream: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._streams[request.request_id] = stream
        finished = False
        try:
            await self.call(lambda core: core.add_request(request))
            while True:
                out = await stream.get()
                # Set before yielding: a caller that stops at the final output must not abort.
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                rid = request.request_id
                # Fire and forget: the caller may be a cancelled task that can't await.
                self._commands.put((lambda core: core.abort(rid), self._loop.create_future()))  # type: ignore[union-attr]
                self._wake.set()

    async def refresh_snapshot(self) -> None:
        """After a change made off the engine thread (a KV import): an idle engine refreshes its load
        snapshot now; a stepping one does so when the step ends anyway."""
        if not self.stepping:
            await self.call(lambda core: None)

    def is_streaming(self, request_id: str) -> bool:
        return request_id in self._streams

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            if self._drain_commands():
                self.snapshot = self.core.load()
            if self.core.has_work():
                started = time.perf_counter()
                self.stepping = True
                try:
                    outputs = self.core.step()
                except Exception as exc:  # an engine bug must not hang every client
                    outputs = self._fail_all(exc)
                finally:
                    self.stepping = False
                self._log_pass(time.perf_counter() - started)
                self.steps += 1
                self._export_prefilled(outputs)
                self.snapshot = self.core.load()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)  # type: ignore[union-attr]
            else:
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()

    def _drain_commands(self) -> bool:
        ran = False
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            try:
                result = fn(self.core)
            except BaseException as exc:  # noqa: BLE001 - handed back to the awaiting caller
                self._loop.call_soon_threadsafe(_set_exception, future, exc)  # type: ignore[union-attr]
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)  # type: ignore[union-attr]

    def _log_pass(self, seconds: float) -> None:
        shape = self.core.last_pass
        if shape is not None:
            self.passes.append({"ms": seconds * 1e3, "at": time.time(), **shape.as_dict()})

    def _export_prefilled(self, outputs: list[StepOutput]) -> None:
        """Copy out and free the KV of every request that just finished its prefill, before the next
        step: a `call(export_kv)` from the event loop would wait for that whole step (a long prefill
        chunk), delaying the hand-off and holding the blocks meanwhile."""
        for out in outputs:
            if out.finish_reason != "prefilled" or out.request_id not in self._streams:
                continue
            try:
                out.kv = self.core.export_kv(out.request_id)
            except Exception as exc:  # noqa: BLE001 - reported to the request, not the engine
                out.finish_reason, out.error = "error", f"KV export failed: {exc!r}"
            finally:
                self.core.release_kv(out.request_id)

    def _fail_all(self, exc: Exception) -> list[StepOutput]:
        outputs = []
        for rid in list(self._streams):
            try:
                self.core.abort(rid)
            except Exception:  # noqa: BLE001
                pass
            outputs.append(StepOutput(rid, None, "", "error", error=f"engine failure: {exc!r}"))
        return outputs

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
