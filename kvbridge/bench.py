"""KV transfer throughput prefill -> decode on loopback (native push), with a Markdown table.

    python -m kvbridge.bench [--model smollm2-135m-instruct] [--lengths 128,512,1024,2048]

Starts one prefill and one decode worker, prefills prompts of each length with a handoff to the
decode worker, and reports the bytes pushed and the push time the prefill worker measured
(serialization excluded, HTTP PUT + decode-side import included).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time

import httpx
import numpy as np
import typer

from orchestrator.launcher import Fleet

app = typer.Typer()


def _sink(port_queue: mp.Queue, size: int, repeats: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    for _ in range(repeats):
        conn, _ = server.accept()
        view = memoryview(np.empty(size, dtype=np.uint8))
        got = 0
        while got < size:
            got += conn.recv_into(view[got:], min(size - got, 1 << 22))
        conn.sendall(b"k")
        conn.close()


def loopback_baseline(size: int, repeats: int = 3) -> float:
    """Bytes/s of a bare socket between two processes on this machine: the ceiling right now."""
    ports: mp.Queue = mp.Queue()
    proc = mp.Process(target=_sink, args=(ports, size, repeats))
    proc.start()
    port = ports.get(timeout=30)
    data = memoryview(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8))
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(data)
            sock.recv(1)
        rates.append(size / (time.perf_counter() - started))
    proc.join(timeout=30)
    return statistics.median(rates)


@app.command()
def main(model: str = "smollm2-135m-instruct", lengths: str = "128,512,1024,2048", repeats: int = 5) -> None:
    fleet = Fleet()
    try:
        prefill = fleet.start_worker("prefill", model, chunk_size="512", kv_tokens=16384)
        decode = fleet.start_worker("decode", model, chunk_size="512", kv_tokens=16384)
        fleet.wait_healthy()
        rows = []
        for n in [int(x) for x in lengths.split(",")]:
            rates, wire, sizes = [], [], []
            for r in range(repeats):
                rid = f"kvbench-{n}-{r}"
                body = {"request_id": rid, "prompt_ids": [(7 * i) % 4000 + 10 for i in range(n)],
                        "sampling": {"temperature": 0, "max_tokens": 2, "ignore_eos": True},
                        "handoff": {"decode_url": decode.url, "lease_s": 30}}
                kv = httpx.post(f"{prefill.url}/prefill", json=body, timeout=300).json()["kv"]
                httpx.delete(f"{decode.url}/kv/{rid}", timeout=30)
                rates.append(kv["nbytes"] / kv["transfer_s"])
                if "wire_s" in kv["extra"]:
                    wire.append(kv["nbytes"] / kv["extra"]["wire_s"])
                sizes.append(kv["nbytes"])
            rows.append((n, sizes[0], statistics.median(rates), statistics.median(wire) if wire else 0.0))
        typer.echo("| prompt tokens | KV bytes | handoff (push + import into the pool) | on the wire alone "
                   "| bare-socket baseline, same size | wire / baseline |")
        typer.echo("|---:|---:|---:|---:|---:|---:|")
        for n, size, rate, wire_rate in rows:
            base = loopback_baseline(size)
            typer.echo(f"| {n} | {size / 1e6:.1f} MB | {rate / 1e9:.2f} GB/s | {wire_rate / 1e9:.2f} GB/s "
                       f"| {base / 1e9:.2f} GB/s | {wire_rate / base:.2f} |")
    finally:
        fleet.stop()


if __name__ == "__main__":
    app()
