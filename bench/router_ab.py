"""Two `tetri serve` trees, side by side, over the same SGLang fakes: CPU per request of the router's
request path, before and after a change, measured in one invocation (this machine is shared and
noisy: only a same-run ratio means anything).

    python -m bench.router_ab --base 5b70ed5 [--rounds 10] [--requests 1500] [--clients 64]

The base revision is checked out into a temporary `git worktree`; the other side is this working
tree. Each round runs the same load through both (alternating which goes first); reported: the
median of the rounds' CPU-seconds per 1,000 requests (`/proc` user+system of each `tetri serve`
process) and requests/s, and the ratio of the medians.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bench.router import MODEL, REPO, Proc, _load, _openai, _wait_http, cpu_seconds, start_fake, stop
from orchestrator.launcher import free_port

app = typer.Typer(add_completion=False, help=__doc__)


def _serve(tree: Path, name: str, prefill: Proc, decode: Proc, log_dir: Path) -> Proc:
    port = free_port()
    config = log_dir / f"{name}.yaml"
    config.write_text(json.dumps({
        "model": MODEL, "database_url": f"sqlite:///{log_dir / name}.db", "replica_id": name,
        "max_queued_requests": 100_000,
        "instances": [{"url": prefill.url, "backend": "sglang", "role": "prefill", "model": MODEL},
                      {"url": decode.url, "backend": "sglang", "role": "decode", "model": MODEL}],
    }))
    args = [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port), "--config", str(config)]
    # Run from the tree itself: `python -m` puts the working directory first on the module path.
    popen = subprocess.Popen(args, cwd=tree, stdout=(log_dir / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(tree)})
    proc = Proc(name, popen, f"http://127.0.0.1:{port}", log_dir / f"{name}.log")
    _wait_http(proc.url, ok=lambda r: r.status_code == 200 and r.json().get("healthy", 0) >= 2)
    return proc


@app.command()
def main(
    base: Annotated[str, typer.Option(help="The git revision to compare the working tree with.")],
    rounds: Annotated[int, typer.Option(help="Interleaved rounds.")] = 10,
    requests: Annotated[int, typer.Option(help="Requests per tree and round.")] = 1500,
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 64,
    tokens: Annotated[int, typer.Option(help="Tokens each request streams.")] = 16,
) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="router-ab-"))
    base_tree = log_dir / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), base], cwd=REPO, check=True)
    procs: list[Proc] = []
    try:
        prefill, decode = start_fake("prefill", log_dir), start_fake("decode", log_dir)
        procs += [prefill, decode]
        sides = {"base": _serve(base_tree, "base", prefill, decode, log_dir),
                 "new": _serve(REPO, "new", prefill, decode, log_dir)}
        procs += sides.values()
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        rate: dict[str, list[float]] = {name: [] for name in sides}
        for proc in sides.values():  # warm-up: connections, caches
            asyncio.run(_load(lambda c, i, u=proc.url: _openai(c, u, i, tokens, 64), clients, 300, 0))
        next_id = 10_000
        for r in range(rounds):
            for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                proc = sides[name]
                before = cpu_seconds(proc.pid)
                samples, wall = asyncio.run(_load(lambda c, i, u=proc.url: _openai(c, u, i, tokens, 64),
                                                  clients, requests, next_id))
                next_id += requests
                errors = sum(1 for s in samples if s.error)
                cpu[name].append(1000 * (cpu_seconds(proc.pid) - before) / requests)
                rate[name].append(requests / wall)
                typer.echo(f"round {r} {name}: {cpu[name][-1]:.3f} CPU-s / 1,000 req, {rate[name][-1]:.0f} req/s, "
                           f"{errors} errors")
        med = {name: (statistics.median(cpu[name]), statistics.median(rate[name])) for name in sides}
        for name, (c, q) in med.items():
            typer.echo(f"{name}: median {c:.3f} CPU-s / 1,000 requests, {q:.0f} req/s")
        typer.echo(f"new / base CPU per request: {med['new'][0] / med['base'][0]:.3f}")
    finally:
        stop(procs)
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
