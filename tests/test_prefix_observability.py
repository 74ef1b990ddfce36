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
