"""Every tunable of tetri, from `TETRI_<NAME>` environment variables or a YAML file.

Defaults are the TetriInfer paper's where it gives one (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backends.engines.paths import cache_dir as cache_dir  # re-exported: the worker side owns the rule
from orchestrator.policies import registry
from orchestrator.policies.config import POLICY_KNOBS, PolicyConfig

Role = Literal["prefill", "decode", "colocated"]
BackendKind = Literal["native", "sglang", "tensorrt-llm", "sim"]


def _key_list(value: Any) -> Any:
    """TETRI_API_KEYS as `k1,k2` or a JSON list; blanks dropped (an empty key must not open the API)."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else value.split(",")
    if isinstance(value, list):
        return [k.strip() if isinstance(k, str) else k for k in value if not isinstance(k, str) or k.strip()]
    return value


def data_dir() -> Path:
    """Where records live (the SQLite database): data, not cache, so a cache wipe keeps them.
    TETRI_DATA_DIR, else $XDG_DATA_HOME/tetri, else ~/.local/share/tetri."""
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    path = Path(os.environ.get("TETRI_DATA_DIR") or Path(xdg) / "tetri")
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_database_url() -> str:
    db = data_dir() / "tetri.db"
    legacy = Path(os.environ.get("TETRI_CACHE_DIR", Path.home() / ".cache" / "tetri")) / "tetri.db"
    # Earlier versions kept the database in the cache: keep using it rather than start empty.
    if not db.exists() and legacy.exists():
        return f"sqlite:///{legacy}"
    return f"sqlite:///{db}"


class InstanceSpec(BaseModel):
    """An engine instance the orchestrator drives (from YAML or POST /admin/instances)."""

    url: str
    backend: BackendKind = "native"
    role: Role = "colocated"
    model: str | None = None
    id: str | None = None
    # Backend-specific extras (e.g. SGLang bootstrap port), passed to the adapter untouched.
    options: dict[str, Any] = Field(default_factory=dict)


class K8sPool(BaseModel):
    """One pool's Kubernetes workload (pool_provider=kubernetes): what PUT /admin/pools/{role} scales,
    and how its Ready pods are registered."""

    # "deployment/<name>" or "statefulset/<name>" in k8s_namespace
    workload: str = Field(pattern=r"^(deployment|statefulset)/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    backend: BackendKind = "native"
    model: str | None = None
    port: int | str | None = None  # container port (number or name); unset: the first one declared
    options: dict[str, Any] = Field(default_factory=dict)  # adapter options, as InstanceSpec.options


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TETRI_", extra="ignore")

    # --- serving ---
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    mode: Literal["auto", "colocated", "disaggregated"] = "auto"
    database_url: str = Field(default_factory=default_database_url)
    admin_token: str | None = None
    # Client keys of the OpenAI API (`Authorization: Bearer <key>`, as vLLM's --api-key); empty: open.
    api_keys: Annotated[list[str], NoDecode, BeforeValidator(_key_list)] = Field(default_factory=list)
    max_queued_requests: int = 1024
    # max_tokens when a request gives none (capped by the context left after the prompt).
    default_max_tokens: int = 256
    request_timeout_s: float = 600.0
    # Connections to one instance, all told: from 16 up, an eighth (8 at most) for load polls,
    # health and aborts, the rest one per request stream (a full pool is "busy": the request waits
    # up to backend_acquire_timeout_s, then 503 with Retry-After; never a health verdict).
    backend_max_connections: int = Field(default=256, ge=1)
    backend_acquire_timeout_s: float = Field(default=10.0, gt=0.0)
    # Request bodies past this many bytes get 413 before they are read whole.
    max_request_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    instances: list[InstanceSpec] = Field(default_factory=list)
    ab_split: dict[str, float] = Field(default_factory=dict)
    # How long POST /admin/instances waits for a new instance to answer its first load poll.
    register_timeout_s: float = Field(default=5.0, gt=0.0)
    # Served model name -> the tokenizer the orchestrator uses for it: a local tokenizer directory,
    # a .gguf file, the built-in default model's name (its cached tokenizer) or a Hugging Face id
    # (its local cache first). Key "*": every model without its own entry. Operator-only (YAML/env):
    # a model name given over the admin API is never used as a path.
    tokenizers: dict[str, str] = Field(default_factory=dict)
    # Upper bound on loading one tokenizer (at start or registration), off the event loop.
    tokenizer_load_timeout_s: float = Field(default=60.0, gt=0.0)
    # This orchestrator's name in the shared database: on start it fails the requests left in flight
    # by a previous run of the same replica id and marks its stale instance rows "unknown". Replicas
    # sharing one database need distinct ids.
    replica_id: str = Field(default="default", min_length=1, max_length=64)
    # Several replicas (orchestrator/leader.py): the leader lease lasts leader_lease_s and is renewed
    # every leader_renew_s (a dead leader is replaced within their sum); a replica whose heartbeat is
    # older than replica_timeout_s is dead and the leader fails its in-flight requests; every replica
    # reads the store's instance table every instance_sync_s (0: off) to drive what its peers registered.
    leader_lease_s: float = Field(default=3.0, gt=0.0)
    leader_renew_s: float = Field(default=1.0, gt=0.0)
    replica_timeout_s: float = Field(default=6.0, gt=0.0)
    instance_sync_s: float = Field(default=2.0, ge=0.0)
    # OpenTelemetry: an OTLP/HTTP collector (e.g. http://collector:4318) gets one span per request
    # with its phases; unset: no tracing (and no SDK needed). `pip install tetri[otel]`.
    otel_endpoint: str | None = None
    otel_service_name: str = "tetri"

    # --- pools (GET/PUT /admin/pools; orchestrator/pools/) ---
    # What starts and stops engine instances: "static" (instances are registered by hand or listed
    # in `instances`; scaling is refused), "local" (`tetri up` worker processes), "kubernetes" (one
    # workload per role, below).
    pool_provider: Literal["static", "local", "kubernetes"] = "static"
    # kubernetes: the API server (unset: in-cluster service account, else $KUBECONFIG/~/.kube/config),
    # the namespace (unset: the service account's, else the kubeconfig context's), one workload per
    # role, and the labels every engine pod carries (its role comes from the `k8s_role_label` label).
    k8s_api_url: str | None = None
    k8s_namespace: str | None = None
    k8s_pools: dict[Role, K8sPool] = Field(default_factory=dict)
    k8s_match_labels: dict[str, str] = Field(default_factory=lambda: {"app.kubernetes.io/part-of": "tetri"})
    k8s_role_label: str = "tetri/role"

    # --- engine ---
    chunk_size: int | Literal["auto"] = "auto"
    kv_lease_s: float = 30.0

    # --- TetriInfer scheduling ---
    prefill_policy: str = "fcfs"
    prefill_sched_batch: int = 16
    prefill_engine_backlog: int = 2
    # Late binding: an instance with room and an empty queue takes the next prompt queued for its
    # busiest peer of the same pool (orchestrator/policies/late_binding.py); "none" keeps every
    # prompt where the global scheduler put it, as in the paper.
    late_binding: str = "busiest"
    dispatch_policy: str = "power_of_two"
    power_of_d: int = 2
    # Where the paper is vague (docs/scheduling.md): α empty -> most-free β instance or nobody;
    # heavy:light objective "balance" (heavy to lowest ratio, light to highest), "after", "delta".
    dispatch_fallback: str = "most_free"
    dispatch_ratio_objective: str = "balance"
    decode_admission: str = "reserve_dynamic"
    # Batch cap per decode instance (0: none): it refuses new requests while it runs this many.
    decode_max_running: int = Field(default=0, ge=0)
    heavy_decode_threshold: int = 128
    heavy_prefill_threshold: int = 512
    predictor: str = "learned"
    predictor_granularity: int = 200
    # When no placement decision can turn on a request's predicted length (one decode instance with
    # room, or none), predict only every Nth request: enough for the live accuracy figures. 1 = all.
    predictor_sample_every: int = Field(default=8, ge=1)
    # ... and at most this many such samples a second (0: no cap): under heavy load every 8th request
    # is more than the accuracy figures need, and each sample costs the predictor's thread ~1 ms.
    predictor_sample_max_per_s: float = Field(default=5.0, ge=0)
    # Serve well-formed completion requests without FastAPI's per-request machinery
    # (orchestrator/hot_path.py); anything else, and every request when tracing is on, takes the routes.
    hot_path: bool = True
    # In a mixed deployment (co-located and P/D pools), heavy-prefill requests predicted to be
    # heavy-decode run co-located: the paper's weak spot, where disaggregation does not pay.
    colocate_heavy_heavy: bool = True
    # Conditional disaggregation (docs/scheduling.md "Co-located fallback"): when no `colocated`
    # instance is usable for the model/backend, the co-located path runs on a decode instance
    # (prefill chunks beside its decodes, no KV transfer). Off: such requests disaggregate.
    colocate_on_decode: bool = True
    # Adaptive fallback (needs colocate_on_decode): when the least-loaded prefill instance holds more
    # than this many prompt tokens (our queue + its queued and running prompts) and a decode instance
    # has room (free KV after reservations >= 20% of its pool + the prompt, nothing waiting), the
    # request runs co-located there. 0: off. 1,200 ~ the simulator's 30 ms at an H100's ~40k
    # prompt tokens/s (Llama-2-7B); on slower engines the same count is a longer wait.
    colocate_backlog_tokens: int = Field(default=1200, ge=0)
    # Which decode instance a co-located request runs on (orchestrator/policies/hosts.py):
    # "prefill_load" (least prompt work waiting there) or "outstanding" (fewest requests).
    colocate_pick: str = "prefill_load"
    # TPOT-aware isolation (orchestrator/policies/tpot.py; 0: off): co-located requests predicted to
    # hold at least this many KV token-steps run on the first tpot_isolate_share of the hosts.
    tpot_isolate_weight: int = Field(default=0, ge=0)
    tpot_isolate_share: float = Field(default=0.25, gt=0, lt=1)
    # --- prefix caching (orchestrator/policies/prefix.py, global_scheduler.py) ---
    # The global scheduler: "least_loaded" (the paper's), "prefix_aware" (least uncached prefill work:
    # prefill load + prompt - cached prefix there x prefix_cache_weight) or "sglang_cache_aware" (the
    # SGLang router's rule: cache match above prefix_cache_threshold unless the load is imbalanced by
    # more than prefix_balance_abs requests and prefix_balance_rel times).
    global_scheduler: str = "prefix_aware"
    # A cached token counts this many prompt tokens: it is also work the cluster does not redo (at
    # high load, recomputing a session's history elsewhere delays everyone; docs/benchmarks.md).
    prefix_cache_weight: float = Field(default=4.0, ge=0.0)
    # prefix_aware: prompt tokens of prefill work one running request weighs (the decode working set
    # a new request joins; without it, sessions pile onto the few instances that hold a shared prefix).
    prefix_running_weight: float = Field(default=16.0, ge=0.0)
    prefix_cache_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    prefix_balance_abs: int = Field(default=64, ge=0)
    prefix_balance_rel: float = Field(default=1.5, ge=1.0)
    # Engines that do not report their cached blocks: what was routed where counts as cached this long.
    prefix_ttl_s: float = Field(default=120.0, gt=0.0)
    # Request migration: when an instance fails after tokens reached the client (a worker crash,
    # a broken stream), the request continues elsewhere from the prompt plus the tokens already
    # sent (a re-prefill of that prefix), instead of ending with an error. Off: it ends with an error.
    migrate_on_failure: bool = True
    # The timing profile (backends/engines/simulated/profiles.py) `GET /admin/plan` simulates this deployment with:
    # cpu-smollm2 for the built-in engine here, e.g. h100-llama-2-7b for SGLang on H100s.
    plan_profile: str = "cpu-smollm2"
    # GET /admin/plan?objective=slo: the p99 TTFT (ms) a layout must meet; the least mean JCT among those.
    plan_ttft_slo_ms: float = 200.0
    # The planner's objective (GET /admin/plan's default, and the automatic planner's).
    plan_objective: Literal["balanced", "ttft", "jct", "slo"] = "balanced"
    # Automatic pool sizing: every this many seconds plan from the last plan_auto_window_s of finished
    # traffic and flip the pools to the split two plans in a row agree on. 0 = off (advice only).
    plan_auto_interval_s: float = Field(default=0.0, ge=0.0)
    plan_auto_window_s: float = Field(default=900.0, gt=0.0)
    monitor_interval_ms: int = 100
    monitor_failures_unhealthy: int = 3
    flip_policy: str = "none"
    flip_idle_s: float = 60.0
    flip_min_per_role: int = 1
    flip_cooldown_s: float | None = None
    flip_load_kv_threshold: float = 0.8

    # --- the local pool provider (pool_provider=local; `tetri up` sets these from its options) ---
    # The built-in engine workers it starts for PUT /admin/pools/{role}: `tetri worker` processes on
    # this machine, of `model`, with these options. log dir unset: $TETRI_LOG_DIR or /tmp/tetri-logs.
    local_worker_backend: Literal["native", "sim"] = "native"
    local_worker_chunk_size: str = "auto"
    local_worker_batching: Literal["sarathi", "vllm"] = "sarathi"
    local_worker_kv_tokens: int | None = Field(default=None, ge=1)
    local_worker_log_dir: str | None = None
    # How long a new worker may take to answer /health (a first start converts/profiles the model).
    local_worker_start_timeout_s: float = Field(default=300.0, gt=0.0)
    # Most workers one pool may have: a PUT asking for more is refused (409), not a fork bomb.
    local_max_workers: int = Field(default=8, ge=1)
    # --- the planner scaling pools (needs a provider that can scale; opt-in) ---
    # With plan_auto_interval_s > 0 and plan_scale on, the automatic planner may also add an instance
    # when the planned layout's busier pool runs at >= plan_scale_up_util, or remove one when a layout
    # of one instance fewer runs at <= plan_scale_down_util; each pool stays within its min and max.
    plan_scale: bool = False
    plan_scale_min: dict[Role, int] = Field(default_factory=lambda: {"prefill": 1, "decode": 1})
    plan_scale_max: dict[Role, int] = Field(default_factory=lambda: {"prefill": 4, "decode": 4})
    plan_scale_up_util: float = Field(default=0.8, gt=0.0)
    plan_scale_down_util: float = Field(default=0.5, ge=0.0)

    @field_validator(*POLICY_KNOBS)
    @classmethod
    def _registered_policy(cls, value: str, info: ValidationInfo) -> str:
        """A knob that selects a policy takes a name registered for it (orchestrator/policies/registry.py)."""
        assert info.field_name is not None
        return registry.check(POLICY_KNOBS[info.field_name], value)

    def policy_config(self) -> PolicyConfig:
        """The scheduling knobs of this deployment: what the placement core, the policies and the
        simulator (the pool planner's) read."""
        return PolicyConfig.from_source(self)

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, **overrides: Any) -> Settings:
        """Environment wins over the YAML file; explicit overrides win over both."""
        data: dict[str, Any] = {}
        path = yaml_path or os.environ.get("TETRI_CONFIG")
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {path} must hold a mapping")
            data.update({k: v for k, v in loaded.items() if f"TETRI_{k.upper()}" not in os.environ})
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model
