"""Soak: many requests through a real fleet with clients that leave and a worker that dies.

    python -m bench.soak --requests 10000 --abort-fraction 0.05

Starts one prefill and one decode built-in worker (the tiny random Llama: fast on a CPU) and the
orchestrator, each its own process, as `tetri up` does. Sends `--requests` streamed completions from
`--concurrency` clients; a fraction of the clients leave (before the first token, right after it,
or mid-decode). Halfway through, the decode worker is SIGKILLed and started again on its port.
Then it checks the two things a fault must not break:

- lost: every request the orchestrator accepted ended `finished`, `failed` with a reason, or
  `cancelled` in its store, and every client got an answer (the whole stream, an error, or left);
- leaked: the KV pool of every worker is back to empty (nothing used, nothing leased).

It writes a Markdown summary (`--out`) and exits non-zero when anything was lost or leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.launcher import Fleet, WorkerProcess, free_port

MODEL = "random:tiny-llama"
ADMIN_TOKEN = "soak-admin-token"
ENDED = ("finished", "failed", "cancelled")
IN_FLIGHT = ("queued", "prefilling", "transferring", "decoding")
REPO = Path(__file__).resolve().parents[1]

app = typer.Typer(add_completion=False, help=__doc__)
console = Console()


@dataclass
class Outcome:
    kind: str  # done | error | left
    phase: str = ""  # where a client that left did so: queued-or-prefill, first-token, decoding
    request_id: str | None = None
    error: str | None = None


@dataclass
class Stack:
    fleet: Fleet
    orchestrator: subprocess.Popen[bytes]
    url: str
    db: Path
    log_dir: Path
    kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- processes


def _start_worker(role: str, port: int, log_dir: Path) -> WorkerProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", "worker", "--backend", "native", "--role", role,
           "--port", str(port), "--model", MODEL, "--chunk-size", "64", "--kv-tokens", "8192"]
    log = log_dir / f"worker-{role}-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerProcess(role, port, proc, log)  # type: ignore[arg-type]


def _wait(url: str, ok: Any, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok(httpx.get(url, timeout=2.0)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f}s")


def start_stack(log_dir: Path) -> Stack:
    fleet = Fleet()
    for role in ("prefill", "decode"):
        fleet.workers.append(_start_worker(role, free_port(), log_dir))
    fleet.wait_healthy(timeout_s=300)
    db = log_dir / "tetri.db"
    instances = [{"url": w.url, "backend": "native", "role": w.role, "model": MODEL, "id": f"{w.role}-0"}
                 for w in fleet.workers]
    config = log_dir / "tetri.yaml"
    config.write_text(json.dumps({
        "model": MODEL, "database_url": f"sqlite:///{db}", "admin_token": ADMIN_TOKEN, "instances": instances,
        "predictor": "constant", "tokenizers": {"*": "smollm2-135m-instruct"}, "monitor_interval_ms": 100,
        "max_queued_requests": 100_000,
    }))
    port = free_port()
    with (log_dir / "tetri.log").open("ab") as out:
        orch = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                                 "--config", str(config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", lambda r: r.status_code == 200 and r.json().get("healthy", 0) >= 2)
    return Stack(fleet, orch, url, db, log_dir)


def restart_worker(stack: Stack, index: int) -> float:
    """SIGKILL a worker and start it again on its port; seconds until it is healthy again."""
    old = stack.fleet.workers[index]
    started = time.monotonic()
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait(10)
    stack.fleet.workers[index] = _start_worker(old.role, old.port, stack.log_dir)
    _wait(f"{old.url}/health", lambda r: r.status_code == 200)
    return time.monotonic() - started


def stop_stack(stack: Stack) -> None:
    if stack.orchestrator.poll() is None:
        stack.orchestrator.terminate()
        try:
            stack.orchestrator.wait(30)
        except subprocess.TimeoutExpired:
            stack.orchestrator.kill()
    stack.fleet.stop()


# --------------------------------------------------------------------------- clients


def _prompt(i: int, length: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(10, 4000) for _ in range(length)]


async def one(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, prompt_len: int,
              leave: str | None, rng: random.Random) -> Outcome:
    """One streamed completion; `leave`: where the client drops the connection (None: it stays)."""
    body = {"model": MODEL, "prompt": _prompt(i, prompt_len), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}

    async def call() -> Outcome:
        rid = None
        seen = 0
        leave_after = 1 if leave == "first-token" else rng.randint(2, max(2, max_tokens // 2))
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                return Outcome("error", error=f"HTTP {resp.status}: {text[:200]}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return Outcome("done", request_id=rid)
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                rid = chunk.get("id", rid)
                if "error" in chunk:
                    return Outcome("error", request_id=rid, error=str(chunk["error"])[:200])
                seen += 1
                if leave in ("first-token", "decoding") and seen >= leave_after:
                    resp.close()  # the client leaves
                    return Outcome("left", leave, rid)
        return Outcome("error", request_id=rid, error="stream ended without [DONE]")

    try:
        if leave == "queued-or-prefill":
            # Leave before the first token: cancel the call a moment after sending it.
            try:
                return await asyncio.wait_for(call(), timeout=rng.uniform(0.001, 0.03))
            except TimeoutError:
                return Outcome("left", leave)
        return await call()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome("error", error=repr(exc)[:200])


async def drive(url: str, n: int, concurrency: int, abort_fraction: float, max_tokens: int, prompt_len: int,
                on_half: Any, seed: int) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    plan = [rng.choice(("queued-or-prefill", "first-token", "decoding")) if rng.random() < abort_fraction else None
            for _ in range(n)]
    outcomes: list[Outcome] = []
    counter = iter(range(n))
    restarted = asyncio.Event()
    with Progress(TextColumn("[bold]soak"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[note]}"), console=console) as progress:
        task = progress.add_task("requests", total=n, note="")
        connector = aiohttp.TCPConnector(limit=concurrency * 2 + 4)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def client() -> None:
                for i in counter:
                    outcome = await one(session, url, i, max_tokens, prompt_len, plan[i], rng)
                    outcomes.append(outcome)
                    progress.advance(task)
                    if outcome.kind == "error":
                        await asyncio.sleep(1.0)  # as a client told Retry-After: 1 would (the 503s say so)
                    if len(outcomes) == n // 2 and not restarted.is_set():
                        restarted.set()
                        progress.update(task, note="restarting the decode worker")
                        # In a thread: the other clients go on (and meet the dead worker) meanwhile.
                        took = await asyncio.to_thread(on_half)
                        progress.update(task, note=f"decode worker back after {took:.1f}s")

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return outcomes, time.perf_counter() - started


# --------------------------------------------------------------------------- checks


def kv_after(urls: list[str], settle_s: float) -> tuple[list[dict[str, Any]], float]:
    """Poll the workers until no KV is used or leased (or `settle_s` passed); the last reports."""
    started = time.monotonic()
    while True:
        loads = [httpx.get(f"{u}/load", timeout=5).json() for u in urls]
        if all(ld["free_kv_tokens"] == ld["total_kv_tokens"] and ld["active_leases"] == 0 and ld["running"] == 0
               for ld in loads) or time.monotonic() - started > settle_s:
            return loads, time.monotonic() - started
        time.sleep(0.1)


def store_rows(db: Path) -> list[dict[str, Any]]:
    from orchestrator.store import Store

    store = Store(f"sqlite:///{db}")
    try:
        return store.list_requests(limit=10_000_000)
    finally:
        store.close()


def summarize(args: dict[str, Any], outcomes: list[Outcome], wall_s: float, restart_s: float,
              rows: list[dict[str, Any]], loads: list[dict[str, Any]], settle_s: float,
              stats: dict[str, Any]) -> dict[str, Any]:
    by_id = {r["id"]: r for r in rows}
    states = Counter(r["state"] for r in rows)
    failed_without_reason = [r["id"] for r in rows if r["state"] == "failed" and not r.get("error")]
    in_flight = [r["id"] for r in rows if r["state"] not in ENDED]
    # A client's request whose record says something else than what the client saw.
    mismatched = [o.request_id for o in outcomes if o.request_id and o.kind == "done"
                  and (by_id.get(o.request_id) or {}).get("state") != "finished"]
    unknown = [o.request_id for o in outcomes if o.request_id and o.request_id not in by_id]
    lost = len(in_flight) + len(failed_without_reason) + len(mismatched) + len(unknown)
    leaked_tokens = sum(ld["total_kv_tokens"] - ld["free_kv_tokens"] for ld in loads)
    leaked_leases = sum(ld["active_leases"] for ld in loads)
    kinds = Counter(o.kind for o in outcomes)
    return {
        **args, "wall_s": wall_s, "req_per_s": len(outcomes) / wall_s if wall_s else 0.0,
        "client": dict(kinds), "left_at": dict(Counter(o.phase for o in outcomes if o.kind == "left")),
        "records": len(rows), "states": dict(states), "lost": lost, "in_flight": len(in_flight),
        "failed_without_reason": len(failed_without_reason), "mismatched": len(mismatched), "unknown": len(unknown),
        "leaked_kv_tokens": leaked_tokens, "leaked_leases": leaked_leases, "kv_settle_s": settle_s,
        "restart_s": restart_s, "migrations": stats.get("migrations"),
        "errors": Counter((o.error or "")[:90] for o in outcomes if o.kind == "error").most_common(4),
        "failure_reasons": Counter((r.get("error") or "")[:90] for r in rows
                                   if r["state"] == "failed").most_common(4),
    }


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"Command: `python -m bench.soak --requests {s['requests']} --abort-fraction {s['abort_fraction']} "
        f"--concurrency {s['concurrency']} --max-tokens {s['max_tokens']} --prompt-len {s['prompt_len']}`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent | {s['requests']} ({s['concurrency']} concurrent clients) |",
        f"| wall time | {s['wall_s']:.1f} s ({s['req_per_s']:.1f} req/s) |",
        f"| clients: whole answer / error / left | {s['client'].get('done', 0)} / {s['client'].get('error', 0)}"
        f" / {s['client'].get('left', 0)} |",
        f"| clients that left, by phase | {', '.join(f'{k}: {v}' for k, v in sorted(s['left_at'].items())) or '-'} |",
        f"| records in the store | {s['records']} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(s['states'].items()))}) |",
        f"| decode worker SIGKILLed and restarted | once, healthy again after {s['restart_s']:.1f} s |",
        f"| **requests lost** | **{s['lost']}** (in flight: {s['in_flight']}, failed without a reason: "
        f"{s['failed_without_reason']}, answered but not finished: {s['mismatched']}, "
        f"no record: {s['unknown']}) |",
        f"| **KV leaked** | **{s['leaked_kv_tokens']} tokens, {s['leaked_leases']} leases** "
        f"(pools empty {s['kv_settle_s']:.1f} s after the last request) |",
    ]
    if s["failure_reasons"]:
        lines += ["", "Failed requests, most common reasons: "
                  + "; ".join(f"{n}× `{reason}`" for reason, n in s["failure_reasons"])]
    return "\n".join(lines) + "\n"


@app.command()
def main(
    requests: Annotated[int, typer.Option(help="Requests to send.")] = 10_000,
    abort_fraction: Annotated[float, typer.Option(help="Fraction of clients that leave early.")] = 0.05,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 16,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the abort plan and the prompts.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the Markdown summary here.")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Process logs and the store [default: a temp dir].")] = None,
) -> None:
    """Soak the stack; exit 1 if any request was lost or any KV leaked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tetri-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"starting workers and the orchestrator (logs in {log_dir})")
    stack = start_stack(log_dir)
    restart_s = [0.0]

    def on_half() -> float:
        restart_s[0] = restart_worker(stack, index=1)  # the decode worker
        return restart_s[0]

    try:
        outcomes, wall_s = asyncio.run(drive(stack.url, requests, concurrency, abort_fraction, max_tokens,
                                             prompt_len, on_half, seed))
        loads, settle_s = kv_after([w.url for w in stack.fleet.workers], settle_s=10.0)
        metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
        migrations = next((float(line.split()[1]) for line in metrics.splitlines()
                           if line.startswith("tetri_migrations_total ")), None)
    finally:
        stop_stack(stack)  # a clean stop flushes the store's writes
    rows = store_rows(stack.db)
    args = {"requests": requests, "abort_fraction": abort_fraction, "concurrency": concurrency,
            "max_tokens": max_tokens, "prompt_len": prompt_len}
    summary = summarize(args, outcomes, wall_s, restart_s[0], rows, loads, settle_s, {"migrations": migrations})
    text = markdown(summary)
    console.print(text)
    if summary["errors"]:
        console.print(f"client errors, most common: {summary['errors']}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    (log_dir / "soak.json").write_text(json.dumps(summary, indent=2, default=str))
    if summary["lost"] or summary["leaked_kv_tokens"] or summary["leaked_leases"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
