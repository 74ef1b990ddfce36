"""Prometheus metrics of the orchestrator (served at /metrics; deploy/grafana/tetri.json charts them)."""

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("tetri_requests_total", "Requests by outcome", ["outcome"])
TTFT = Histogram(
    "tetri_ttft_seconds", "Time to first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPLETION_TOKENS = Counter("tetri_completion_tokens_total", "Completion tokens streamed")
COLOCATED = Counter(
    "tetri_colocated_requests_total",
    "Requests run co-located (prefill and decode on one instance), by that instance's role and why",
    ["role", "reason"],
)
MIGRATIONS = Counter(
    "tetri_migrations_total",
    "Requests continued on another instance after a failure mid-stream (prompt + tokens so far re-prefilled)",
)
HANDOFF_FAILURES = Counter(
    "tetri_handoff_failures_total",
    "Disaggregated attempts that failed between the first token and the decode's first output (KV hand-off), "
    "by backend and status (507: decode pool full, 502: decode unreachable, 404: lease gone)",
    ["backend", "status"],
)
KV_BYTES = Counter("tetri_kv_transfer_bytes_total", "KV bytes handed from prefill to decode")
PREDICTOR_ACCURACY = Gauge("tetri_predictor_accuracy", "Live accuracy of the output-length predictor")
PREDICTOR_SAMPLES = Gauge("tetri_predictor_samples", "Requests the live predictor accuracy covers")
INSTANCES = Gauge("tetri_instances", "Registered instances by role and state", ["role", "state"])
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
E2E = Histogram(
    "tetri_e2e_latency_seconds", "Arrival to last token of finished requests (job completion time)",
    buckets=LATENCY_BUCKETS,
)
# One observation per request (its mean gap after the first token): no per-token cost on the stream.
ITL = Histogram(
    "tetri_inter_token_latency_seconds", "Mean time between a request's tokens after the first (TPOT)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FLIPS = Counter("tetri_flips_total", "Instances flipped between prefill and decode, by the role flipped to",
                ["to_role"])
INSTANCE_QUEUED = Gauge("tetri_instance_queued", "Requests queued in an instance's engine", ["instance", "role"])
INSTANCE_RUNNING = Gauge("tetri_instance_running", "Requests running in an instance's engine", ["instance", "role"])
INSTANCE_KV_USED = Gauge("tetri_instance_kv_used_ratio", "Share of an instance's KV pool in use (0..1)",
                         ["instance", "role"])
INSTANCE_PREFIX_HIT = Gauge(
    "tetri_instance_prefix_cache_hit_ratio",
    "Share of an instance's prompt tokens served from its prefix cache since it started (engines with one)",
    ["instance", "role"],
)
INSTANCE_CACHED_BLOCKS = Gauge(
    "tetri_instance_prefix_cache_blocks", "KV blocks an instance holds in its prefix cache", ["instance", "role"]
)
_GAUGES = (INSTANCE_QUEUED, INSTANCE_RUNNING, INSTANCE_KV_USED, INSTANCE_PREFIX_HIT, INSTANCE_CACHED_BLOCKS)
_instance_labels: set[tuple[str, str]] = set()


def observe_instances(instances: Iterable[Any]) -> None:
    """Per-instance gauges from the instances' last load reports (each monitor tick); the label sets
    of instances gone or flipped since are dropped, so a dashboard does not show them frozen."""
    seen: set[tuple[str, str]] = set()
    for inst in instances:
        load = inst.load
        if load is None:
            continue
        labels = (str(inst.id), str(inst.role))
        seen.add(labels)
        INSTANCE_QUEUED.labels(*labels).set(load.queued)
        INSTANCE_RUNNING.labels(*labels).set(load.running)
        total = load.total_kv_tokens
        INSTANCE_KV_USED.labels(*labels).set((total - load.free_kv_tokens) / total if total else 0.0)
        if load.prefix_query_tokens:
            INSTANCE_PREFIX_HIT.labels(*labels).set(load.prefix_hit_tokens / load.prefix_query_tokens)
            INSTANCE_CACHED_BLOCKS.labels(*labels).set(load.cached_blocks)
    for labels in _instance_labels - seen:
        for gauge in _GAUGES:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
    _instance_labels.clear()
    _instance_labels.update(seen)
