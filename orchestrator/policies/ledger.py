"""KV reservations: tokens promised to requests routed to an instance whose KV its load report does
not show yet. The dispatcher, admission and the room test read them through the view
(``reserved_kv_tokens``); a `Hold` gives them back exactly once, by hand or when its block ends."""

from __future__ import annotations

from types import TracebackType


class KVLedger:
    """The reservations on one instance: request id -> tokens."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self.total = 0

    def hold(self, request_id: str, tokens: int) -> Hold:
        self._put(request_id, tokens)
        return Hold(self, request_id)

    def _put(self, request_id: str, tokens: int) -> None:
        self.total += tokens - self._held.get(request_id, 0)
        self._held[request_id] = tokens

    def _drop(self, request_id: str) -> None:
        self.total -= self._held.pop(request_id, 0)

    def clear(self) -> None:
        self._held.clear()
        self.total = 0

    def __len__(self) -> int:
        return len(self._held)


class Hold:
    """One request's reservation on one instance; `release()` is idempotent, `move()` re-homes it."""

    def __init__(self, ledger: KVLedger, request_id: str) -> None:
        self.ledger = ledger
        self.request_id = request_id
        self.tokens = ledger._held.get(request_id, 0)
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ledger._drop(self.request_id)

    def move(self, ledger: KVLedger) -> None:
        """Late binding moved the request: the reservation goes with it."""
        if ledger is self.ledger or self.released:
            return
        self.ledger._drop(self.request_id)
        self.ledger = ledger
        ledger._put(self.request_id, self.tokens)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()
