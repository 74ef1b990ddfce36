"""Output-length predictors the dispatcher and admission use (TetriInfer §3.3.2).

A predictor maps a prompt to an output-length *bucket*: bucket k covers ``[k*g, (k+1)*g)`` tokens
for granularity g (``predictor_granularity``, default 200); resources are sized by the lower end
(``RequestView.predicted_output_lo``). Interface (the real, learned predictor in ``predictor/``
implements the same method)::

    predict_bucket(prompt: str, prompt_tokens: int | None = None, meta: dict | None = None) -> int

* ``oracle``: the bucket of the true output length, ``meta["output_len"] // g`` (benchmarks and the
  simulator know it); raises :class:`MissingOutputLength` when the metadata lacks it.
* ``constant``: always the same bucket (default 0: every decode light, ``kv_need`` = prompt only).
* ``learned``: ``predictor.load_predictor(name, granularity)``, imported only when asked for.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from orchestrator.policies.registry import build, names, register


@runtime_checkable
class LengthPredictor(Protocol):
    def predict_bucket(
        self, prompt: str, prompt_tokens: int | None = None, meta: dict[str, Any] | None = None
    ) -> int: ...


class MissingOutputLength(KeyError, ValueError):
    """The oracle predictor was asked about a request whose metadata has no ``output_len``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "missing output_len"


@register("predictor", "oracle")
class OraclePredictor:
    name = "oracle"

    def __init__(self, granularity: int = 200) -> None:
        if granularity < 1:
            raise ValueError(f"predictor_granularity must be >= 1, got {granularity}")
        self.granularity = int(granularity)

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict[str, Any] | None = None) -> int:
        if not meta or meta.get("output_len") is None:
            raise MissingOutputLength(
                "the oracle predictor needs the true output length in meta['output_len'] "
                "(benchmark requests carry it; use predictor=constant or learned otherwise)"
            )
        n = int(meta["output_len"])
        if n < 0:
            raise ValueError(f"meta['output_len'] must be >= 0, got {n}")
        return n // self.granularity


@register("predictor", "constant")
class ConstantPredictor:
    name = "constant"

    def __init__(self, bucket: int = 0, granularity: int = 200) -> None:
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0, got {bucket}")
        self.bucket = int(bucket)
        self.granularity = int(granularity)

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict[str, Any] | None = None) -> int:
        return self.bucket


def bucket_of(output_len: int, granularity: int) -> int:
    return max(0, int(output_len)) // int(granularity)


@register("predictor", "learned")
def _learned(granularity: int = 200, **kwargs: Any) -> LengthPredictor:
    try:
        from predictor import load_predictor  # noqa: PLC0415 - optional, heavy dependency
    except ImportError as exc:
        raise RuntimeError(
            f"predictor=learned needs the predictor package (predictor.load_predictor); it could not be imported: {exc}"
        ) from exc
    return load_predictor("learned", granularity, **kwargs)


PREDICTOR_NAMES: tuple[str, ...] = names("predictor")


def make_predictor(name: str, granularity: int = 200, **kwargs: Any) -> LengthPredictor:
    return build("predictor", name, granularity=granularity, **kwargs)
