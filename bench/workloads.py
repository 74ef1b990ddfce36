"""Benchmark workloads: ShareGPT classes, synthetic fixed lengths, JSONL trace replay, Poisson arrivals.

Classes (TetriInfer §5): a request is heavy-prefill (HP) when its prompt has more than 512 tokens and
heavy-decode (HD) when it generates more than 128 tokens; LP/LD otherwise. Workload names:

* ``LPLD``, ``LPHD``, ``HPLD``, ``HPHD``: ShareGPT requests of one class only;
* ``Mixed``: uniform over the four classes (equal counts, shuffled);
* ``Mixed-natural``: ShareGPT's own class proportions;
* ``synthetic:P:O``: every request has P prompt tokens and O output tokens;
* ``trace:PATH``: replay a JSONL trace (``arrival`` s, ``prompt`` or ``prompt_tokens``, ``output_tokens``);
* ``sessions[:...]``, ``shared-prefix[:...]``: multi-turn ShareGPT sessions and shared system prompts,
  closed-loop, built by bench/sessions.py (``tetri bench compare`` loads them through bench/spec.py).

Every request carries its exact output length; a live run enforces it with ``max_tokens`` and the
``ignore_eos`` extension, so every run of a workload does the same work. Arrivals are Poisson at
``rate`` requests/s (``inf``/0: all at t=0) from a seeded RNG; identical seeds give identical workloads.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

CLASSES = ("LPLD", "LPHD", "HPLD", "HPHD")
WORKLOADS = (*CLASSES, "Mixed", "Mixed-natural")
HEAVY_PREFILL = 512
HEAVY_DECODE = 128


def classify(prompt_tokens: int, output_tokens: int, hp: int = HEAVY_PREFILL, hd: int = HEAVY_DECODE) -> str:
    return ("HP" if prompt_tokens > hp else "LP") + ("HD" if output_tokens > hd else "LD")


@dataclass
class BenchRequest:
    id: str
    arrival: float  # seconds after the start of the run
    prompt_tokens: int
    output_tokens: int  # exact: max_tokens with ignore_eos
    cls: str = ""
    prompt: str | None = None
    source_index: int | None = None

    def __post_init__(self) -> None:
        if not self.cls:
            self.cls = classify(self.prompt_tokens, self.output_tokens)

    def prompt_text(self) -> str:
        """Text to send: the recorded prompt, the ShareGPT prompt, or a synthetic one of about the
        right token count (one word per token for SmolLM2's BPE)."""
        if self.prompt is not None:
            return self.prompt
        if self.source_index is not None:
            try:
                from bench.sharegpt import prompt_text

                return prompt_text(self.source_index)
            except Exception:
                pass
        return synthetic_prompt(self.prompt_tokens, seed=hash(self.id) & 0xFFFF)

    def openai_body(self, model: str, stream: bool = True, use_text: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": self.prompt_text() if use_text else [1] * self.prompt_tokens,
            "max_tokens": self.output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their has been if more when will would who so no"
).split()


def synthetic_prompt(tokens: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, tokens)))


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def class_counts(self) -> dict[str, int]:
        out = {c: 0 for c in CLASSES}
        for r in self.requests:
            out[r.cls] = out.get(r.cls, 0) + 1
        return out

    def stats(self) -> dict[str, Any]:
        n = max(1, len(self.requests))
        return {
            "name": self.name,
            "requests": len(self.requests),
            "mean_prompt_tokens": sum(r.prompt_tokens for r in self.requests) / n,
            "mean_output_tokens": sum(r.output_tokens for r in self.requests) / n,
            "classes": self.class_counts(),
            "duration_s": self.duration,
            **{k: v for k, v in self.meta.items() if k not in ("name",)},
        }

    def with_arrivals(self, rate: float, seed: int = 0) -> Workload:
        arr = poisson_arrivals(len(self.requests), rate, seed)
        reqs = [replace(r, arrival=a) for r, a in zip(self.requests, arr, strict=True)]
        return Workload(self.name, reqs, {**self.meta, "rate": rate, "arrival_seed": seed})

    def scaled(self, factor: float, max_prompt: int | None = None, max_output: int | None = None) -> Workload:
        """Shrink lengths (for small live runs); classes keep their original labels."""
        reqs = []
        for r in self.requests:
            p = max(1, round(r.prompt_tokens * factor))
            o = max(1, round(r.output_tokens * factor))
            if max_prompt:
                p = min(p, max_prompt)
            if max_output:
                o = min(o, max_output)
            reqs.append(replace(r, prompt_tokens=p, output_tokens=o, prompt=None, source_index=None))
        return Workload(self.name, reqs, {**self.meta, "length_scale": factor})

    # --- JSONL ------------------------------------------------------------------------------------
    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for r in self.requests:
                d = {k: v for k, v in asdict(r).items() if v is not None}
                f.write(json.dumps(d) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None) -> Workload:
        reqs: list[BenchRequest] = []
        with open(path) as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                reqs.append(_trace_record(json.loads(line), i))
        reqs.sort(key=lambda r: r.arrival)
        if reqs:
            t0 = reqs[0].arrival
            if t0 > 1e6:  # absolute UNIX timestamps: make them relative
                for r in reqs:
                    r.arrival -= t0
        return Workload(name or f"trace:{Path(path).name}", reqs, {"source": str(path)})


def _trace_record(d: dict[str, Any], i: int) -> BenchRequest:
    arrival = float(d.get("arrival", d.get("arrival_s", d.get("timestamp", d.get("time", 0.0)))))
    prompt = d.get("prompt")
    ptoks = d.get("prompt_tokens", d.get("prompt_len", d.get("input_length", d.get("input_tokens"))))
    if ptoks is None:
        if prompt is None:
            raise ValueError(f"trace line {i + 1}: needs prompt or prompt_tokens")
        ptoks = _count_tokens(prompt)
    otoks = d.get("output_tokens", d.get("output_len", d.get("output_length", d.get("max_tokens"))))
    if otoks is None:
        raise ValueError(f"trace line {i + 1}: needs output_tokens")
    return BenchRequest(
        id=str(d.get("id", f"r{i}")),
        arrival=arrival,
        prompt_tokens=int(ptoks),
        output_tokens=int(otoks),
        cls=str(d.get("cls", "")),
        prompt=prompt,
    )


def _count_tokens(text: str) -> int:
    try:
        from bench.sharegpt import tokenizer

        return len(tokenizer()(text, add_special_tokens=False)["input_ids"])
    except Exception:
        return max(1, len(text) // 4)


def poisson_arrivals(n: int, rate: float, seed: int = 0, start: float = 0.0) -> list[float]:
    """n Poisson arrival times at `rate` req/s (exponential gaps); rate 0 or inf: all at `start`."""
    if n <= 0:
        return []
    if not rate or math.isinf(rate):
        return [start] * n
    rng = random.Random(seed)
    t = start
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def parse_rates(spec: str | float | None) -> list[float]:
    """'4' -> [4.0]; '1,2,4' -> sweep; '1:8:1' -> 1..8 step 1; 'inf' -> burst."""
    if spec is None:
        return []
    if isinstance(spec, int | float):
        return [float(spec)]
    spec = spec.strip()
    if ":" in spec:
        a, b, *s = (float(x) for x in spec.split(":"))
        step = s[0] if s else 1.0
        out, x = [], a
        while x <= b + 1e-9:
            out.append(round(x, 6))
            x += step
        return out
    return [float(x) for x in spec.split(",") if x.strip()]


# --- pools ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolItem:
    prompt_tokens: int
    output_tokens: int
    index: int | None = None
    id: str | None = None


def sharegpt_pool(max_context: int | None = None) -> list[PoolItem]:
    from bench.sharegpt import load_samples

    pool = [PoolItem(s.prompt_tokens, s.output_tokens, s.index, s.id) for s in load_samples()]
    if max_context:
        pool = [p for p in pool if p.prompt_tokens + p.output_tokens <= max_context]
    return pool


def sample_class(
    pool: Sequence[PoolItem], name: str, n: int, rng: random.Random, hp: int = HEAVY_PREFILL, hd: int = HEAVY_DECODE
) -> list[PoolItem]:
    """n items of workload `name` (a class, Mixed or Mixed-natural) drawn from `pool`."""
    if name == "Mixed-natural":
        return _draw(list(pool), n, rng)
    if name == "Mixed":
        buckets = {c: [p for p in pool if classify(p.prompt_tokens, p.output_tokens, hp, hd) == c] for c in CLASSES}
        counts = {c: n // 4 for c in CLASSES}
        for c in rng.sample(CLASSES, n % 4):
            counts[c] += 1
        items: list[PoolItem] = []
        for c in CLASSES:
            if counts[c] and not buckets[c]:
                raise ValueError(f"no {c} request in the pool")
            items.extend(_draw(buckets[c], counts[c], rng))
        rng.shuffle(items)
        return items
    if name in CLASSES:
        bucket = [p for p in pool if classify(p.prompt_tokens, p.output_tokens, hp, hd) == name]
        if not bucket:
            raise ValueError(f"no {name} request in the pool")
        return _draw(bucket, n, rng)
    raise ValueError(f"unknown workload class {name!r}; known: {', '.join(WORKLOADS)}")


def _draw(bucket: list[PoolItem], n: int, rng: random.Random) -> list[PoolItem]:
    if n <= len(bucket):
        return rng.sample(bucket, n)
    return [rng.choice(bucket) for _ in range(n)]


def build_workload(
    name: str,
    n: int = 500,
    rate: float | None = None,
    seed: int = 0,
    max_context: int | None = 4096,
    pool: Sequence[PoolItem] | None = None,
    hp: int = HEAVY_PREFILL,
    hd: int = HEAVY_DECODE,
) -> Workload:
    """Build a named workload (see module doc). `pool` overrides ShareGPT (tests, other datasets)."""
    rng = random.Random(seed)
    meta: dict[str, Any] = {"seed": seed, "max_context": max_context}
    if name.startswith("trace:"):
        wl = Workload.from_jsonl(name[len("trace:") :])
        if n and n < len(wl.requests):
            wl.requests = wl.requests[:n]
        if rate is not None:
            wl = wl.with_arrivals(rate, seed)
        return wl
    if name.startswith("synthetic"):
        parts = name.split(":")
        if len(parts) != 3:
            raise ValueError("synthetic workloads are named synthetic:PROMPT_TOKENS:OUTPUT_TOKENS")
        p, o = int(parts[1]), int(parts[2])
        reqs = [BenchRequest(f"{name}-{i}", 0.0, p, o) for i in range(n)]
        meta["source"] = "synthetic"
    else:
        src = "custom" if pool is not None else "sharegpt"
        items_pool = pool if pool is not None else sharegpt_pool(max_context)
        if pool is not None and max_context:
            items_pool = [x for x in items_pool if x.prompt_tokens + x.output_tokens <= max_context]
        items = sample_class(items_pool, name, n, rng, hp, hd)
        reqs = [
            BenchRequest(
                id=f"{name}-{i}",
                arrival=0.0,
                prompt_tokens=it.prompt_tokens,
                output_tokens=it.output_tokens,
                cls=classify(it.prompt_tokens, it.output_tokens, hp, hd),
                source_index=it.index,
            )
            for i, it in enumerate(items)
        ]
        meta["source"] = src
    wl = Workload(name, reqs, meta)
    return wl.with_arrivals(rate if rate is not None else math.inf, seed + 1)


def iter_rates(name: str, rates: Iterable[float], **kw: Any) -> Iterable[Workload]:
    """A rate sweep: the same requests re-timed at each rate."""
    base = build_workload(name, rate=None, **kw)
    for r in rates:
        yield base.with_arrivals(r, kw.get("seed", 0) + 1)
