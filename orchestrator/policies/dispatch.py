"""Decode placement (TetriInfer §3.3.4, "inter-decode load balancing"), run per request once it
has been prefilled.

Every dispatcher first splits the usable decode instances it is given into

* **α**: instances where :func:`~orchestrator.policies.capacity.fits` holds (room for the prompt plus
  the lower end of the predicted output bucket, after what is already reserved there), and
* **β**: the rest,

and picks from α whenever α is non-empty. They differ only in how they choose within α:

* ``power_of_two``: sample ``min(power_of_d, |α|)`` distinct instances of α uniformly at random
  (``rng.sample`` over α sorted by id) and keep the best by the heavy:light decode ratio,
  ratio = (heavy + 1) / (light + 1) (smoothed so that no light decode is not a division by zero),
  per ``ratio_objective``:

  - ``balance`` (default): a heavy request goes to the candidate whose ratio *after adding it* is
    lowest; a light request to the one whose ratio after adding it is highest (it dilutes the most
    heavy-dominated mix). Ratios even out across instances: heavy decodes are spread evenly;
  - ``after`` (the paper's words taken literally): lowest ratio after adding, for every request.
    For a light request that means the candidate with *more* light decodes already, i.e. it piles
    light decodes onto the busier instance (measured worse on light-only load, docs/scheduling.md);
  - ``delta``: the smallest rise of the cluster's average ratio; for a heavy request that ignores
    how many heavy decodes the candidate already has (measured worse on mixed load).

  Ties: more available KV, then fewer running, then the earlier-sampled one (random, so identical
  instances share the load evenly).
* ``random``: uniform over α.
* ``round_robin``: the next instance of α (by id) after the one picked last (a stateful cursor).
* ``least_loaded``: most available KV (free − reserved); ties: fewer running, then id.
* ``imbalanced``: the first instance of α in id order (piles everything onto one instance until it
  is full: an ablation baseline).

**β fallback** (when α is empty), the ``fallback`` knob: ``"most_free"`` (default) returns the β
instance with the most available KV, leaving the final say to decode admission (``greedy`` may
still admit; the ``reserve_*`` policies refuse, and the caller waits and retries); ``"none"``
returns ``None`` (the caller waits and retries).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Protocol

from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.registry import build, lookup, names, register
from orchestrator.policies.types import InstanceView, RequestView


class Dispatcher(Protocol):
    name: str

    def pick(self, decodes: Sequence[InstanceView], req: RequestView, rng: random.Random) -> str | None: ...


def split_alpha_beta(
    decodes: Sequence[InstanceView], req: RequestView
) -> tuple[list[InstanceView], list[InstanceView]]:
    """(α, β) over the usable instances, each sorted by id (so sampling is reproducible)."""
    usable = sorted((d for d in decodes if d.usable), key=lambda d: d.id)
    alpha = [d for d in usable if fits(d, req)]
    beta = [d for d in usable if not fits(d, req)]
    return alpha, beta


@register("dispatch_ratio_objective", "after")
def heavy_light_ratio_after(inst: InstanceView, heavy: bool) -> Fraction:
    """(heavy + 1) / (light + 1) on ``inst`` once this request (heavy or light) is added."""
    h = inst.heavy_decodes + (1 if heavy else 0)
    light = inst.light_decodes + (0 if heavy else 1)
    return Fraction(h + 1, light + 1)


@register("dispatch_ratio_objective", "delta")
def ratio_increase(inst: InstanceView, heavy: bool) -> Fraction:
    """How much this request raises ``inst``'s smoothed heavy:light ratio (negative: lowers it)."""
    before = Fraction(inst.heavy_decodes + 1, inst.light_decodes + 1)
    return heavy_light_ratio_after(inst, heavy) - before


@register("dispatch_ratio_objective", "balance")
def balance_score(inst: InstanceView, heavy: bool) -> Fraction:
    """Lower is better: a heavy decode goes where the ratio after adding it is lowest, a light one
    where it is highest (it dilutes the most heavy-dominated mix), so ratios even out."""
    after = heavy_light_ratio_after(inst, heavy)
    return after if heavy else -after


def _most_free(instances: Sequence[InstanceView]) -> InstanceView:
    return min(instances, key=lambda d: (-available_kv(d), d.running, d.id))


# What a dispatcher does when no instance fits (α empty): the β instance with the most available KV
# (admission has the last word), or nobody.
register("dispatch_fallback", "most_free")(_most_free)


@register("dispatch_fallback", "none")
def _no_fallback(instances: Sequence[InstanceView]) -> InstanceView | None:
    return None


DISPATCH_FALLBACK_NAMES: tuple[str, ...] = names("dispatch_fallback")
RATIO_OBJECTIVE_NAMES: tuple[str, ...] = names("dispatch_ratio_objective")


class _Base:
    name = "base"

    def __init__(self, fallback: str = "most_free", heavy_decode_threshold: int | None = None) -> None:
        self._fallback = lookup("dispatch_fallback", fallback)
        self.fallback = fallback
        self.heavy_decode_threshold = heavy_decode_threshold

    def is_heavy(self, req: RequestView) -> bool:
        """Heavy decode: the lower end of the predicted bucket exceeds the threshold (the
        dispatcher's own when configured, else the one the request carries)."""
        if self.heavy_decode_threshold is None:
            return req.heavy_decode
        return req.predicted_output_lo > self.heavy_decode_threshold

    def pick(self, decodes: Sequence[InstanceView], req: RequestView, rng: random.Random) -> str | None:
        alpha, beta = split_alpha_beta(decodes, req)
        if alpha:
            return self.choose(alpha, req, rng).id
        chosen = self._fallback(beta) if beta else None
        return chosen.id if chosen is not None else None

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        raise NotImplementedError


@register("dispatch_policy", "power_of_two")
class PowerOfTwo(_Base):
    name = "power_of_two"

    def __init__(self, power_of_d: int = 2, objective: str = "balance", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if power_of_d < 1:
            raise ValueError(f"power_of_d must be >= 1, got {power_of_d}")
        self._score = lookup("dispatch_ratio_objective", objective)
        self.power_of_d = int(power_of_d)
        self.objective = objective

    def candidates(self, alpha: list[InstanceView], rng: random.Random) -> list[InstanceView]:
        """``min(power_of_d, |α|)`` distinct instances of α (sorted by id) in random order."""
        return rng.sample(alpha, min(self.power_of_d, len(alpha)))

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        heavy = self.is_heavy(req)
        cands = self.candidates(alpha, rng)
        # min() keeps the first of equal keys: a full tie goes to the earlier-sampled candidate.
        return min(cands, key=lambda d: (self._score(d, heavy), -available_kv(d), d.running))


@register("dispatch_policy", "random")
class RandomDispatch(_Base):
    name = "random"

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        return alpha[rng.randrange(len(alpha))]


@register("dispatch_policy", "round_robin")
class RoundRobin(_Base):
    """Stateful: remembers the id it picked last and takes the next id of α after it (wrapping)."""

    name = "round_robin"

    def __init__(self, fallback: str = "most_free", heavy_decode_threshold: int | None = None) -> None:
        super().__init__(fallback, heavy_decode_threshold)
        self.last_id: str | None = None

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        chosen = alpha[0]
        if self.last_id is not None:
            chosen = next((d for d in alpha if d.id > self.last_id), alpha[0])
        self.last_id = chosen.id
        return chosen


@register("dispatch_policy", "least_loaded")
class LeastLoadedDecode(_Base):
    name = "least_loaded"

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        return _most_free(alpha)


@register("dispatch_policy", "imbalanced")
class Imbalanced(_Base):
    name = "imbalanced"

    def choose(self, alpha: list[InstanceView], req: RequestView, rng: random.Random) -> InstanceView:
        return alpha[0]


def make_dispatcher(
    name: str,
    power_of_d: int = 2,
    heavy_decode_threshold: int | None = None,
    fallback: str = "most_free",
    ratio_objective: str = "balance",
) -> Dispatcher:
    return build("dispatch_policy", name, power_of_d=power_of_d, objective=ratio_objective, fallback=fallback,
                 heavy_decode_threshold=heavy_decode_threshold)  # fmt: skip


DISPATCH_POLICY_NAMES: tuple[str, ...] = names("dispatch_policy")
