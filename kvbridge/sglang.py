"""SGLang KV handoff: SGLang moves the KV itself (mooncake/nixl/mori) between a prefill and a decode
server that get the same request body, with a shared bootstrap room, at the same time. The adapter
runs that pair (`backends.sglang.disaggregate`: both sides sent together, the first token from
whichever shows it first, both aborted unless the decode finished); the strategy checks the pair
can exchange KV and hands it the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from backends.base import Backend, BackendError, GenRequest, TokenEvent
from backends.sglang import SGLangBackend, check_pd_pair, disaggregate
from kvbridge.base import HandoffStats, HandoffStrategy


class BootstrapRoomStrategy(HandoffStrategy):
    """`early_first_token` has no effect here: the first token goes out when either side shows it,
    which is after the KV transfer on the prefill side and with it on the decode side."""

    name = "sglang-bootstrap-room"

    async def check_pair(self, prefill: SGLangBackend, decode: SGLangBackend) -> None:
        """Refuse (409) a pair whose page size, KV dtype or transfer backend differ."""
        p_info, d_info = await asyncio.gather(prefill.info(), decode.info())
        check_pd_pair(p_info, d_info)

    def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        if not isinstance(prefill, SGLangBackend) or not isinstance(decode, SGLangBackend):
            return _refused(BackendError("BootstrapRoomStrategy needs SGLang prefill and decode instances", status=500))
        p_info, d_info = prefill.known_info, decode.known_info
        if p_info is None or d_info is None:
            return self._checked_first(request, prefill, decode, stats)
        try:  # both servers' info known (the usual case): checked here, no layer of ours on every token
            check_pd_pair(p_info, d_info)
        except BackendError as exc:
            return _refused(exc)
        return disaggregate(request, prefill, decode, stats)

    async def _checked_first(
        self, request: GenRequest, prefill: SGLangBackend, decode: SGLangBackend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        await self.check_pair(prefill, decode)
        async with contextlib.aclosing(disaggregate(request, prefill, decode, stats)) as events:
            async for event in events:
                yield event


async def _refused(exc: BackendError) -> AsyncIterator[TokenEvent]:
    raise exc
    yield  # an async generator that raises at its first step, as the strategy's run did
