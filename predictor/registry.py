"""``load_predictor``: the one entry point the orchestrator and benchmarks use."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from predictor.baselines import ConstantPredictor, OraclePredictor

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "default.joblib"
NAMES = ("learned", "oracle", "constant")
_LOCK = threading.Lock()
_MODELS: dict[Path, Any] = {}


@runtime_checkable
class LengthPredictor(Protocol):
    granularity: int

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None,
                       meta: dict | None = None) -> int: ...


def artifact_path() -> Path:
    """``TETRI_PREDICTOR_ARTIFACT`` if set (a model from ``tetri predictor train --out``), else the shipped one."""
    env = os.environ.get("TETRI_PREDICTOR_ARTIFACT")
    return Path(env).expanduser() if env else ARTIFACT


def load_model(path: Path | None = None) -> Any:
    """The stacked model behind "learned" (loaded once per path, shared by all predictors)."""
    from predictor.model import StackedModel

    path = path or artifact_path()
    with _LOCK:
        if path not in _MODELS:
            if not path.exists():
                raise FileNotFoundError(f"no trained predictor at {path}; run `tetri predictor train`")
            _MODELS[path] = StackedModel.load(path)
        return _MODELS[path]


def load_predictor(name: str, granularity: int = 200, **kwargs: Any) -> LengthPredictor:
    """``learned`` (the trained model; ``path=`` picks another artifact), ``oracle`` or ``constant``
    (``bucket=`` picks the bucket, default 0)."""
    if name == "oracle":
        return OraclePredictor(granularity, kwargs.get("num_buckets"))
    if name == "constant":
        return ConstantPredictor(granularity, int(kwargs.get("bucket", 0)))
    if name == "learned":
        from predictor.model import LearnedPredictor

        path = kwargs.get("path")
        return LearnedPredictor(load_model(Path(path) if path else None), granularity)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(NAMES)}")
