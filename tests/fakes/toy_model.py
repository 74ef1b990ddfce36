"""A deterministic toy "model" shared by the protocol fakes, so tests can compute exact outputs.

Token ids map to text " t<id>" (EOS, id 2, has no text). The first token is a function of the
prompt; every next token a function of the previous one. Two magic last prompt tokens steer
the end: STOP_AT_FIRST makes the first token EOS (a prefill that already finished), EOS_AT_THIRD
makes the third token EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

EOS = 2
STOP_AT_FIRST = 7
EOS_AT_THIRD = 8
VOCAB = 1000


def token_text(token: int) -> str:
    return "" if token == EOS else f" t{token}"


def detokenize(tokens: list[int]) -> str:
    return "".join(token_text(t) for t in tokens)


def first_token(prompt: list[int]) -> int:
    if prompt and prompt[-1] == STOP_AT_FIRST:
        return EOS
    return (sum(prompt) * 31 + len(prompt)) % 990 + 10


def next_token(prompt: list[int], prev: int, index: int) -> int:
    """Token number `index` (0-based) after token `prev`."""
    if prompt and prompt[-1] == EOS_AT_THIRD and index == 2:
        return EOS
    return (prev * 17 + 11) % 990 + 10


@dataclass
class Step:
    tokens: list[int]      # all output tokens so far (the stopping token included)
    text: str              # visible text so far (trimmed at a matched stop string)
    finish: str | None     # None, "stop" or "length"
    matched: int | str | None = None


def trajectory(prompt: list[int], max_new_tokens: int, ignore_eos: bool = False,
               stop: list[str] | str | None = None, first: int | None = None) -> list[Step]:
    """Every step of a greedy generation (one Step per token), ending with a finish reason."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    steps: list[Step] = []
    tokens: list[int] = []
    token = first if first is not None else first_token(prompt)
    for index in range(max(1, max_new_tokens)):
        if index > 0:
            token = next_token(prompt, tokens[-1], index)
        tokens.append(token)
        full = detokenize(tokens)
        if token == EOS and not ignore_eos:
            steps.append(Step(list(tokens), full, "stop", EOS))
            return steps
        for s in stops:
            pos = full.find(s)
            if s and pos >= 0:
                steps.append(Step(list(tokens), full[:pos], "stop", s))
                return steps
        done = len(tokens) >= max_new_tokens
        steps.append(Step(list(tokens), full, "length" if done else None))
        if done:
            return steps
    return steps


def expected(prompt: list[int], max_new_tokens: int, ignore_eos: bool = False,
             stop: list[str] | None = None) -> Step:
    """The final step: what a client must end up with."""
    return trajectory(prompt, max_new_tokens, ignore_eos, stop)[-1]
