"""A request in the orchestrator: what the API layer accepted, and where it is in its life.

`RequestState` is the one definition of a request's state: the store's `state` column holds its
values. `Job.transition()` is the only way a state changes, and it writes the record."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Protocol

from backends.base import SamplingParams
from orchestrator.tracing import RequestTrace


class RequestState(StrEnum):
    QUEUED = "queued"  # accepted; waiting for an instance (also again after a failed attempt)
    PREFILLING = "prefilling"  # its prompt is in an engine
    TRANSFERRING = "transferring"  # disaggregated: first token out, KV on its way to the decode side
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the client left

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})
_S = RequestState
# Where each state may go; any live state may end (finished, failed, cancelled) or start over
# (queued: re-placed before its first token, or migrated after it).
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    _S.QUEUED: frozenset({_S.PREFILLING}),
    _S.PREFILLING: frozenset({_S.TRANSFERRING, _S.DECODING}),
    _S.TRANSFERRING: frozenset({_S.DECODING}),
    _S.DECODING: frozenset(),
}
TRANSITIONS = {s: nxt | _TERMINAL | {_S.QUEUED} for s, nxt in TRANSITIONS.items()} | {s: frozenset() for s in _TERMINAL}
IN_FLIGHT_STATES: tuple[str, ...] = tuple(s.value for s in RequestState if not s.terminal)
REQUEST_STATES: tuple[str, ...] = tuple(s.value for s in RequestState)


class RecordSink(Protocol):
    def save_request(self, request_id: str, **fields: object) -> None: ...


@dataclass
class Job:
    """One accepted request, tokenized, as the API layer hands it to the server."""

    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_text: str = ""
    # A prompt given as token ids: how to get its text, called only when something needs it.
    detokenize: Callable[[list[int]], str] | None = field(default=None, repr=False)
    id: str = field(default_factory=lambda: f"cmpl-{random.getrandbits(128):032x}")
    arrival: float = field(default_factory=time.time)
    state: RequestState = RequestState.QUEUED
    # Where transitions are recorded (the store); None: not recorded.
    sink: RecordSink | None = field(default=None, repr=False)
    # Observed by the API layer for usage and by the store for the record.
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    predicted_bucket: int | None = None
    prefill_instance: str | None = None
    decode_instance: str | None = None
    backend: str | None = None
    first_token_at: float | None = None
    # Every token id sent so far: after a failure mid-stream the request continues from them.
    generated_ids: list[int] = field(default_factory=list)
    migrations: int = 0
    # (prompt length, its block hashes) of the last attempt: computed once per attempt prompt.
    prefix_hashes: tuple[int, tuple[int, ...]] | None = field(default=None, repr=False)
    # The end of the text sent so far (as long as the longest stop string), and after a migration
    # the text sent just before it and just after it: the new engine cannot see a stop string that
    # straddles the break, so the orchestrator looks for it there.
    text_tail: str = ""
    break_before: str = ""
    break_after: str = ""
    # The request's OpenTelemetry spans (orchestrator/tracing.py); None when tracing is off.
    trace: RequestTrace | None = field(default=None, repr=False)

    def transition(self, state: RequestState, **fields: object) -> None:
        """Move to `state` (ValueError if its lifecycle does not allow it) and record it with `fields`."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise ValueError(f"request {self.id}: {self.state.value} -> {state.value} is not a transition")
        self.state = state
        self.record(state=state.value, **fields)

    def record(self, **fields: object) -> None:
        """Record fields without a state change."""
        if self.sink is not None:
            self.sink.save_request(self.id, **fields)

    @property
    def text(self) -> str:
        """The prompt's text (decoded from its ids on first use when it came as ids)."""
        if not self.prompt_text and self.detokenize is not None:
            self.prompt_text = self.detokenize(self.prompt_ids)
        return self.prompt_text

    @cached_property
    def stop_window(self) -> int:
        """Characters of sent text a stop string could still need: the longest stop string."""
        return max((len(s) for s in self.sampling.stop), default=0)

    @property
    def attempt_prompt_ids(self) -> list[int]:
        """What the next attempt prefills: the prompt, plus the tokens already sent after a migration."""
        return self.prompt_ids + self.generated_ids if self.generated_ids else self.prompt_ids

    @property
    def remaining_tokens(self) -> int:
        return max(1, self.sampling.max_tokens - self.completion_tokens)
