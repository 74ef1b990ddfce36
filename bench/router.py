"""The router alone, side by side: `tetri serve`, SGLang's own Rust router (`sglang-router`,
`--pd-disaggregation`) and a floor (the P/D protocol done by hand in the client), all in front of
the same two SGLang fakes (a prefill and a decode server, no artificial sleeps).

    tetri bench router [--clients 1,16,64] [--requests 2000] [--tokens 16] [--out bench-results/router]

The three systems are interleaved in one invocation: for every concurrency level each system runs
its share in turn (rounds), so all see the same machine. Reported per system and level: TTFT and
end-to-end p50/p99, requests/s, errors, CPU-seconds per 1,000 requests of the router process, the
connections it holds to the fakes afterwards, and lopsided P/D pairs (a bootstrap room seen by one
fake and not the other). `--target URL` runs the same client load against any tetri (e.g. `tetri
up` with built-in workers) instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from orchestrator.launcher import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def _spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _wait_http(url: str, path: str = "/health", timeout_s: float = 120.0, ok: Callable[[httpx.Response], bool]
               = lambda r: r.status_code == 200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok(httpx.get(url + path, timeout=2.0)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}{path} did not answer in {timeout_s:.0f}s")


def start_fake(mode: str, log_dir: Path) -> Proc:
    """One SGLang fake in its own process, fast mode (no sleeps); its bootstrap port is its HTTP port."""
    port = free_port()
    code = (
        "import uvicorn\n"
        "from tests.fakes.sglang_fake import SGLangFakeConfig, create_app\n"
        f"app = create_app(SGLangFakeConfig(mode={mode!r}, token_delay_s=0.0, prefill_delay_s=0.0,"
        " max_running_requests=4096, max_total_num_tokens=10_000_000))\n"
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
    )
    proc = Proc(f"fake-{mode}", _spawn(f"fake-{mode}", [sys.executable, "-c", code], log_dir),
                f"http://127.0.0.1:{port}", log_dir / f"fake-{mode}.log")
    _wait_http(proc.url)
    return proc


def start_tetri(prefill: Proc, decode: Proc, log_dir: Path, name: str = "tetri", configured: bool = True,
                db: str = "tetri.db", **settings: Any) -> Proc:
    """`tetri serve` over the two fakes; `settings`: more keys of its YAML configuration.
    `configured=False`: a further replica on the same store, which drives the instances the store
    lists (several orchestrator replicas, docs/deploying.md)."""
    port = free_port()
    config = log_dir / f"{name}.yaml"
    instances = [
        {"url": prefill.url, "backend": "sglang", "role": "prefill", "model": MODEL},
        {"url": decode.url, "backend": "sglang", "role": "decode", "model": MODEL},
    ] if configured else []
    config.write_text(json.dumps({"model": MODEL, "database_url": f"sqlite:///{log_dir / db}", "replica_id": name,
                                  "instances": instances, "max_queued_requests": 100_000, **settings}))
    popen = _spawn(name, [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                          "--config", str(config)], log_dir)
    proc = Proc(name, popen, f"http://127.0.0.1:{port}", log_dir / f"{name}.log")
    _wait_http(proc.url, ok=lambda r: r.status_code == 200 and r.json().get("healthy", 0) >= 2)
    return proc


def start_sglang_router(prefill: Proc, decode: Proc, log_dir: Path) -> Proc:
    port = free_port()
    bootstrap = prefill.url.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
            "--port", str(port), "--prefill", prefill.url, bootstrap, "--decode", decode.url,
            "--prometheus-port", str(free_port()), "--log-level", "warn"]
    proc = Proc("sglang-router", _spawn("sglang-router", args, log_dir), f"http://127.0.0.1:{port}",
                log_dir / "sglang-router.log")
    _wait_http(proc.url, path="/health", timeout_s=120)
    return proc


def stop(procs: list[Proc]) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.terminate()
    for p in procs:
        try:
            p.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.popen.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def connections_to(pid: int, ports: set[int]) -> int:
    """Established TCP connections from this process (and children) to any of `ports`."""
    import psutil

    proc = psutil.Process(pid)
    count = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        count += sum(1 for c in conns if c.status == "ESTABLISHED" and c.raddr and c.raddr.port in ports)
    return count


# --------------------------------------------------------------------------- clients


@dataclass
class Sample:
    ttft_s: float | None
    e2e_s: float
    error: str | None = None
    aborted: bool = False


def _prompt(i: int, length: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(10, 4000) for _ in range(length)]


async def _openai(client: aiohttp.ClientSession, url: str, i: int, tokens: int, prompt_len: int,
                  abort: bool = False) -> Sample:
    """A streamed /v1/completions through tetri (`abort`: the client leaves after the first chunk)."""
    body = {"model": MODEL, "prompt": _prompt(i, prompt_len), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    return await _stream(client, f"{url}/v1/completions", body, abort)


async def _generate(client: aiohttp.ClientSession, url: str, i: int, tokens: int, prompt_len: int) -> Sample:
    """A streamed native /generate through sglang-router."""
    body = {"input_ids": _prompt(i, prompt_len), "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    return await _stream(client, f"{url}/generate", body)


async def _stream(client: aiohttp.ClientSession, url: str, body: dict[str, Any], abort: bool = False) -> Sample:
    """Time one streamed request: TTFT at the first data line, the end at the end of the body.
    `abort`: close the connection after the first data line (a client that leaves)."""
    start = time.perf_counter()
    ttft = None
    done = False
    try:
        async with client.post(url, data=json.dumps(body), headers=_JSON) as resp:
            if resp.status != 200:
                await resp.read()
                return Sample(None, time.perf_counter() - start, f"HTTP {resp.status}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - start
                    if abort:
                        resp.close()
                        return Sample(ttft, time.perf_counter() - start, None, aborted=True)
                if line.startswith(b'data: {"error"'):
                    return Sample(ttft, time.perf_counter() - start, line[:200].decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(ttft, time.perf_counter() - start, repr(exc))
    return Sample(ttft, time.perf_counter() - start, None if done else "stream ended without [DONE]")


async def _floor(client: aiohttp.ClientSession, prefill: str, decode: str, i: int, tokens: int, prompt_len: int,
                 bootstrap_port: int) -> Sample:
    """The P/D protocol by hand: one body with a fresh room to both servers at once; the answer is
    the decode's stream, the prefill's is read to its end."""
    body = {"input_ids": _prompt(i, prompt_len), "stream": True, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": bootstrap_port, "bootstrap_room": random.getrandbits(63),
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}

    async def drain() -> None:
        async with client.post(f"{prefill}/generate", data=json.dumps(body), headers=_JSON) as resp:
            await resp.read()

    side = asyncio.ensure_future(drain())
    sample = await _stream(client, f"{decode}/generate", body)
    try:
        await side
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = sample.error or repr(exc)
    return sample


_JSON = {"content-type": "application/json"}


# --------------------------------------------------------------------------- the run


@dataclass
class Cell:
    system: str
    clients: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def row(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error is None]
        ttfts = sorted(s.ttft_s for s in ok if s.ttft_s is not None)
        e2es = sorted(s.e2e_s for s in ok)
        n = len(self.samples)
        return {
            "system": self.system, "clients": self.clients, "requests": n,
            "errors": n - len(ok),
            "ttft_p50_ms": _pct(ttfts, 50) * 1e3, "ttft_p99_ms": _pct(ttfts, 99) * 1e3,
            "e2e_p50_ms": _pct(e2es, 50) * 1e3, "e2e_p99_ms": _pct(e2es, 99) * 1e3,
            "req_per_s": n / self.wall_s if self.wall_s else 0.0,
            "cpu_s_per_1000": 1000 * self.cpu_s / n if n else 0.0,
            "first_errors": sorted({s.error for s in self.samples if s.error})[:3],
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def _load(call: Callable[[aiohttp.ClientSession, int], Any], clients: int, n: int, start_id: int) -> tuple[
        list[Sample], float]:
    """`n` requests from `clients` concurrent clients (aiohttp: the load generator should cost the
    shared machine as little as it can)."""
    connector = aiohttp.TCPConnector(limit=clients * 2 + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        counter = iter(range(start_id, start_id + n))
        samples: list[Sample] = []

        async def worker() -> None:
            for i in counter:
                samples.append(await call(client, i))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return samples, time.perf_counter() - started


@contextmanager
def _stack(log_dir: Path, systems: list[str]) -> Iterator[dict[str, Proc]]:
    procs: list[Proc] = []
    try:
        prefill = start_fake("prefill", log_dir)
        procs.append(prefill)
        decode = start_fake("decode", log_dir)
        procs.append(decode)
        out = {"prefill": prefill, "decode": decode}
        if "tetri" in systems:
            out["tetri"] = start_tetri(prefill, decode, log_dir)
            procs.append(out["tetri"])
        if "tetri-x2" in systems:  # two replicas on one store; the client alternates, as a balancer would
            for i, name in enumerate(("tetri-x2", "tetri-x2-b")):
                out[name] = start_tetri(prefill, decode, log_dir, name, configured=i == 0, db="replicas.db")
                procs.append(out[name])
        if "sglang-router" in systems:
            out["sglang-router"] = start_sglang_router(prefill, decode, log_dir)
            procs.append(out["sglang-router"])
        yield out
    finally:
        stop(procs)


_MEMBERS = {"tetri-x2": ("tetri-x2", "tetri-x2-b")}  # a system's processes (CPU and connections are summed)


def fake_rooms(url: str) -> set[int]:
    data = httpx.get(f"{url}/_fake_stats", timeout=10).json()
    return {int(r) for r in data["rooms"]}


def run_router_bench(clients: list[int], requests: int, tokens: int, prompt_len: int, rounds: int,
                     systems: list[str], log_dir: Path,
                     progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    cells: dict[tuple[str, int], Cell] = {}
    with _stack(log_dir, systems) as procs:
        prefill, decode = procs["prefill"], procs["decode"]
        bport = int(prefill.url.rsplit(":", 1)[1])
        fake_ports = {bport, int(decode.url.rsplit(":", 1)[1])}
        calls: dict[str, Callable[[aiohttp.ClientSession, int], Any]] = {
            "floor": lambda c, i: _floor(c, prefill.url, decode.url, i, tokens, prompt_len, bport),
        }
        if "tetri" in procs:
            calls["tetri"] = lambda c, i: _openai(c, procs["tetri"].url, i, tokens, prompt_len)
        if "tetri-x2" in procs:
            urls = (procs["tetri-x2"].url, procs["tetri-x2-b"].url)
            calls["tetri-x2"] = lambda c, i: _openai(c, urls[i % 2], i, tokens, prompt_len)
        if "sglang-router" in procs:
            calls["sglang-router"] = lambda c, i: _generate(c, procs["sglang-router"].url, i, tokens, prompt_len)
        order = [s for s in systems if s in calls]
        for name in order:  # warm every path (connections, tokenizer, JIT-free but caches)
            asyncio.run(_load(calls[name], 4, 20, 10_000_000))
        next_id = 0
        for c in clients:
            per_round = max(c, requests // rounds)
            for r in range(rounds):
                for name in order[r % len(order):] + order[: r % len(order)]:
                    cell = cells.setdefault((name, c), Cell(name, c))
                    pids = [procs[key].pid for key in _MEMBERS.get(name, (name,)) if key in procs]
                    cpu0 = sum(cpu_seconds(pid) for pid in pids)
                    samples, wall = asyncio.run(_load(calls[name], c, per_round, next_id))
                    next_id += per_round
                    cell.samples += samples
                    cell.wall_s += wall
                    cell.cpu_s += sum(cpu_seconds(pid) for pid in pids) - cpu0
                    progress(f"{name} @{c} round {r + 1}/{rounds}: {len(samples) / wall:.0f} req/s")
        time.sleep(1.0)  # let closed connections settle before counting what is held
        conns = {name: sum(connections_to(procs[key].pid, fake_ports) for key in _MEMBERS.get(name, (name,)))
                 for name in ("tetri", "tetri-x2", "sglang-router") if name in procs}
        p_rooms, d_rooms = fake_rooms(prefill.url), fake_rooms(decode.url)
    rows = [cell.row() for cell in cells.values()]
    for row in rows:
        row["connections_after"] = conns.get(row["system"])
    floor = {row["clients"]: row for row in rows if row["system"] == "floor"}
    for row in rows:
        base = floor.get(row["clients"])
        if base is not None:
            row["ttft_added_ms"] = row["ttft_p50_ms"] - base["ttft_p50_ms"]
    return {"rows": rows, "lopsided_rooms": len(p_rooms ^ d_rooms), "rooms_prefill": len(p_rooms),
            "rooms_decode": len(d_rooms), "tokens": tokens, "prompt_tokens": prompt_len}


def run_target(url: str, clients: list[int], requests: int, tokens: int, prompt_len: int,
               progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The same client load against an already running tetri (`tetri up`)."""
    rows = []
    for c in clients:
        cell = Cell("tetri up", c)
        samples, wall = asyncio.run(_load(lambda cl, i: _openai(cl, url, i, tokens, prompt_len), c,
                                          max(c, requests), 0))
        cell.samples, cell.wall_s = samples, wall
        progress(f"target @{c}: {len(samples) / wall:.1f} req/s")
        row = cell.row()
        row.pop("cpu_s_per_1000")
        rows.append(row)
    return {"rows": rows, "tokens": tokens, "prompt_tokens": prompt_len}


def markdown(result: dict[str, Any]) -> str:
    cols = ["system", "clients", "requests", "errors", "req_per_s", "ttft_p50_ms", "ttft_p99_ms", "ttft_added_ms",
            "e2e_p50_ms", "e2e_p99_ms", "cpu_s_per_1000", "connections_after"]
    rows = sorted(result["rows"], key=lambda r: (r["clients"], r["system"]))
    present = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    for r in rows:
        cells = []
        for c in present:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    by = {(r["system"], r["clients"]): r for r in rows}
    ratios = []
    for c, tname in [(c, t) for c in sorted({r["clients"] for r in rows}) for t in ("tetri", "tetri-x2")]:
        t, s = by.get((tname, c)), by.get(("sglang-router", c))
        if t and s:
            added_t, added_s = t.get("ttft_added_ms"), s.get("ttft_added_ms")
            ratios.append(
                f"| {c} | {tname} | {t['req_per_s'] / s['req_per_s']:.2f} | "
                f"{t['cpu_s_per_1000'] / max(s['cpu_s_per_1000'], 1e-9):.2f} | "
                + (f"{added_t:.2f} ms / {added_s:.2f} ms |" if added_t is not None and added_s is not None
                   else "- (no floor run) |"))
    if ratios:
        lines += ["", "| clients | system | / sglang-router req/s | CPU per request ratio | TTFT added over floor "
                  "(p50, system / sglang-router) |", "|---|---|---|---|---|", *ratios]
    if "lopsided_rooms" in result:
        lines += ["", f"Lopsided P/D pairs: {result['lopsided_rooms']} (rooms seen: prefill "
                  f"{result['rooms_prefill']}, decode {result['rooms_decode']})."]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    systems = sorted({r["system"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in systems:
        mine = sorted((r for r in rows if r["system"] == name), key=lambda r: r["clients"])
        xs = [r["clients"] for r in mine]
        axes[0].plot(xs, [r["req_per_s"] for r in mine], marker="o", label=name)
        axes[1].plot(xs, [r["ttft_p99_ms"] for r in mine], marker="o", label=name)
        axes[2].plot(xs, [r["e2e_p99_ms"] for r in mine], marker="o", label=name)
    for ax, title in zip(axes, ("requests/s", "TTFT p99 (ms)", "end-to-end p99 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, out / "router.png")
    report = out / "report.md"
    report.write_text(f"# {title}\n\n{markdown(result)}\n\n![router](router.png)\n")
    return report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def temp_logs() -> Path:
    return Path(tempfile.mkdtemp(prefix="tetri-router-bench-"))
