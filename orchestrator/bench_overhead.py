"""The orchestrator's overhead: TTFT and tokens/s through it against calling the worker directly.

    python -m orchestrator.bench_overhead [--requests 30] [--max-tokens 32]

One co-located worker; the orchestrator runs as its own process (`tetri serve`). Requests go one
at a time, alternating direct and through the orchestrator, so both see the same machine state.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import typer
import yaml

from orchestrator.launcher import Fleet, free_port

app = typer.Typer()


def _direct(url: str, ids: list[int], max_tokens: int, i: int) -> tuple[float, float]:
    body = {"request_id": f"direct-{i}", "prompt_ids": ids,
            "sampling": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}
    start = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line and ttft is None:
                ttft = time.perf_counter() - start
    return ttft or 0.0, time.perf_counter() - start


def _through(url: str, model: str, ids: list[int], max_tokens: int) -> tuple[float, float]:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and ttft is None:
                ttft = time.perf_counter() - start
    return ttft or 0.0, time.perf_counter() - start


@app.command()
def main(
    model: str = "smollm2-135m-instruct", requests: int = 30, max_tokens: int = 32, prompt_tokens: int = 64
) -> None:
    fleet = Fleet()
    orch = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            worker = fleet.start_worker("colocated", model, chunk_size="256")
            fleet.wait_healthy()
            port = free_port()
            config = Path(tmp) / "deploy.yaml"
            config.write_text(yaml.safe_dump({"model": model, "database_url": f"sqlite:///{tmp}/b.db",
                                              "instances": [{"url": worker.url, "role": "colocated",
                                                             "backend": "native", "model": model}]}))
            orch = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                                     "--config", str(config)], env={**os.environ})
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).json().get("healthy"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            ids = [(11 * i) % 4000 + 10 for i in range(prompt_tokens)]
            _direct(worker.url, ids, max_tokens, -1)
            _through(url, model, ids, max_tokens)  # warm both paths
            direct, through = [], []
            for i in range(requests):
                direct.append(_direct(worker.url, ids, max_tokens, i))
                through.append(_through(url, model, ids, max_tokens))
            d_ttft = statistics.median(t for t, _ in direct)
            o_ttft = statistics.median(t for t, _ in through)
            d_tps = max_tokens / statistics.median(t for _, t in direct)
            o_tps = max_tokens / statistics.median(t for _, t in through)
            result = {"direct_ttft_ms": d_ttft * 1e3, "orchestrator_ttft_ms": o_ttft * 1e3,
                      "overhead_ttft_ms": (o_ttft - d_ttft) * 1e3, "direct_tokens_per_s": d_tps,
                      "orchestrator_tokens_per_s": o_tps, "tokens_per_s_ratio": o_tps / d_tps}
            typer.echo("| path | median TTFT | tokens/s |\n|---|---:|---:|")
            typer.echo(f"| worker directly | {d_ttft * 1e3:.1f} ms | {d_tps:.1f} |")
            typer.echo(f"| through orchestrator | {o_ttft * 1e3:.1f} ms | {o_tps:.1f} |")
            typer.echo(json.dumps(result))
        finally:
            if orch is not None:
                orch.terminate()
                orch.wait(timeout=30)
            fleet.stop()


if __name__ == "__main__":
    app()
