"""orchestrator/leader.py's InstanceSync: an instance this replica deregistered is not registered
again from its own row while that row's "removed" save is still behind (a scaled-down worker came
back as a dead instance that way); a peer's later registration of the same id still is."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from orchestrator.cluster import Cluster
from orchestrator.config import InstanceSpec
from orchestrator.leader import InstanceSync


class _Rows:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def list_instances(self) -> list[dict[str, Any]]:
        return self.rows


def _row(updated_at: float) -> dict[str, Any]:
    return {"id": "decode-2", "state": "healthy", "url": "http://127.0.0.1:9", "backend": "native",
            "role": "decode", "model": "m", "options": {}, "updated_at": updated_at}


async def _tick(row: dict[str, Any], removed_at: float | None) -> list[InstanceSpec]:
    registered: list[InstanceSpec] = []

    async def register(spec: InstanceSpec) -> None:
        registered.append(spec)

    async def forget(_inst: Any) -> None:
        pass

    sync = InstanceSync(_Rows([row]), Cluster(), register, forget, lambda _inst: None)  # type: ignore[arg-type]
    if removed_at is not None:
        sync.removed_at["decode-2"] = removed_at
    await sync.tick()
    await asyncio.gather(*sync._tasks)
    return registered


def test_a_row_older_than_this_replicas_deregistration_does_not_bring_the_instance_back():
    now = time.time()
    assert asyncio.run(_tick(_row(now - 1.0), removed_at=now)) == []


def test_a_peers_later_registration_of_the_same_id_is_followed():
    now = time.time()
    assert [s.id for s in asyncio.run(_tick(_row(now + 1.0), removed_at=now))] == ["decode-2"]
    assert [s.id for s in asyncio.run(_tick(_row(now), removed_at=None))] == ["decode-2"]
