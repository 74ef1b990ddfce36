"""Fixtures of the built-in engine's tests (helpers.py has the plain helpers)."""

from __future__ import annotations

import random

import pytest
import torch

from backends.engines.native.engine import NativeEngine
from backends.engines.native.model_source import load_model
from tests.engine.helpers import N_TOKENS, PROMPT_LENGTHS, TINY, hf_greedy, make


@pytest.fixture(scope="module")
def tiny_hf():
    model, tokenizer, _ = load_model(TINY, dtype=torch.float32)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 49000) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def references(tiny_hf, prompts) -> list[list[int]]:
    return [hf_greedy(tiny_hf, p, N_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def engine() -> NativeEngine:
    return make()
