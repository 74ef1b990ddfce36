"""The pool planner plans for the system that is deployed: the simulator runs the deployment's own
policy configuration (Settings.policy_config()), not a preset."""

from __future__ import annotations

import random
from types import SimpleNamespace

from orchestrator.config import Settings
from orchestrator.pool_planner import recommend_for_traffic


class _Store:
    def __init__(self, rows: list[dict[str, float]]) -> None:
        self.rows = rows

    def flush(self) -> None:
        pass

    def recent_traffic(self, since: float) -> list[dict[str, float]]:
        return self.rows


def _state(settings: Settings) -> SimpleNamespace:
    rng = random.Random(0)
    rows = [{"arrival": i / 20, "prompt_tokens": rng.randint(50, 400), "completion_tokens": rng.randint(20, 300)}
            for i in range(400)]  # fmt: skip
    backend = SimpleNamespace(generates_on_decode=True)
    insts = {f"{r}{k}": SimpleNamespace(id=f"{r}{k}", role=r, state="healthy", backend=backend)
             for r in ("prefill", "decode") for k in range(2)}  # fmt: skip
    return SimpleNamespace(settings=settings, store=_Store(rows), cluster=SimpleNamespace(instances=insts))


def test_the_plan_simulates_the_deployed_policies():
    for settings in (
        Settings(database_url="sqlite://"),
        Settings(database_url="sqlite://", prefill_policy="sjf", dispatch_policy="least_loaded", late_binding="none"),
    ):
        plan = recommend_for_traffic(_state(settings), 60.0, "balanced", "h100-llama-2-7b", 4, 200.0)
        assert plan["policy"] == settings.policy_config().to_dict()
        assert plan["recommended"]["prefill"] + plan["recommended"]["decode"] == 4
