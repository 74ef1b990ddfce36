"""Live comparisons: each system as a real deployment on this machine (`tetri up`), driven by the
runner with the same workload, one system after the other.

System → deployment (same instance count N for all):

* ``colocated-vllm``: ``tetri up --colocated N --batching vllm``
* ``colocated-sarathi``: ``tetri up --colocated N --batching sarathi``
* ``disagg-simple``: ``--prefill P --decode D`` with FCFS, least-loaded dispatch, greedy admission,
  constant predictor, no flip, no co-located fallback
* ``tetri``: ``--prefill P --decode D`` with SJF, power-of-two dispatch, reserve-dynamic admission,
  the oracle predictor (the request's ``max_tokens`` under ``ignore_eos``), idle flip, and the
  orchestrator's default conditional disaggregation (HPHD and a backlogged prefill pool run
  co-located on a decode worker)

P:D comes from the simulator's planners with the cpu-smollm2 profile at the workload's rate, as in
the simulated compare: the analytic split (``plan_split``) for ``disagg-simple``, the simulated
choice (``recommend_split``, P = 0 possible) for ``tetri``; or from ``name+pd_ratio=P:D``. Workers
run the built-in engine (``native``) or the sim engine (``--live-backend sim``).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.metrics import by_class
from bench.runner import run_workload
from bench.sessions import SessionWorkload
from bench.sessions_live import run_sessions

BENCH_ADMIN_TOKEN = "tetri-bench"  # loopback-only deployments; lets the runner read GET /admin/instances

SYSTEM_ENV: dict[str, dict[str, str]] = {
    "disagg-simple": {
        "TETRI_MODE": "disaggregated",
        "TETRI_PREFILL_POLICY": "fcfs",
        "TETRI_DISPATCH_POLICY": "least_loaded",
        "TETRI_DECODE_ADMISSION": "greedy",
        "TETRI_PREDICTOR": "constant",
        "TETRI_FLIP_POLICY": "none",
        # plain disaggregation, as the simulator's disagg-simple: never co-locate on a decode worker
        "TETRI_COLOCATE_HEAVY_HEAVY": "false",
        "TETRI_COLOCATE_ON_DECODE": "false",
        "TETRI_COLOCATE_BACKLOG_TOKENS": "0",
    },
    "tetri": {
        # auto: disaggregated, with the conditional fallback (HPHD, backlog) to co-located on a decode
        # worker; with no prefill worker (a planned P = 0) every request runs co-located there
        "TETRI_MODE": "auto",
        "TETRI_PREFILL_POLICY": "sjf",
        "TETRI_DISPATCH_POLICY": "power_of_two",
        "TETRI_DECODE_ADMISSION": "reserve_dynamic",
        "TETRI_PREDICTOR": "oracle",
        "TETRI_FLIP_POLICY": "idle",
    },
}


class Deployment:
    """`tetri up` as a child process in its own session; stop() ends it and its workers."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        full_env = {**os.environ, **env}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deployment exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"deployment at {self.url} not ready after {timeout_s:.0f}s")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deployment_args(system: str, n: int, split: tuple[int, int], spec: Any) -> tuple[list[str], dict[str, str]]:
    base, _, opts = system.partition("+")
    overrides = dict(kv.split("=", 1) for kv in opts.split(",") if "=" in kv)
    common = ["--backend", spec.live_backend, "--model", spec.model]
    if spec.kv_tokens:
        common += ["--kv-tokens", str(spec.kv_tokens)]
    if base in ("colocated-vllm", "colocated-sarathi"):
        batching = "vllm" if base == "colocated-vllm" else "sarathi"
        # overrides become settings (global_scheduler=least_loaded) and reach the workers too
        # (prefix_caching=0: the engine's TETRI_PREFIX_CACHING, the caching-off baseline)
        env = {"TETRI_MODE": "colocated", **{f"TETRI_{k.upper()}": v for k, v in overrides.items()}}
        return ["--colocated", str(n), "--prefill", "0", "--decode", "0", "--batching", batching, *common], env
    if base not in SYSTEM_ENV:
        raise ValueError(f"no live deployment for system {system!r}")
    p, d = split
    if "pd_ratio" in overrides:
        p, d = (int(x) for x in overrides["pd_ratio"].split(":"))
    env = dict(SYSTEM_ENV[base])
    for k, v in overrides.items():
        if k != "pd_ratio":
            env[f"TETRI_{k.upper()}"] = v
    return ["--prefill", str(p), "--decode", str(d), *common], env


def compare_live(spec: Any, progress: Any = None) -> dict[str, Any]:
    from backends.engines.simulated.profiles import get_timing
    from bench.spec import load_workload as _load_workload
    from bench.spec import rate_value as _rate_value
    from bench.spec import relative as _relative
    from orchestrator.sim import SYSTEMS
    from orchestrator.sim.planner import recommend_split
    from orchestrator.sim.split import plan_split

    tm = get_timing("cpu-smollm2")
    n = spec.instances
    log_dir = Path(os.environ.get("TETRI_LOG_DIR", "/tmp/tetri-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"backend": f"live-{spec.live_backend}", "instances": n, "requests": spec.requests,
                           "seed": spec.seed, "model": spec.model, "workloads": {}}  # fmt: skip
    for wname in spec.workloads:
        base = _load_workload(spec, wname, tm.max_context)
        rate = _rate_value(spec)
        if rate is None:
            rate = 1.0  # live runs on this CPU: a gentle default; pass --rate to choose
        wl = base.with_arrivals(rate, spec.seed + 1)
        prompts = [r.prompt_tokens for r in wl.requests]
        outputs = [r.output_tokens for r in wl.requests]
        finite = rate if math.isfinite(rate) else None
        sessions = isinstance(wl, SessionWorkload)  # closed loop: the rate is of sessions, not requests
        simple = plan_split(n, prompts, outputs, tm, tm.knee(), SYSTEMS["disagg-simple"], rate=finite)
        splits = {"disagg-simple": simple}
        if finite and not sessions:
            choice = recommend_split(n, prompts, outputs, finite, tm, SYSTEMS["tetri"], seed=spec.seed)
            splits["tetri"] = (choice.prefill, choice.decode)
        else:
            splits["tetri"] = plan_split(n, prompts, outputs, tm, tm.knee(), SYSTEMS["tetri"])
        wres: dict[str, Any] = {"workload": wl.stats(), "rate": rate if math.isfinite(rate) else "inf",
                                "rate_source": "given" if spec.rate != "auto" else "live default 1 req/s",
                                "systems": {}}  # fmt: skip
        for sname in spec.systems:
            split = splits.get(sname.partition("+")[0], splits["disagg-simple"])
            args, env = deployment_args(sname, n, split, spec)
            env = {**env, "TETRI_ADMIN_TOKEN": BENCH_ADMIN_TOKEN}  # the workers' prefix counters
            log_name = f"bench-{sname.replace('+', '_').replace('=', '-').replace(',', '_')}.log"
            dep = Deployment(args, env, _free_port(), log_dir / log_name)
            try:
                dep.wait_ready()
                if sessions:
                    res = run_sessions(dep.url, wl, instances=n, admin_token=BENCH_ADMIN_TOKEN)  # type: ignore[arg-type]
                else:
                    res = run_workload(dep.url, wl, instances=n, show_progress=progress is None)
            finally:
                dep.stop()
            summ = res["summary"]
            is_disagg = sname.partition("+")[0] in SYSTEM_ENV
            wres["systems"][sname] = {
                "summary": summ,
                "by_class": by_class(res["requests"], n),
                "config": {"deployment": args, "env": env,
                           "layout": "disaggregated" if is_disagg else "colocated"},  # fmt: skip
                "split": {"prefill": split[0], "decode": split[1]} if is_disagg else {"colocated": n},
                "requests": res["requests"],
            }
            if progress:
                progress(wname, sname, summ)
        _relative(wres)
        out["workloads"][wname] = wres
    return out
