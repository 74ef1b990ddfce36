"""Late binding: an instance with room and nothing queued takes the next prompt queued for its
busiest peer.

The global scheduler binds a prompt to an instance when it arrives, from a load estimate. One long
prompt, or a burst that lands on one instance, leaves that queue deep while a peer of the same pool
runs out of prompts. A prompt is only really committed when its engine starts it, so until then it
may move: the instance that would otherwise sit with budget to spare takes it. This is the "pull"
half of a central queue (as Dynamo's and llm-d's routers avoid head-of-line waits), without giving
up the per-instance SJF queues of TetriInfer §3.3.1.

Pure: the caller passes, per peer of the same pool, the prompt tokens queued there (held back by
the control plane, not yet released to the engine). The victim's own queue decides which of its
prompts moves (its next in policy order), so the moved prompt is the one it would have served next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from orchestrator.policies.registry import lookup, names, register


class LateBinding(Protocol):
    name: str

    def victim(self, thief: str, queued_tokens: Mapping[str, int]) -> str | None: ...


@register("late_binding", "none")
class NoLateBinding:
    """A prompt stays where the global scheduler put it (the paper's behaviour)."""

    name = "none"

    def victim(self, thief: str, queued_tokens: Mapping[str, int]) -> str | None:
        return None


@register("late_binding", "busiest")
class StealFromBusiest:
    """The peer with the most prompt tokens queued; ties by id, so the choice is deterministic."""

    name = "busiest"

    def victim(self, thief: str, queued_tokens: Mapping[str, int]) -> str | None:
        peers = [(-tokens, pid) for pid, tokens in queued_tokens.items() if pid != thief and tokens > 0]
        return min(peers)[1] if peers else None


LATE_BINDING_NAMES: tuple[str, ...] = names("late_binding")


def make_late_binding(name: str = "busiest") -> LateBinding:
    return lookup("late_binding", name)()
