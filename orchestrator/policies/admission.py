"""Decode admission (TetriInfer §3.4, "working-set-aware local scheduling"): may this decode instance
take this request now?

All policies are admission gates only: once admitted, a request's KV still grows one token per step.
``available`` below is ``free_kv_tokens - reserved_kv_tokens`` (see capacity.py).

* ``greedy`` (vLLM-like): the prompt's KV plus one generated token fits now:
  ``available >= prompt_tokens + 1``. Future growth is ignored.
* ``reserve_static``: :func:`fits`: ``available >= prompt_tokens + predicted_output_lo``.
* ``reserve_dynamic``: :func:`fits` *and* a look-ahead to the moment the shortest running decode is
  predicted to finish. With ``r_1..r_n`` the predicted remaining tokens of the running decodes
  (``decode_remaining``, lower end of their buckets), horizon ``m = max(1, min r_i)``; decodes the
  view counts as running but reports no prediction for (``running - len(decode_remaining)`` of them)
  are assumed to keep growing for the whole horizon. Admit iff
  ``prompt_tokens + min(predicted_output_lo, m) + m * n_running <= available``
  (each running decode grows by ``min(r_i, m) = m`` tokens until then; the new one by at most ``m``
  of its own predicted tokens). With no running decode, or when the view carries no predictions at
  all (an engine that does not report ``decode_remaining``), there is no horizon and the rule is
  ``fits``, i.e. ``reserve_static``. Because ``fits`` is required too, it never admits a request
  whose predicted working set exceeds what is available, and it is never looser than
  ``reserve_static``.

Any of them can be capped (``decode_max_running`` > 0, :class:`CappedAdmission`): the instance also
refuses while it runs that many requests (decodes and prompts being prefilled), a batch cap derived
from the TPOT SLO (orchestrator/policies/tpot.py). 0: no cap.
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.registry import lookup, names, register
from orchestrator.policies.types import InstanceView, RequestView


class DecodeAdmission(Protocol):
    name: str

    def admits(self, inst: InstanceView, req: RequestView) -> bool: ...


@register("decode_admission", "greedy")
class Greedy:
    name = "greedy"

    def admits(self, inst: InstanceView, req: RequestView) -> bool:
        return available_kv(inst) >= req.prompt_tokens + 1


@register("decode_admission", "reserve_static")
class ReserveStatic:
    name = "reserve_static"

    def admits(self, inst: InstanceView, req: RequestView) -> bool:
        return fits(inst, req)


def lookahead_need(inst: InstanceView, req: RequestView) -> int:
    """KV tokens needed from now until the shortest running decode is predicted to finish, counting
    the new request's prompt and growth and every running decode's growth (see module docstring)."""
    remaining = inst.decode_remaining
    n_running = max(inst.running, len(remaining))
    if n_running == 0:
        return req.kv_need
    if remaining:
        horizon = max(1, min(remaining))
    else:
        # Running decodes but no predictions at all: no horizon to look ahead to.
        return req.kv_need
    return req.prompt_tokens + min(req.predicted_output_lo, horizon) + horizon * n_running


@register("decode_admission", "reserve_dynamic")
class ReserveDynamic:
    name = "reserve_dynamic"

    def admits(self, inst: InstanceView, req: RequestView) -> bool:
        if not fits(inst, req):
            return False
        return lookahead_need(inst, req) <= available_kv(inst)


ADMISSION_POLICY_NAMES: tuple[str, ...] = names("decode_admission")


class CappedAdmission:
    """``base``, and fewer than ``max_running`` requests running there (a batch cap: a longer step
    than the TPOT SLO allows is refused, the prompt waits in our queue instead)."""

    def __init__(self, base: DecodeAdmission, max_running: int) -> None:
        self.base = base
        self.max_running = max_running
        self.name = f"{base.name}+cap{max_running}"

    def admits(self, inst: InstanceView, req: RequestView) -> bool:
        return inst.running < self.max_running and self.base.admits(inst, req)


def make_admission(name: str, max_running: int = 0) -> DecodeAdmission:
    base: DecodeAdmission = lookup("decode_admission", name)()
    return CappedAdmission(base, max_running) if max_running > 0 else base
