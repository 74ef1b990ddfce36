"""The completion routes' answer path, lean: a client-disconnect watch (one task per request) and a
bare ASGI server-sent-events response.

Starlette's StreamingResponse, under uvicorn's ASGI 2.3, runs every response in an anyio task group
(a task streaming, the request's task listening for the disconnect) and ends the body with a write of
its own. Here the request's one watch task, started before the first event is awaited, covers the
stream too, and the last chunk (with `[DONE]`) goes out in the same write as the end of the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from orchestrator.errors import APIError

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
_RECANCEL_S = 0.05


class ClientWatch:
    """Notices a client that leaves: a waiter task on the ASGI receive channel (the body is read
    already, so what comes next is http.disconnect) cancels the request's task while it is inside a
    guarded section, and again every 50 ms until it leaves it (as anyio's cancel scopes do: a
    cancellation caught on the way, e.g. by a shielded cleanup, must not let the stream go on).
    Cancelling server.run()'s iteration closes it, which aborts the request on every instance that
    holds it."""

    __slots__ = ("gone", "_owner", "_cancels", "_task", "_stopped")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._stopped = False
        self._owner: asyncio.Task[object] | None = None
        self._cancels = 0
        self._task = asyncio.get_running_loop().create_task(self._wait(receive))

    async def _wait(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._stopped:
            return  # the answer is complete: ASGI servers say so with http.disconnect too
        self.gone = True
        while not self._stopped:
            self._cancel_owner()
            await asyncio.sleep(_RECANCEL_S)

    def _cancel_owner(self) -> None:
        if self._owner is not None:
            self._owner.cancel()
            self._cancels += 1

    def guard(self) -> None:
        """Start the guarded section (in the task to cancel); `release()` ends it."""
        self._owner = asyncio.current_task()
        if self.gone:
            self._cancel_owner()

    def release(self) -> bool:
        """End the guarded section and take back this watch's cancellations: True if it cancelled the
        section and nothing else cancelled the task (then the CancelledError is the client's leaving)."""
        owner, self._owner = self._owner, None
        if owner is None or not self._cancels:
            return False
        while self._cancels:
            owner.uncancel()
            self._cancels -= 1
        return owner.cancelling() == 0

    async def run(self, work: Awaitable[T]) -> T:
        """`await work`; APIError 499 if the client leaves first."""
        self.guard()
        try:
            return await work
        except asyncio.CancelledError:
            if self.release():
                raise APIError(499, "the client closed the request", code="client_closed_request") from None
            raise
        finally:
            self.release()

    def stop(self) -> None:
        """End the watch. Unless its client left, it is not cancelled: it ends by itself once the
        server reports the answer complete, and a cancellation per request would leave a cycle
        (the task, its CancelledError, the traceback's frames) to the garbage collector."""
        self._stopped = True
        if self.gone:
            self._task.cancel()


class SSEResponse(Response):
    """`text/event-stream` from an async generator of SSE text whose last item ends with `[DONE]`:
    each item is one body write, the last one with the end of the body. A client that leaves (the
    watch) cancels the generator's iteration and closes it."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[str, None], watch: ClientWatch) -> None:
        self.chunks = chunks
        self.watch = watch
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, watch = self.chunks, self.watch
        watch.guard()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            ended = False
            async for chunk in chunks:
                ended = chunk.endswith(DONE)
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not ended})
                if ended:
                    break
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.release():
                raise
            # The client left: there is no one to answer.
        finally:
            watch.release()
            watch.stop()
            await chunks.aclose()
