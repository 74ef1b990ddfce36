"""Turning logits into tokens: greedy at temperature 0, else temperature + top-p sampling.

Seeded requests draw each output position from its own generator seeded by (seed, position), so
the token at position i does not depend on how the request was batched, chunked or split across
a prefill and a decode instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backends.base import SamplingParams

GREEDY_EPS = 1e-5
_MASK64 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for output position `position` of a request seeded with `seed`."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK64


# This engine's defaults for what a client left unset (None in SamplingParams): OpenAI's.
DEFAULT_TEMPERATURE = 1.0


def temperature_of(params: SamplingParams) -> float:
    return DEFAULT_TEMPERATURE if params.temperature is None else params.temperature


def is_greedy(params: SamplingParams) -> bool:
    return temperature_of(params) <= GREEDY_EPS


def _sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    probs = torch.softmax(logits.float().cpu() / float(temperature_of(params)), dim=-1)
    top_p = params.top_p if params.top_p is not None else 1.0
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token: a
        # top_p below float32's range (5e-324) rounds to 0, and 0 >= 0 would drop every token.
        drop = (cum - sorted_probs) >= top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(position_seed(params.seed, position))
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> list[int]:
    """One token per row of `logits` [S, vocab]; `positions` are output indices (0 = first token)."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if is_greedy(p)]
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, tok in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
            out[i] = tok
    for i, p in enumerate(params):
        if not is_greedy(p):
            out[i] = _sample_row(logits[i], p, positions[i])
    return out
