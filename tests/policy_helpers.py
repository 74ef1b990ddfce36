"""Views, hypothesis strategies and a spying Random shared by the scheduling-policy tests
(tests/unit/test_policies.py, test_prefill_queue.py, test_dispatch.py, test_admission.py, test_flip.py)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from orchestrator.policies.types import InstanceView, RequestView

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# helpers and strategies
# ---------------------------------------------------------------------------------------------------
def inst(id: str = "i0", role: str = "decode", total: int = 10_000, free: int | None = None, **kw) -> InstanceView:
    return InstanceView(id=id, role=role, total_kv_tokens=total, free_kv_tokens=total if free is None else free, **kw)  # type: ignore[arg-type]


def req(id: str = "r", prompt: int = 100, bucket: int | None = None, arrival: float = 0.0, max_tokens: int = 4096,
        granularity: int = 200) -> RequestView:  # fmt: skip
    return RequestView(id=id, arrival=arrival, prompt_tokens=prompt, max_tokens=max_tokens,
                       predicted_bucket=bucket, granularity=granularity)  # fmt: skip


@st.composite
def requests(draw, id: str = "r") -> RequestView:
    return RequestView(
        id=id,
        arrival=draw(st.floats(0, 1000, allow_nan=False)),
        prompt_tokens=draw(st.integers(0, 3000)),
        max_tokens=draw(st.integers(1, 4000)),
        predicted_bucket=draw(st.none() | st.integers(0, 12)),
        granularity=draw(st.sampled_from([100, 200, 400])),
        heavy_decode_threshold=draw(st.sampled_from([0, 128, 512])),
    )


@st.composite
def instance_views(draw, id: str = "i0", role: str | None = None) -> InstanceView:
    total = draw(st.integers(0, 8000))
    free = draw(st.integers(0, total))
    running = draw(st.integers(0, 12))
    heavy = draw(st.integers(0, running))
    n_pred = draw(st.integers(0, running))
    remaining = tuple(draw(st.lists(st.integers(0, 2000), min_size=n_pred, max_size=n_pred)))
    return InstanceView(
        id=id,
        role=role or draw(st.sampled_from(["prefill", "decode", "colocated"])),
        total_kv_tokens=total,
        free_kv_tokens=free,
        healthy=draw(st.booleans()) or draw(st.booleans()),
        accepting=draw(st.booleans()) or draw(st.booleans()),
        queued_prompt_tokens=draw(st.integers(0, 5000)),
        running_prompt_tokens=draw(st.integers(0, 5000)),
        running=running,
        queued=draw(st.integers(0, 5)),
        heavy_decodes=heavy,
        light_decodes=running - heavy,
        decode_remaining=remaining,
        reserved_kv_tokens=draw(st.integers(0, 3000)),
    )


@st.composite
def fleets(draw, role: str | None = None, min_size: int = 0, max_size: int = 8) -> list[InstanceView]:
    n = draw(st.integers(min_size, max_size))
    return [draw(instance_views(id=f"i{k:02d}", role=role)) for k in range(n)]


@st.composite
def decode_fleets(draw, min_size: int = 0, max_size: int = 8) -> list[InstanceView]:
    """Decode instances, lighter to draw than ``fleets`` (the dispatcher ignores the rest)."""
    n = draw(st.integers(min_size, max_size))
    out = []
    for k in range(n):
        free, reserved, heavy, light, flags = draw(
            st.tuples(
                st.integers(0, 6000),
                st.integers(0, 1500),
                st.integers(0, 6),
                st.integers(0, 6),
                st.sampled_from([(True, True)] * 5 + [(False, True), (True, False)]),
            )  # fmt: skip
        )
        out.append(inst(f"d{k:02d}", total=6000, free=free, reserved_kv_tokens=reserved, heavy_decodes=heavy,
                        light_decodes=light, running=heavy + light, healthy=flags[0], accepting=flags[1]))  # fmt: skip
    return out


class SpyRandom(random.Random):
    """A seeded Random that remembers what ``sample`` returned (the power-of-d candidates)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.samples: list[list] = []

    def sample(self, population, k, **kw):  # type: ignore[override]
        out = super().sample(population, k, **kw)
        self.samples.append(list(out))
        return out
