"""How a prefilled request's KV cache reaches its decode instance: one strategy per backend.

The strategies are registered by backend name in kvbridge/factory.py. A strategy runs the whole
disaggregated request (prefill, handoff, decode) and yields tokens as
they come, so the first token reaches the client as soon as the prefill side has it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from backends.base import Backend, GenRequest, TokenEvent
from backends.base import HandoffStats as HandoffStats  # the adapters fill it: defined on their side


class HandoffStrategy(ABC):
    name: str = "abstract"

    def __init__(self, lease_s: float = 30.0, early_first_token: bool = True) -> None:
        """`early_first_token`: relay the first token before the hand-off is done, where the
        strategy can (kvbridge/factory.py)."""
        self.lease_s = lease_s
        self.early_first_token = early_first_token

    @abstractmethod
    def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        """Yield the request's tokens: events with phase="prefill" first, then phase="decode".

        Fills `stats` as the handoff happens. Closing the iterator early (client gone) must abort
        the request on both sides so their KV is freed.
        """
