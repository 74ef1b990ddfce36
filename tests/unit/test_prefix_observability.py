"""Prefix caching is observable: the per-instance hit ratio and cached blocks in Prometheus (labels
dropped with the instance), and the cache in /admin/instances' listing, from the load report."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from backends.base import KVEvents, LoadReport
from orchestrator import metrics
from orchestrator.cluster import Cluster
from orchestrator.config import InstanceSpec


def _prefix_lines() -> list[str]:
    return [ln for ln in generate_latest().decode().splitlines() if "prefix_cache" in ln and not ln.startswith("#")]


def test_hit_ratio_and_blocks_per_instance_in_prometheus():
    load = LoadReport(role="decode", total_kv_tokens=100, free_kv_tokens=50, prefix_query_tokens=200,
                      prefix_hit_tokens=150, cached_blocks=7)  # fmt: skip
    metrics.observe_instances([SimpleNamespace(id="d0", role="decode", load=load)])
    assert 'tetri_instance_prefix_cache_hit_ratio{instance="d0",role="decode"} 0.75' in _prefix_lines()
    assert 'tetri_instance_prefix_cache_blocks{instance="d0",role="decode"} 7.0' in _prefix_lines()
    metrics.observe_instances([])
    assert _prefix_lines() == []


def test_the_listing_shows_the_cache_and_leaves_the_block_events_out():
    inst = Cluster().add(InstanceSpec(url="http://d0.invalid", role="decode", id="d0"))
    assert inst.describe()["prefix_cache"] is None  # no load report yet
    inst.load = LoadReport(role="decode", cached_blocks=12, prefix_query_tokens=400, prefix_hit_tokens=100,
                           kv_events=KVEvents(seq=3, stored=[1, 2, 3]))  # fmt: skip
    row = inst.describe()
    assert row["prefix_cache"] == {"cached_blocks": 12, "hit_rate": 0.25, "hit_tokens": 100, "query_tokens": 400}
    assert "kv_events" not in row["last_load"]


def test_load_reports_carry_block_events_over_the_wire():
    load = LoadReport.from_dict({"role": "decode", "kv_events": {"seq": 9, "reset": True, "stored": [5, 6]}})
    assert load.kv_events == KVEvents(seq=9, reset=True, stored=[5, 6], removed=[])


def test_block_events_read_at_registration_reach_the_prefix_index():
    """An adapter hands each block event out once: the report read by the health check (a worker
    registered with a warm cache) must reach the index as the monitor's polls do."""
    import asyncio

    from orchestrator.config import Settings
    from orchestrator.monitor import ClusterMonitor
    from orchestrator.placement import Placement

    class Warm:
        role = "decode"

        async def load(self) -> LoadReport:
            return LoadReport(role="decode", kv_events=KVEvents(seq=4, reset=True, stored=[11, 12]))

    cluster = Cluster()
    inst = cluster.create(InstanceSpec(url="http://d0.invalid", role="decode", id="d0"))
    inst.backend = Warm()  # type: ignore[assignment]
    placement = Placement(Settings(database_url="sqlite://"), cluster)
    monitor = ClusterMonitor(cluster)
    monitor.on_kv_events.append(lambda i, ev: placement.prefixes.apply(i.id, ev.reset, ev.stored, ev.removed))
    assert asyncio.run(monitor.check_health(inst, 1.0)) is None
    assert placement.prefixes.match("d0", [11, 12, 13], now=0.0) == 2
