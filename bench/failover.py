"""Leader failover (`tetri bench failover`, issue 19): two orchestrator replicas, real processes on
one store, share native workers (one prefill, two decode with small KV pools). Requests are split
across both; mid-run the leader is SIGKILLed. Measured: how long until the follower holds the
lease, how long until it ran the leader's loops (recovery of the dead replica's requests), requests
lost (a request cut by the kill is sent again to the surviving replica, as a load balancer in
front of the replicas does; lost = no complete answer from either), and the decode workers' KV as
their load reports show it (never more used or leased than the pool holds)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orchestrator.launcher import Fleet, free_port
from orchestrator.store import INFLIGHT_STATES, Store

MODEL = "random:tiny-llama"
TOKEN = "bench-failover"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class KVWatch:
    """One decode worker's pool as its /load reports showed it during the run."""

    total: int = 0
    max_used: int = 0
    max_leased: int = 0
    reports: int = 0
    over: int = 0  # reports with more used or leased than the pool holds, or negative free


@dataclass
class FailoverResult:
    database: str
    requests: int
    completed: int = 0
    lost: int = 0
    retried: int = 0  # answered on a later attempt: cut by the kill (sent to the other replica) or refused
    cut_by_kill: int = 0  # attempts whose connection the kill broke
    refused: dict[str, int] = field(default_factory=dict)  # attempts answered with an error status, by status
    per_replica: dict[str, int] = field(default_factory=dict)  # answered by each
    leader_before: str = ""
    leader_after: str = ""
    failover_s: float | None = None  # SIGKILL -> the follower holds the lease
    loops_s: float | None = None  # SIGKILL -> the new leader recovered the dead replica's requests
    dead_requests_failed: int = 0  # the killed replica's in-flight rows the new leader failed
    inflight_rows_left: int = 0  # rows still in flight at the end (should be 0)
    sync_visible_s: float | None = None  # registered through one replica -> driven by the other
    kv: dict[str, KVWatch] = field(default_factory=dict)
    handoff_507: int = 0  # KV pushes a decode worker refused (pool full), re-placed by the orchestrator
    wall_s: float = 0.0
    lease_s: float = 0.0
    renew_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_replica(replica_id: str, db_url: str, instances: list[dict[str, Any]], log: Path, *, lease_s: float,
                  renew_s: float, replica_timeout_s: float, sync_s: float) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """`tetri serve` as its own process; returns it and its URL once /health answers."""
    port = free_port()
    env = {**os.environ, "TETRI_DATABASE_URL": db_url, "TETRI_ADMIN_TOKEN": TOKEN, "TETRI_MODEL": MODEL,
           "TETRI_PREDICTOR": "constant", "TETRI_INSTANCES": json.dumps(instances), "TETRI_REPLICA_ID": replica_id,
           "TETRI_MONITOR_INTERVAL_MS": "100", "TETRI_LEADER_LEASE_S": str(lease_s),
           "TETRI_LEADER_RENEW_S": str(renew_s), "TETRI_REPLICA_TIMEOUT_S": str(replica_timeout_s),
           "TETRI_INSTANCE_SYNC_S": str(sync_s), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    env.pop("TETRI_CONFIG", None)
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"replica {replica_id} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _instances(url: str) -> set[str]:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        listed = httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=5).json()["instances"]
        return {i["id"] for i in listed if i["state"] == "healthy"}
    return set()


def _wait(cond, timeout_s: float, step_s: float = 0.05) -> float:  # noqa: ANN001
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not within {timeout_s}s")
        time.sleep(step_s)
    return time.monotonic() - started


def _handoff_507(url: str) -> int:
    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("tetri_handoff_failures_total{") and 'status="507"' in line))  # fmt: skip
    return 0


def _watch_kv(urls: dict[str, str], stop: threading.Event, out: dict[str, KVWatch]) -> None:
    with httpx.Client(timeout=2) as client:
        while not stop.is_set():
            for name, url in urls.items():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    load = client.get(f"{url}/load").json()
                    w = out[name]
                    total, free = int(load["total_kv_tokens"]), int(load["free_kv_tokens"])
                    leased = int(load.get("leased_kv_tokens") or 0)
                    w.total, w.reports = total, w.reports + 1
                    w.max_used, w.max_leased = max(w.max_used, total - free), max(w.max_leased, leased)
                    w.over += int(free < 0 or total - free > total or leased > total)
            stop.wait(0.02)


def measure(
    db_url: str,
    *,
    requests: int = 200,
    concurrency: int = 16,
    max_tokens: int = 16,
    decode_kv_tokens: int = 768,
    kill_at: float = 0.4,
    lease_s: float = 3.0,
    renew_s: float = 1.0,
    replica_timeout_s: float = 3.0,
    sync_s: float = 1.0,
    log_dir: Path,
    seed: int = 0,
) -> FailoverResult:
    """Start workers and two replicas on `db_url` (migrated by the first), run, kill the leader."""
    log_dir.mkdir(parents=True, exist_ok=True)
    result = FailoverResult(database=db_url.split(":", 1)[0], requests=requests, lease_s=lease_s, renew_s=renew_s)
    fleet = Fleet()
    procs: dict[str, subprocess.Popen] = {}
    reader = Store(db_url)
    started = time.monotonic()
    try:
        prefill = fleet.start_worker("prefill", MODEL, chunk_size="32", kv_tokens=4096, log_dir=log_dir)
        decodes = [fleet.start_worker("decode", MODEL, chunk_size="32", kv_tokens=decode_kv_tokens, log_dir=log_dir)
                   for _ in range(2)]  # fmt: skip
        fleet.wait_healthy(timeout_s=300)
        spec = {"backend": "native", "model": MODEL}
        knobs = {"lease_s": lease_s, "renew_s": renew_s, "replica_timeout_s": replica_timeout_s, "sync_s": sync_s}
        # a: the prefill and the first decode from its configuration; b: nothing, it learns them from the store.
        configured = [{**spec, "url": prefill.url, "role": "prefill", "id": "prefill-0"},
                      {**spec, "url": decodes[0].url, "role": "decode", "id": "decode-0"}]  # fmt: skip
        procs["a"], url_a = start_replica("a", db_url, configured, log_dir / "replica-a.log", **knobs)
        procs["b"], url_b = start_replica("b", db_url, [], log_dir / "replica-b.log", **knobs)
        urls = {"a": url_a, "b": url_b}
        _wait(lambda: _instances(url_b) == {"prefill-0", "decode-0"}, 30)
        # The second decode registered through a's admin API: b drives it within a sync period.
        body = {**spec, "url": decodes[1].url, "role": "decode", "id": "decode-1"}
        t0 = time.monotonic()
        httpx.post(f"{url_a}/admin/instances", json=body, headers=AUTH, timeout=60).raise_for_status()
        result.sync_visible_s = round(time.monotonic() - t0 + _wait(lambda: "decode-1" in _instances(url_b), 30), 3)
        result.leader_before = (reader.get_lease("leader") or {}).get("holder") or ""
        victim = result.leader_before
        survivor = "b" if victim == "a" else "a"

        kv = {f"decode-{i}": KVWatch() for i in range(2)}
        stop = threading.Event()
        decode_urls = {k: d.url for k, d in zip(kv, decodes, strict=True)}
        watcher = threading.Thread(target=_watch_kv, args=(decode_urls, stop, kv))
        watcher.start()
        rng = random.Random(seed)
        prompts = [" ".join(str(rng.randrange(1000)) for _ in range(rng.randrange(10, 120))) for _ in range(requests)]
        done = threading.Semaphore(0)
        dead: set[str] = set()
        counts = {"completed": 0, "lost": 0, "retried": 0, "cut": 0, "a": 0, "b": 0}
        refused: dict[str, int] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            name = "a" if i % 2 == 0 else "b"
            payload = {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens}
            for attempt in range(6):
                name = survivor if name in dead else name
                try:
                    resp = httpx.post(f"{urls[name]}/v1/chat/completions", json=payload, timeout=120)
                    if resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] > 0:
                        with lock:
                            counts["completed"] += 1
                            counts[name] += 1
                            counts["retried"] += int(attempt > 0)
                        break
                    with lock:
                        refused[str(resp.status_code)] = refused.get(str(resp.status_code), 0) + 1
                    time.sleep(float(resp.headers.get("retry-after", "0.2")))
                except httpx.HTTPError:  # the replica went away under the request: the other one serves it
                    with lock:
                        counts["cut"] += 1
                    name = "b" if name == "a" else "a"
                    time.sleep(0.05)
            else:
                with lock:
                    counts["lost"] += 1
            done.release()

        kill_after = max(1, int(requests * kill_at))
        with ThreadPoolExecutor(concurrency) as pool:
            for i in range(requests):
                pool.submit(one, i)
            for _ in range(kill_after):
                done.acquire()
            result.handoff_507 += _handoff_507(urls[victim])
            procs[victim].send_signal(signal.SIGKILL)  # the leader dies: no release, no clean stop
            killed = time.monotonic()
            dead.add(victim)
            procs[victim].wait(10)
            _wait(lambda: (reader.get_lease("leader") or {}).get("holder") == survivor, 30, 0.02)
            result.failover_s = round(time.monotonic() - killed, 3)

            def recovered() -> bool:
                return any(e["detail"].get("replica") == victim for e in reader.list_events("recover", limit=20))

            _wait(recovered, 60, 0.05)
            result.loops_s = round(time.monotonic() - killed, 3)
        stop.set()
        watcher.join()
        result.leader_after = (reader.get_lease("leader") or {}).get("holder") or ""
        result.completed, result.lost, result.retried = counts["completed"], counts["lost"], counts["retried"]
        result.per_replica = {"a": counts["a"], "b": counts["b"]}
        result.cut_by_kill, result.refused = counts["cut"], refused
        result.handoff_507 += _handoff_507(urls[survivor])
        result.kv = kv
        for ev in reader.list_events("recover", limit=20):
            if ev["detail"].get("replica") == victim:
                result.dead_requests_failed = int(ev["detail"].get("requests_failed", 0))
        httpx.get(f"{urls[survivor]}/admin/stats", headers=AUTH, timeout=10)  # its writer flushes on a read
        time.sleep(0.5)
        stats = reader.request_stats()
        result.inflight_rows_left = sum(stats.get(s, 0) for s in INFLIGHT_STATES)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        fleet.stop()
        reader.close()
    result.wall_s = round(time.monotonic() - started, 1)
    return result


def markdown(r: FailoverResult) -> str:
    kv = "; ".join(f"{k}: max used {w.max_used}/{w.total}, max leased {w.max_leased}, {w.over} over, "
                   f"{w.reports} reports" for k, w in r.kv.items())  # fmt: skip
    return "\n".join([
        "| database | requests | completed | lost | retried | failover (s) | loops (s) | sync (s) | 507s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r.database} | {r.requests} | {r.completed} | {r.lost} | {r.retried} | {r.failover_s} | {r.loops_s} "
        f"| {r.sync_visible_s} | {r.handoff_507} |",
        "",
        f"leader {r.leader_before} killed, {r.leader_after} leads; answered per replica {r.per_replica}; "
        f"attempts cut by the kill {r.cut_by_kill}, answered with an error {r.refused} (then retried); "
        f"the dead replica's in-flight rows failed by the new leader: {r.dead_requests_failed}; "
        f"rows left in flight: {r.inflight_rows_left}; lease {r.lease_s:g} s renewed every {r.renew_s:g} s",
        f"KV: {kv}",
    ])  # fmt: skip
