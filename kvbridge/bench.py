"""KV transfer throughput prefill -> decode on loopback (native push), with a Markdown table.

    python -m kvbridge.bench [--model smollm2-135m-instruct] [--lengths 128,512,1024,2048]

Starts one prefill and one decode worker, prefills prompts of each length with a handoff to the
decode worker, and reports the bytes pushed and the push time the prefill worker measured
(serialization excluded, HTTP PUT + decode-side import included).
"""

from __future__ import annotations

import statistics

import httpx
import typer

from orchestrator.launcher import Fleet

app = typer.Typer()


@app.command()
def main(model: str = "smollm2-135m-instruct", lengths: str = "128,512,1024,2048", repeats: int = 5) -> None:
    fleet = Fleet()
    try:
        prefill = fleet.start_worker("prefill", model, chunk_size="512", kv_tokens=16384)
        decode = fleet.start_worker("decode", model, chunk_size="512", kv_tokens=16384)
        fleet.wait_healthy()
        rows = []
        for n in [int(x) for x in lengths.split(",")]:
            rates, sizes = [], []
            for r in range(repeats):
                rid = f"kvbench-{n}-{r}"
                body = {"request_id": rid, "prompt_ids": [(7 * i) % 4000 + 10 for i in range(n)],
                        "sampling": {"temperature": 0, "max_tokens": 2, "ignore_eos": True},
                        "handoff": {"decode_url": decode.url, "lease_s": 30}}
                kv = httpx.post(f"{prefill.url}/prefill", json=body, timeout=300).json()["kv"]
                httpx.delete(f"{decode.url}/kv/{rid}", timeout=30)
                rates.append(kv["nbytes"] / kv["transfer_s"])
                sizes.append(kv["nbytes"])
            rows.append((n, sizes[0], statistics.median(rates)))
        typer.echo("| prompt tokens | KV bytes | median push throughput |")
        typer.echo("|---:|---:|---:|")
        for n, size, rate in rows:
            typer.echo(f"| {n} | {size / 1e6:.1f} MB | {rate / 1e9:.2f} GB/s |")
    finally:
        fleet.stop()


if __name__ == "__main__":
    app()
