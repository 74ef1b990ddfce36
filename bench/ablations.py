"""Scheduling ablations on this machine, live (issue 4 item 7), after TetriInfer's microbenchmarks.

    python -m bench.ablations prefill    # prefill waiting time, fcfs vs sjf at prefill_sched_batch 16 and 128
    python -m bench.ablations dispatch   # total decoding time, power_of_two vs random vs imbalanced
    python -m bench.ablations admission  # mean JCT, greedy vs reserve_dynamic under KV pressure
    python -m bench.ablations flip       # flip latency excluding drain (the worker's flip_s)
    python -m bench.ablations late-binding  # TTFT with two prefill instances, late binding none vs busiest
    python -m bench.ablations all        # the four, one after the other

Each command starts real worker processes (``tetri worker``; ``--backend sim`` by default: the
native scheduler over the cpu-smollm2 timing model, which sleeps instead of computing, so runs on a
shared 2-core machine are not at the mercy of the neighbours' CPU load; ``--backend native`` runs
the built-in PyTorch engine with ``--model``), then, for every configuration in turn, an
orchestrator in this process (``create_app``, the same FastAPI app ``tetri serve`` runs) over the
same workers, drives a seeded workload through ``POST /v1/completions`` (token-id prompts of exact
lengths, ``ignore_eos`` so every run does the same work), and reads the per-request timestamps back
from the orchestrator's own store (arrival, prefill start, first token, decode start, finish) and
the prefill queues' wait statistics. Every ratio is against the baseline measured in the same
invocation over the same workers. ``--json PATH`` writes the raw numbers as well.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

app = typer.Typer(help="Live scheduling ablations (fcfs/sjf, dispatch, admission, flip).", no_args_is_help=True,
                  pretty_exceptions_enable=False)

TINY = "random:tiny-llama"
# Sim workers' timing: Vidur's A100 measurements of Llama-2-7B (a fixed data set). The cpu-smollm2
# profile's coefficients come from whatever calibration is cached on the machine, so its numbers
# would not be reproducible from the command alone.
SIM_PROFILE = "a100-llama-2-7b"
logging.getLogger("apscheduler").setLevel(logging.CRITICAL)  # "skipped: maximum number of running instances"
ADMIN = "ablation-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


# ---- plumbing ---------------------------------------------------------------------------------
@dataclass
class Req:
    prompt_len: int
    max_tokens: int
    at: float  # send time, seconds after the run starts
    cls: str = ""

    def body(self, model: str, i: int, seed: int) -> dict[str, Any]:
        rng = random.Random(seed * 100003 + i)
        prompt = [100 + rng.randrange(20000) for _ in range(self.prompt_len)]
        return {"model": model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True}


@dataclass
class Workers:
    fleet: Any
    roles: list[str]
    backend: str
    model: str
    start_s: list[float] = field(default_factory=list)

    def specs(self) -> list[Any]:
        from orchestrator.config import InstanceSpec

        return [InstanceSpec(url=w.url, backend=self.backend, role=role, model=self.model, id=f"{role}-{i}")  # type: ignore[arg-type]
                for i, (w, role) in enumerate(zip(self.fleet.workers, self.roles, strict=True))]

    def reset_roles(self) -> None:
        for w, role in zip(self.fleet.workers, self.roles, strict=True):
            httpx.post(f"{w.url}/role", json={"role": role}, timeout=120).raise_for_status()

    def wait_empty(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            loads = [httpx.get(f"{w.url}/load", timeout=5).json() for w in self.fleet.workers]
            if all(ld["running"] == 0 and ld["queued"] == 0 and ld["active_leases"] == 0
                   and ld["free_kv_tokens"] == ld["total_kv_tokens"] for ld in loads):
                return
            time.sleep(0.1)
        raise TimeoutError("workers did not empty between runs")


@contextmanager
def workers(roles: list[str], backend: str, model: str, kv_tokens: dict[str, int] | None = None,
            chunk_size: str = "auto", log_dir: Path | None = None, sim_profile: str = "") -> Iterator[Workers]:
    from orchestrator.launcher import Fleet

    fleet = Fleet()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tetri-ablation-"))
    started = time.monotonic()
    try:
        for role in roles:
            chunk = chunk_size if backend == "sim" or chunk_size != "auto" else "64"  # native: skip profiling
            fleet.start_worker(role, model, backend=backend, chunk_size=chunk,  # type: ignore[arg-type]
                               kv_tokens=(kv_tokens or {}).get(role), log_dir=log_dir,
                               extra_args=["--profile", sim_profile or SIM_PROFILE] if backend == "sim" else None)
        fleet.wait_healthy(timeout_s=600)
        ws = Workers(fleet, list(roles), backend, model if backend == "native" else TINY)
        ws.start_s = [time.monotonic() - started]
        yield ws
    finally:
        fleet.stop()


@contextmanager
def orchestrator(ws: Workers, **knobs: Any) -> Iterator[tuple[str, Any]]:
    """The orchestrator app in this process (uvicorn in a thread) over the fleet, with `knobs`."""
    import uvicorn

    from orchestrator.app import create_app
    from orchestrator.config import Settings
    from orchestrator.launcher import free_port

    ws.reset_roles()
    ws.wait_empty()
    with tempfile.TemporaryDirectory(prefix="tetri-ablation-db-") as tmp:
        settings = Settings(database_url=f"sqlite:///{tmp}/tetri.db", admin_token=ADMIN, instances=ws.specs(),
                            model=TINY, **knobs)
        app_ = create_app(settings)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("orchestrator did not start")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", app_.state.tetri
        finally:
            server.should_exit = True
            thread.join(timeout=60)


async def _drive(url: str, reqs: list[Req], model: str, seed: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        t0 = time.monotonic()

        async def one(i: int, r: Req) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + r.at - time.monotonic()))
            sent = time.monotonic()
            resp = await client.post(f"{url}/v1/completions", json=r.body(model, i, seed))
            out = {"i": i, "cls": r.cls, "status": resp.status_code, "jct_client_s": time.monotonic() - sent}
            if resp.status_code == 200:
                data = resp.json()
                out.update(id=data["id"], completion_tokens=data["usage"]["completion_tokens"])
            else:
                out["error"] = resp.text[:300]
            return out

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))


def run_config(ws: Workers, reqs: list[Req], seed: int, **knobs: Any) -> dict[str, Any]:
    """One configuration over the same workers: returns per-request store records and queue stats."""
    with orchestrator(ws, **knobs) as (url, state):
        preempt_before = _preemptions(ws)
        started = time.time()
        results = asyncio.run(_drive(url, reqs, TINY, seed))
        makespan = time.time() - started
        state.store.flush(timeout=30)
        rows = []
        for res in results:
            row = state.store.get_request(res["id"]) if res.get("id") else None
            rows.append({**res, **(row or {})})
        queues = {iid: {"released": q.released, "mean_wait_s": q.mean_wait_s, "max_wait_s": q.max_wait_s,
                        "batches": q.batches_formed}
                  for iid, q in state.placement.queues.items()}
        preemptions = _preemptions(ws) - preempt_before
        steals = state.placement.steals
    bad = [r for r in rows if r["status"] != 200 or r.get("completion_tokens") != reqs[r["i"]].max_tokens]
    return {"knobs": knobs, "rows": rows, "queues": queues, "makespan_s": makespan, "failed": len(bad),
            "preemptions": preemptions, "moved": steals}


def _preemptions(ws: Workers) -> int:
    """Preemptions (KV ran out mid-decode: blocks freed, request recomputed) summed over the workers."""
    loads = [httpx.get(f"{w.url}/load", timeout=10).json() for w in ws.fleet.workers]
    return sum(int((ld.get("extra") or {}).get("preemptions", 0) or 0) for ld in loads)


def run_repeats(ws: Workers, reqs: list[Req], seed: int, repeats: int,
                configs: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every configuration `repeats` times, interleaved (A B A B), so slow drift hits all alike."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, knobs in configs.items():
            runs[name].append(run_config(ws, reqs, seed, **knobs))
    return runs


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _p(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == 200 and r.get("finished_at")]


def _emit(title: str, command: str, header: list[str], table: list[list[str]], notes: list[str]) -> str:
    lines = [f"### {title}", "", f"`{command}`", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += [""] + notes + [""]
    text = "\n".join(lines)
    typer.echo(text)
    return text


def _save(path: Path | None, name: str, data: Any) -> None:
    if path is None:
        return
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[name] = data
    path.write_text(json.dumps(existing, indent=1, default=str))


BackendOpt = Annotated[str, typer.Option(help="Worker backend: sim (timing model) or native (PyTorch).")]
ModelOpt = Annotated[str, typer.Option(help="Model for --backend native (e.g. random:tiny-llama).")]
SeedOpt = Annotated[int, typer.Option(help="Workload seed.")]
ProfileOpt = Annotated[str, typer.Option(help="Timing profile of sim workers.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write raw numbers to this JSON file.")]
ShortOpt = Annotated[str, typer.Option(help="Short prompt lengths lo:hi.")]
LongOpt = Annotated[str, typer.Option(help="Long prompt lengths lo:hi.")]
RepeatsOpt = Annotated[int, typer.Option(help="Runs of each configuration (interleaved), averaged.")]


def _span(lo_hi: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in lo_hi.split(":"))
    return lo, hi


# ---- 1. prefill scheduler ---------------------------------------------------------------------
def prefill_workload(n: int, seed: int, short: tuple[int, int], long: tuple[int, int], long_frac: float,
                     rate: float) -> list[Req]:
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for _ in range(n):
        is_long = rng.random() < long_frac
        lo, hi = long if is_long else short
        reqs.append(Req(rng.randint(lo, hi), 2, t, "long" if is_long else "short"))
        if rate > 0:
            t += rng.expovariate(rate)
    return reqs


def _range(xs: list[float], scale: float = 1000.0, digits: int = 0) -> str:
    return f"{min(xs) * scale:.{digits}f} - {max(xs) * scale:.{digits}f}" if len(xs) > 1 else ""


@app.command()
def prefill(
    requests: Annotated[int, typer.Option("-n", "--requests")] = 128,
    rate: Annotated[float, typer.Option(help="Poisson arrivals req/s (0: one burst).")] = 0.0,
    batches: Annotated[str, typer.Option(help="prefill_sched_batch values.")] = "16,128",
    short: ShortOpt = "16:64",
    long: LongOpt = "1536:2048",
    repeats: RepeatsOpt = 2,
    backend: BackendOpt = "sim", model: ModelOpt = TINY, seed: SeedOpt = 0, json_path: JsonOpt = None,
    sim_profile: ProfileOpt = SIM_PROFILE,
) -> str:
    """Prefill waiting time under fcfs vs sjf: one prefill instance, mixed prompt lengths (half
    short, half long), 2 output tokens, all arriving in one burst so that a queue forms."""
    reqs = prefill_workload(requests, seed, _span(short), _span(long), 0.5, rate)
    sizes = [int(x) for x in batches.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {f"{p}/{b}": [] for b in sizes for p in ("fcfs", "sjf")}
    with workers(["prefill", "decode"], backend, model, sim_profile=sim_profile) as ws:
        for _ in range(repeats):
            for key in runs:
                policy, b = key.split("/")
                runs[key].append(run_config(ws, reqs, seed, prefill_policy=policy, prefill_sched_batch=int(b),
                                            prefill_engine_backlog=2, decode_admission="greedy"))
    summaries: dict[str, dict[str, Any]] = {}
    for key, rs in runs.items():
        rows = [r for res in rs for r in _ok(res["rows"])]
        qwaits = [next(iter(res["queues"].values()))["mean_wait_s"] for res in rs]
        ttfts = [_mean([r["first_token_at"] - r["arrival"] for r in _ok(res["rows"])]) for res in rs]
        summaries[key] = {
            "queue_wait_mean_s": _mean(qwaits), "queue_wait_runs_s": qwaits,
            "queue_wait_max_s": max(next(iter(res["queues"].values()))["max_wait_s"] for res in rs),
            "ttft_mean_s": _mean(ttfts), "ttft_runs_s": ttfts,
            "ttft_short_s": _mean([r["first_token_at"] - r["arrival"] for r in rows if r["cls"] == "short"]),
            "ttft_long_s": _mean([r["first_token_at"] - r["arrival"] for r in rows if r["cls"] == "long"]),
            "failed": sum(res["failed"] for res in rs), "makespan_s": _mean([res["makespan_s"] for res in rs]),
        }
    table = []
    for key, sm in summaries.items():
        policy, b = key.split("/")
        base = summaries[f"fcfs/{b}"]
        table.append([policy, b, f"{sm['queue_wait_mean_s'] * 1000:.0f}", _range(sm["queue_wait_runs_s"]),
                      f"**{sm['queue_wait_mean_s'] / base['queue_wait_mean_s']:.2f}**",
                      f"{sm['ttft_mean_s'] * 1000:.0f}", f"{sm['ttft_mean_s'] / base['ttft_mean_s']:.2f}",
                      f"{sm['ttft_short_s'] * 1000:.0f} / {sm['ttft_long_s'] * 1000:.0f}",
                      f"{sm['makespan_s']:.1f}", str(sm["failed"])])
    _save(json_path, "prefill", {"summaries": summaries, "runs": runs})
    cmd = (f"python -m bench.ablations prefill -n {requests} --rate {rate:g} --batches {batches} --short {short} "
           f"--long {long} --repeats {repeats} --backend {backend} --sim-profile {sim_profile} --seed {seed}")
    return _emit(
        "Prefill waiting time: fcfs vs sjf", cmd,
        ["policy", "sched batch", "queue wait mean (ms)", "per run", "ratio vs fcfs", "TTFT mean (ms)",
         "ratio vs fcfs", "TTFT short / long (ms)", "makespan (s)", "failed"], table,
        [f"{requests} requests ({sum(r.cls == 'long' for r in reqs)} with {long}-token prompts, the rest {short}), "
         f"2 output tokens, 1 prefill + 1 decode {backend} worker, prefill_engine_backlog 2, {repeats} interleaved "
         "runs per row. Queue wait: push to release in the instance's PrefillQueue (mean over runs)."])


# ---- 2. dispatcher ----------------------------------------------------------------------------
def dispatch_workload(n: int, seed: int, rate: float, heavy_frac: float) -> list[Req]:
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for _ in range(n):
        heavy = rng.random() < heavy_frac
        reqs.append(Req(rng.randint(32, 256), rng.randint(300, 500) if heavy else rng.randint(16, 64), t,
                        "heavy" if heavy else "light"))
        t += rng.expovariate(rate)
    return reqs


@app.command()
def dispatch(
    requests: Annotated[int, typer.Option("-n", "--requests")] = 90,
    rate: Annotated[float, typer.Option(help="Poisson arrivals req/s.")] = 12.0,
    decodes: Annotated[int, typer.Option(help="Decode instances.")] = 3,
    heavy_frac: Annotated[float, typer.Option(help="Share of heavy decodes (300-500 tokens).")] = 0.5,
    policies: Annotated[str, typer.Option(help="Dispatchers; the first is the reference.")] = (
        "power_of_two,random,imbalanced"
    ),
    repeats: Annotated[int, typer.Option(help="Runs of each configuration (interleaved).")] = 2,
    backend: BackendOpt = "sim", model: ModelOpt = TINY, seed: SeedOpt = 0, json_path: JsonOpt = None,
    sim_profile: ProfileOpt = SIM_PROFILE,
) -> str:
    """Total decoding time under power_of_two vs random vs imbalanced: mixed heavy/light decodes,
    the oracle predictor (so the dispatcher knows which are heavy), 1 prefill + N decode workers."""
    reqs = dispatch_workload(requests, seed, rate, heavy_frac)
    names = [p.strip() for p in policies.split(",")]
    configs = {name: {"dispatch_policy": name, "predictor": "oracle", "decode_admission": "reserve_dynamic",
                      "prefill_policy": "fcfs"} for name in names}
    with workers(["prefill"] + ["decode"] * decodes, backend, model, sim_profile=sim_profile) as ws:
        runs = run_repeats(ws, reqs, seed, repeats, configs)
    table = []
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        rows = [r for res in rs for r in _ok(res["rows"])]
        per_run = [sum(r["finished_at"] - r["first_token_at"] for r in _ok(res["rows"])) for res in rs]
        heavy = [r["finished_at"] - r["first_token_at"] for r in rows if r["cls"] == "heavy"]
        light = [r["finished_at"] - r["first_token_at"] for r in rows if r["cls"] == "light"]
        spread: dict[str, int] = {}
        for r in rows:
            spread[r["decode_instance"]] = spread.get(r["decode_instance"], 0) + 1
        jct = [r["finished_at"] - r["arrival"] for r in rows]
        summ = {"total_decode_s": _mean(per_run), "total_decode_runs_s": per_run, "heavy_mean_s": _mean(heavy),
                "light_mean_s": _mean(light), "jct_mean_s": _mean(jct),
                "makespan_s": _mean([res["makespan_s"] for res in rs]),
                "per_instance": {k: v / len(rs) for k, v in sorted(spread.items())},
                "failed": sum(res["failed"] for res in rs)}
        results[name] = {"summary": summ, "runs": rs}
    ref = results[names[0]]["summary"]
    for name in names:
        summ = results[name]["summary"]
        table.append([name, f"{summ['total_decode_s']:.1f}", _range(summ["total_decode_runs_s"], 1.0, 1),
                      f"**{summ['total_decode_s'] / ref['total_decode_s']:.2f}**",
                      f"{summ['light_mean_s']:.2f}", f"{summ['heavy_mean_s']:.2f}", f"{summ['jct_mean_s']:.2f}",
                      f"{summ['jct_mean_s'] / ref['jct_mean_s']:.2f}", f"{summ['makespan_s']:.1f}",
                      "/".join(f"{v:g}" for v in summ["per_instance"].values()), str(summ["failed"])])
    _save(json_path, "dispatch", results)
    cmd = (f"python -m bench.ablations dispatch -n {requests} --rate {rate:g} --decodes {decodes} "
           f"--heavy-frac {heavy_frac:g} --policies {policies} --repeats {repeats} --backend {backend} "
           f"--sim-profile {sim_profile} --seed {seed}")
    return _emit(
        "Total decoding time: power_of_two vs random vs imbalanced", cmd,
        ["dispatcher", "total decode (s)", "per run", f"ratio vs {names[0]}", "light mean (s)", "heavy mean (s)",
         "JCT mean (s)",
         f"ratio vs {names[0]}", "makespan (s)", "requests per decode instance", "failed"], table,
        [f"{requests} requests ({sum(r.cls == 'heavy' for r in reqs)} heavy: 300-500 output tokens; light: 16-64), "
         f"prompts 32-256, Poisson {rate:g} req/s; predictor oracle, admission reserve_dynamic. "
         f"Decode time per request: first token to last token; total = sum over requests (mean of {repeats} "
         "interleaved runs)."])


# ---- 3. decode admission ----------------------------------------------------------------------
def admission_workload(n: int, seed: int, rate: float) -> list[Req]:
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for _ in range(n):
        heavy = rng.random() < 0.5
        reqs.append(Req(rng.randint(128, 512), rng.randint(400, 700) if heavy else rng.randint(32, 128), t,
                        "heavy" if heavy else "light"))
        t += rng.expovariate(rate)
    return reqs


@app.command()
def admission(
    requests: Annotated[int, typer.Option("-n", "--requests")] = 60,
    rate: Annotated[float, typer.Option(help="Poisson arrivals req/s.")] = 8.0,
    decodes: Annotated[int, typer.Option(help="Decode instances.")] = 2,
    kv_tokens: Annotated[int, typer.Option("--kv-tokens", help="KV pool of each decode worker, tokens.")] = 4096,
    policies: Annotated[str, typer.Option(help="Admission policies; the first is the baseline.")] = (
        "greedy,reserve_dynamic"
    ),
    repeats: Annotated[int, typer.Option(help="Runs of each configuration (interleaved).")] = 2,
    backend: BackendOpt = "sim", model: ModelOpt = TINY, seed: SeedOpt = 0, json_path: JsonOpt = None,
    sim_profile: ProfileOpt = SIM_PROFILE,
) -> str:
    """Mean JCT under greedy vs reserve_dynamic admission with KV pressure: small decode KV pools,
    prompts 128-512, half the decodes 400-700 tokens, the oracle predictor."""
    reqs = admission_workload(requests, seed, rate)
    names = [p.strip() for p in policies.split(",")]
    configs = {name: {"decode_admission": name, "predictor": "oracle", "dispatch_policy": "power_of_two",
                      "prefill_policy": "fcfs"} for name in names}
    with workers(["prefill"] + ["decode"] * decodes, backend, model, kv_tokens={"decode": kv_tokens},
                 sim_profile=sim_profile) as ws:
        runs = run_repeats(ws, reqs, seed, repeats, configs)
    table = []
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        rows = [r for res in rs for r in _ok(res["rows"])]
        per_run = [_mean([r["finished_at"] - r["arrival"] for r in _ok(res["rows"])]) for res in rs]
        jct = [r["finished_at"] - r["arrival"] for r in rows]
        summ = {"jct_mean_s": _mean(per_run), "jct_runs_s": per_run, "jct_p90_s": _p(jct, 0.9),
                "ttft_mean_s": _mean([r["first_token_at"] - r["arrival"] for r in rows]),
                "decode_mean_s": _mean([r["finished_at"] - r["first_token_at"] for r in rows]),
                "makespan_s": _mean([res["makespan_s"] for res in rs]),
                "failed": sum(res["failed"] for res in rs),
                "preemptions": _mean([res["preemptions"] for res in rs])}
        results[name] = {"summary": summ, "runs": rs}
    ref = results[names[0]]["summary"]
    for name in names:
        summ = results[name]["summary"]
        table.append([name, f"{summ['jct_mean_s']:.2f}", _range(summ["jct_runs_s"], 1.0, 2),
                      f"**{summ['jct_mean_s'] / ref['jct_mean_s']:.2f}**",
                      f"{summ['jct_p90_s']:.2f}", f"{summ['ttft_mean_s']:.2f}", f"{summ['decode_mean_s']:.2f}",
                      f"{summ['makespan_s']:.1f}", f"{summ['preemptions']:g}", str(summ["failed"])])
    _save(json_path, "admission", results)
    cmd = (f"python -m bench.ablations admission -n {requests} --rate {rate:g} --decodes {decodes} "
           f"--kv-tokens {kv_tokens} --policies {policies} --repeats {repeats} --backend {backend} "
           f"--sim-profile {sim_profile} --seed {seed}")
    return _emit(
        "Mean JCT: greedy vs reserve_dynamic decode admission", cmd,
        ["admission", "JCT mean (s)", "per run", f"ratio vs {names[0]}", "JCT p90 (s)", "TTFT mean (s)",
         "decode mean (s)",
         "makespan (s)", "preemptions per run", "failed"], table,
        [f"{requests} requests, Poisson {rate:g} req/s, {decodes} decode workers with {kv_tokens} KV tokens each; "
         f"predictor oracle, dispatch power_of_two; {repeats} interleaved runs per row. Preemptions: KV ran out "
         "mid-decode on a worker (blocks freed, request recomputed), from the workers' counters."])


# ---- 4. flip latency --------------------------------------------------------------------------
@app.command()
def flip(
    flips: Annotated[int, typer.Option(help="Flips per worker (alternating roles).")] = 20,
    backends: Annotated[str, typer.Option(help="Worker backends to measure.")] = "native,sim",
    model: ModelOpt = TINY, json_path: JsonOpt = None,
) -> str:
    """Flip latency excluding drain: idle workers flipped prefill<->decode through the orchestrator
    (`POST /admin/instances/{id}/flip`); the worker's `flip_s` (role change only), its `drain_s`, and
    the orchestrator's whole duration; against the baseline of starting a worker in the new role."""
    results: dict[str, Any] = {}
    table = []
    for backend in [b.strip() for b in backends.split(",")]:
        with workers(["prefill", "decode"], backend, model) as ws:
            cold = ws.start_s[0]
            with orchestrator(ws) as (url, _state):
                flip_s, drain_s, total_s = [], [], []
                for _ in range(flips):
                    resp = httpx.post(f"{url}/admin/instances/prefill-0/flip", headers=AUTH, timeout=120)
                    resp.raise_for_status()
                    data = resp.json()
                    flip_s.append(data["flip_s"])
                    drain_s.append(data["drain_s"])
                    total_s.append(data["duration_s"])
        one = _cold_start(backend, model)
        results[backend] = {"flip_s": flip_s, "drain_s": drain_s, "duration_s": total_s, "fleet_start_s": cold,
                            "cold_start_s": one}
        med = statistics.median(flip_s)
        table.append([backend if backend == "sim" else f"native ({model})", str(flips),
                      f"{med * 1000:.2f}", f"{_p(flip_s, 0.9) * 1000:.2f}", f"{statistics.median(drain_s) * 1000:.2f}",
                      f"{statistics.median(total_s) * 1000:.1f}", f"{one:.1f}", f"{med / one:.1e}"])
    _save(json_path, "flip", results)
    cmd = f"python -m bench.ablations flip --flips {flips} --backends {backends} --model {model}"
    return _emit(
        "Flip latency excluding drain", cmd,
        ["worker", "flips", "flip_s median (ms)", "flip_s p90 (ms)", "drain_s median (ms)",
         "admin flip end to end, median (ms)", "baseline: cold start of a worker (s)", "ratio flip / cold start"],
        table,
        ["Idle workers, so drain is ~0; flip_s is the role change inside the worker (no model reload). "
         "End to end: the admin call (re-placing the queue, the worker's drain + flip, the event row)."])


def _cold_start(backend: str, model: str) -> float:
    """Seconds from spawning one worker process to its first healthy /health."""
    from orchestrator.launcher import Fleet

    fleet = Fleet()
    started = time.monotonic()
    try:
        fleet.start_worker("decode", model, backend=backend, chunk_size="auto" if backend == "sim" else "64",
                           extra_args=["--profile", SIM_PROFILE] if backend == "sim" else None,
                           log_dir=Path(tempfile.mkdtemp(prefix="tetri-cold-")))
        fleet.wait_healthy(timeout_s=600)
        return time.monotonic() - started
    finally:
        fleet.stop()


# ---- 5. late binding ----------------------------------------------------------------------------
@app.command("late-binding")
def late_binding(
    requests: Annotated[int, typer.Option("-n", "--requests")] = 160,
    rate: Annotated[float, typer.Option(help="Poisson arrivals req/s.")] = 16.0,
    short: ShortOpt = "16:64",
    long: LongOpt = "1536:2048",
    repeats: RepeatsOpt = 2,
    backend: BackendOpt = "sim", model: ModelOpt = TINY, seed: SeedOpt = 0, json_path: JsonOpt = None,
    sim_profile: ProfileOpt = SIM_PROFILE,
) -> str:
    """TTFT with two prefill instances and one decode instance, late binding `none` vs `busiest`:
    half short, half long prompts, 2 output tokens, Poisson arrivals, one prompt in each prefill
    engine at a time (prefill_engine_backlog 1), no co-located fallback, so every prompt waits in
    our queues and the only difference is whether a queued prompt may move."""
    reqs = prefill_workload(requests, seed, _span(short), _span(long), 0.5, rate)
    configs = {name: {"late_binding": name, "prefill_policy": "sjf", "prefill_engine_backlog": 1,
                      "colocate_backlog_tokens": 0, "colocate_heavy_heavy": False, "decode_admission": "greedy"}
               for name in ("none", "busiest")}  # fmt: skip
    with workers(["prefill", "prefill", "decode"], backend, model, sim_profile=sim_profile) as ws:
        runs = run_repeats(ws, reqs, seed, repeats, configs)
    summaries: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        ttfts = [_mean([r["first_token_at"] - r["arrival"] for r in _ok(res["rows"])]) for res in rs]
        rows = [r for res in rs for r in _ok(res["rows"])]
        waits = [q["mean_wait_s"] for res in rs for q in res["queues"].values() if q["released"]]
        summaries[name] = {
            "ttft_mean_s": _mean(ttfts), "ttft_runs_s": ttfts,
            "ttft_p99_s": _p([r["first_token_at"] - r["arrival"] for r in rows], 0.99),
            "queue_wait_mean_s": _mean(waits), "moved": [res["moved"] for res in rs],
            "failed": sum(res["failed"] for res in rs), "makespan_s": _mean([res["makespan_s"] for res in rs]),
        }
    base = summaries["none"]
    table = [[name, f"{sm['ttft_mean_s'] * 1000:.0f}", _range(sm["ttft_runs_s"]),
              f"**{sm['ttft_mean_s'] / base['ttft_mean_s']:.2f}**", f"{sm['ttft_p99_s'] * 1000:.0f}",
              f"{sm['queue_wait_mean_s'] * 1000:.0f}", " / ".join(str(m) for m in sm["moved"]),
              f"{sm['makespan_s']:.1f}", str(sm["failed"])] for name, sm in summaries.items()]  # fmt: skip
    _save(json_path, "late_binding", {"summaries": summaries, "runs": runs})
    cmd = (f"python -m bench.ablations late-binding -n {requests} --rate {rate:g} --short {short} --long {long} "
           f"--repeats {repeats} --backend {backend} --sim-profile {sim_profile} --seed {seed}")
    return _emit(
        "Late binding: none vs busiest (two prefill instances)", cmd,
        ["late_binding", "TTFT mean (ms)", "per run", "ratio vs none", "TTFT p99 (ms)", "queue wait mean (ms)",
         "prompts moved per run", "makespan (s)", "failed"], table,
        [f"{requests} requests (half {short}-token prompts, half {long}), 2 output tokens, Poisson {rate:g} req/s, "
         f"2 prefill + 1 decode {backend} worker, SJF, prefill_engine_backlog 1, no co-located fallback, "
         f"{repeats} interleaved runs per row."])


@app.command("all")
def run_all(backend: BackendOpt = "sim", seed: SeedOpt = 0, json_path: JsonOpt = None) -> None:
    """The four ablations with their defaults."""
    prefill(backend=backend, seed=seed, json_path=json_path)
    dispatch(backend=backend, seed=seed, json_path=json_path)
    admission(backend=backend, seed=seed, json_path=json_path)
    flip(json_path=json_path)


if __name__ == "__main__":
    app()
