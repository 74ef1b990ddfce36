"""Policies registered once by name, per configuration knob.

A policy class (or the function that implements a variant) says which knob and name select it::

    @register("dispatch_policy", "power_of_two")
    class PowerOfTwo: ...

The ``make_*`` factories build by looking the name up (``lookup``), and the configuration validates
a knob's value against the names registered for it (``check``, ``names``): a new policy is one
decorated class, with no list of names to keep in step anywhere else.

Every policy module registers on import, and importing any ``orchestrator.policies`` module imports
the package, which imports them all; so the names are complete wherever this module is reachable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(knob: str, name: str) -> Callable[[T], T]:
    """Register the decorated class or function as the implementation of ``knob=name``."""

    def add(obj: T) -> T:
        table = _REGISTRY.setdefault(knob, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{knob} {name!r} is registered twice")
        table[name] = obj
        return obj

    return add


def names(knob: str) -> tuple[str, ...]:
    """The names registered for ``knob``, in registration order."""
    if knob not in _REGISTRY:
        raise KeyError(f"no policies registered for {knob!r}")
    return tuple(_REGISTRY[knob])


def knobs() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def check(knob: str, name: object) -> str:
    """``name`` when it is registered for ``knob``; ValueError naming the choices otherwise."""
    choices = names(knob)
    if name not in choices:
        raise ValueError(f"unknown {knob} {name!r}; choose one of {', '.join(choices)}")
    return str(name)


def lookup(knob: str, name: str) -> Any:
    """The class or function registered as ``knob=name`` (ValueError for an unknown name)."""
    return _REGISTRY[knob][check(knob, name)]


def validator(knob: str) -> Callable[[str], str]:
    """A field validator (pydantic ``AfterValidator``) that accepts the names registered for ``knob``."""

    def validate(value: str) -> str:
        return check(knob, value)

    return validate


def build(knob: str, name: str, **params: Any) -> Any:
    """Construct ``knob=name`` with the ``params`` its constructor takes (by keyword; the others are
    left out, so one factory call serves policies with different knobs)."""
    target = lookup(knob, name)
    sig = inspect.signature(target)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        params = {k: v for k, v in params.items() if k in sig.parameters}
    return target(**params)
