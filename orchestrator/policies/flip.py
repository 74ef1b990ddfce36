"""Instance flip (TetriInfer §3.5): a prefill instance that has been idle for ``flip_idle_s`` while
the decode side is loaded becomes a decode instance, and the reverse.

``idle`` policy rules, evaluated on every ``decide(instances, now)`` call (the cluster monitor tick):

* Only usable ``prefill`` and ``decode`` instances take part (``colocated`` never flips; unhealthy
  or non-accepting (draining) instances neither flip nor count).
* An instance is **idle** when it has no work at all: ``running == queued == 0``, no queued or
  running prompt tokens, no heavy/light decodes and nothing reserved for it. The policy remembers,
  per instance, the first ``now`` at which it was seen idle (reset when it is seen busy, or in a
  different role). With ``scope="pool"`` the whole pool (every usable instance of the role) must
  also have been idle for ``idle_s``.
* A role's pool is **loaded** when any of its usable instances has queued work (``queued > 0`` or
  queued prompt tokens) or its mean KV utilisation (used + reserved over total) is at least
  ``load_kv_threshold``.
* Candidates: idle for at least ``idle_s``, the *other* role loaded, not flipped (decided) within
  ``cooldown_s`` (hysteresis; default ``idle_s``), and the instance's own role keeps at least
  ``min_per_role`` usable instances after the flip (instances already decided to flip away, not yet
  seen in their new role, do not count; such a pending decision expires after ``cooldown_s``).
* At most one flip per call: the candidate idle longest (then by id).

``none`` never flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from orchestrator.policies.capacity import kv_utilisation
from orchestrator.policies.registry import build, check, names, register
from orchestrator.policies.types import FlipDecision, InstanceView, Role

# What an idle flip watches: each instance's idle time, or (also) its whole pool's.
for _scope in ("instance", "pool"):
    register("flip_scope", _scope)(_scope)
FLIP_SCOPE_NAMES: tuple[str, ...] = names("flip_scope")
_FLIPPABLE: tuple[Role, Role] = ("prefill", "decode")


class FlipPolicy(Protocol):
    name: str

    def decide(self, instances: Sequence[InstanceView], now: float) -> list[FlipDecision]: ...


@register("flip_policy", "none")
class NoFlip:
    name = "none"

    def decide(self, instances: Sequence[InstanceView], now: float) -> list[FlipDecision]:
        return []


def _other(role: Role) -> Role:
    return "decode" if role == "prefill" else "prefill"


def is_idle(inst: InstanceView) -> bool:
    return (
        inst.running == 0
        and inst.queued == 0
        and inst.queued_prompt_tokens == 0
        and inst.running_prompt_tokens == 0
        and inst.heavy_decodes == 0
        and inst.light_decodes == 0
        and inst.reserved_kv_tokens == 0
    )


def pool_loaded(pool: Sequence[InstanceView], load_kv_threshold: float) -> bool:
    if not pool:
        return False
    if any(i.queued > 0 or i.queued_prompt_tokens > 0 for i in pool):
        return True
    mean_util = sum(kv_utilisation(i) for i in pool) / len(pool)
    return mean_util >= load_kv_threshold


@register("flip_policy", "idle")
class IdleFlip:
    name = "idle"

    def __init__(
        self,
        idle_s: float = 60.0,
        min_per_role: int = 1,
        cooldown_s: float | None = None,
        load_kv_threshold: float = 0.8,
        scope: Literal["instance", "pool"] | str = "instance",
    ) -> None:
        if idle_s < 0:
            raise ValueError(f"flip_idle_s must be >= 0, got {idle_s}")
        if min_per_role < 0:
            raise ValueError(f"flip_min_per_role must be >= 0, got {min_per_role}")
        check("flip_scope", scope)
        self.idle_s = float(idle_s)
        self.min_per_role = int(min_per_role)
        self.cooldown_s = float(idle_s if cooldown_s is None else cooldown_s)
        self.load_kv_threshold = float(load_kv_threshold)
        self.scope = scope
        self.idle_since: dict[str, float] = {}  # instance id (scope instance) or role (scope pool)
        self.seen_role: dict[str, Role] = {}
        self.last_flip: dict[str, float] = {}  # instance id -> now of the decision
        self.pending: dict[str, Role] = {}  # decided, not yet seen in the new role

    def _observe(self, views: Sequence[InstanceView], now: float) -> None:
        # A decision not seen carried out within the cooldown (the flip failed or is still
        # draining) stops blocking: the instance counts by what its view says again.
        for iid in [i for i in self.pending if now - self.last_flip.get(i, now) >= self.cooldown_s]:
            del self.pending[iid]
        for v in views:
            if self.seen_role.get(v.id) != v.role:
                self.seen_role[v.id] = v.role
                self.idle_since.pop(v.id, None)
            if self.pending.get(v.id) == v.role:
                del self.pending[v.id]
            if v.usable and is_idle(v):
                self.idle_since.setdefault(v.id, now)
            else:
                self.idle_since.pop(v.id, None)
        if self.scope == "pool":
            for role in _FLIPPABLE:
                pool = [v for v in views if v.role == role and v.usable]
                key = f"pool:{role}"
                if pool and all(is_idle(v) for v in pool):
                    self.idle_since.setdefault(key, now)
                else:
                    self.idle_since.pop(key, None)

    def _idle_from(self, v: InstanceView) -> float | None:
        """Since when ``v`` counts as idle: its own idle clock, and with scope "pool" also its pool's
        (the later of the two), so an instance that just joined an idle pool still waits ``idle_s``."""
        own = self.idle_since.get(v.id)
        if own is None or self.scope == "instance":
            return own
        pool = self.idle_since.get(f"pool:{v.role}")
        return None if pool is None else max(own, pool)

    def decide(self, instances: Sequence[InstanceView], now: float) -> list[FlipDecision]:
        views = [v for v in instances if v.role in _FLIPPABLE]
        self._observe(views, now)
        usable = [v for v in views if v.usable]
        pools = {role: [v for v in usable if v.role == role] for role in _FLIPPABLE}
        loaded = {role: pool_loaded(pools[role], self.load_kv_threshold) for role in _FLIPPABLE}
        staying = {role: sum(1 for v in pools[role] if self.pending.get(v.id) is None) for role in _FLIPPABLE}
        best: tuple[float, str, InstanceView] | None = None
        for v in usable:
            since = self._idle_from(v)
            if since is None or now - since < self.idle_s or not is_idle(v):
                continue
            if not loaded[_other(v.role)]:
                continue
            last = self.last_flip.get(v.id)
            if last is not None and now - last < self.cooldown_s:
                continue
            if staying[v.role] - 1 < self.min_per_role:
                continue
            key = (since, v.id, v)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            return []
        since, _, v = best
        to_role = _other(v.role)
        self.last_flip[v.id] = now
        self.pending[v.id] = to_role
        self.idle_since.pop(v.id, None)
        reason = f"{v.role} idle for {now - since:.1f}s (>= {self.idle_s:g}s) while the {to_role} pool is loaded"
        return [FlipDecision(instance_id=v.id, to_role=to_role, reason=reason)]


def make_flip_policy(
    name: str,
    idle_s: float = 60.0,
    min_per_role: int = 1,
    cooldown_s: float | None = None,
    load_kv_threshold: float = 0.8,
    scope: str = "instance",
) -> FlipPolicy:
    return build("flip_policy", name, idle_s=idle_s, min_per_role=min_per_role, cooldown_s=cooldown_s,
                 load_kv_threshold=load_kv_threshold, scope=scope)  # fmt: skip


FLIP_POLICY_NAMES: tuple[str, ...] = names("flip_policy")
