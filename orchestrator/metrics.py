"""Prometheus metrics of the orchestrator (served at /metrics)."""

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
