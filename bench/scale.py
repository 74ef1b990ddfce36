"""`tetri bench scale`: a pool scaled up and down under a steady load, through the admin API.

Issue 19's targets: the new instances of a pool scaled 1 -> 3 take traffic within their ready time
plus two monitor ticks; scaling back down drains with zero failed requests.

Against a running orchestrator (`--url`, with a pool provider that can scale, e.g. `tetri up`), or
one this command starts (`tetri up` with the tiny random Llama, as a child process). Clients send
short completions in closed loops; then `PUT /admin/pools/{role}` to the peak and back. Read from the
orchestrator's records (GET /admin/events and /admin/requests):
- ready_s: from the scale request to the instance being ready: the worker's own `ready_since` (in
  its /health), else the start of its `register` event (the provider polls /health every 0.02 s and
  registers it at once);
- first_traffic_s: from the scale request to the first request routed there (its prefill sent: a
  request's prefill and decode instances are chosen then); first_decode_s: to its first decode;
  the target is first_traffic_s <= ready_s + 2 monitor ticks;
- failed requests among those in flight or sent while the pool shrank (target 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TINY = "random:tiny-llama"


@dataclass
class Sent:
    started: float  # epoch seconds
    ended: float = 0.0
    status: int = 0  # HTTP status; 0: no answer
    id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """`clients` closed-loop clients, each sending one short completion after another."""

    url: str
    model: str
    clients: int = 4
    max_tokens: int = 8
    prompt_words: int = 8  # longer prompts: more requests between their routing and their KV's arrival
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for k in range(self.clients):
            thread = threading.Thread(target=self._client, args=(k,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def burst(self, count: int, prompt_words: int) -> None:
        """`count` one-off requests with long prompts, sent at once (in threads, recorded as the rest)."""
        for k in range(count):
            thread = threading.Thread(target=self._send_one, args=(f"Burst {k}", prompt_words), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _send_one(self, tag: str, prompt_words: int, http: httpx.Client | None = None, i: int = 0) -> None:
        one = Sent(time.time())
        prompt = f"{tag} counts: " + ", ".join(str(i + j) for j in range(prompt_words)) + ","
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        try:
            resp = (http or httpx).post(f"{self.url}/v1/completions", json=body, timeout=120)
            one.status = resp.status_code
            data = resp.json()
            one.id = data.get("id")
            if resp.status_code != 200:
                one.error = str(data.get("error", data))[:300]
        except (httpx.HTTPError, ValueError) as exc:  # no answer, or not JSON
            one.error = f"{type(exc).__name__}: {exc}"[:300]
        one.ended = time.time()
        self.sent.append(one)

    def _client(self, k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = 0
            while not self._stop.is_set():
                i += 1
                self._send_one(f"Client {k}", self.prompt_words, http, i)


class Admin:
    def __init__(self, url: str, token: str | None) -> None:
        self.http = httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"} if token else {}
        )

    def get(self, path: str, **params: Any) -> Any:
        resp = self.http.get(path, params=params)
        resp.raise_for_status()
        return resp.json()

    def scale(self, role: str, replicas: int) -> dict[str, Any]:
        resp = self.http.put(f"/admin/pools/{role}", json={"replicas": replicas})
        resp.raise_for_status()
        return dict(resp.json())

    def pool(self, role: str) -> dict[str, Any]:
        return next(p for p in self.get("/admin/pools")["pools"] if p["role"] == role)

    def wait_pool(self, role: str, replicas: int, timeout_s: float) -> float:
        """Until the pool has `replicas` ready and registered, and no more instances of the role
        (draining ones included: a leaving instance counts until it is deregistered): when."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pool = self.pool(role)
            if (pool["ready"] == replicas and pool["registered"] == replicas and pool["desired"] == replicas
                    and len(self.instances(role)) == replicas):  # fmt: skip
                return time.time()
            time.sleep(0.05)
        raise TimeoutError(f"the {role} pool did not reach {replicas} in {timeout_s:.0f} s: {self.pool(role)}")

    def instances(self, role: str) -> dict[str, dict[str, Any]]:
        return {i["id"]: i for i in self.get("/admin/instances")["instances"] if i["role"] == role}


def measure(
    url: str, token: str | None, model: str, role: str = "decode", low: int = 1, peak: int = 3, clients: int = 4,
    max_tokens: int = 8, prompt_words: int = 8, monitor_interval_s: float = 0.1, settle_s: float = 3.0,
    timeout_s: float = 300.0, burst_at_down: int = 0, burst_words: int = 600,
) -> dict[str, Any]:  # fmt: skip
    """Scale `role` low -> peak -> low under load; the figures (see the module's docstring).
    `burst_at_down` long-prompt requests are sent just before the scale-down: some are routed to a
    leaving instance and still prefilling when it starts to drain (what a drain must wait for)."""
    admin = Admin(url, token)
    admin.scale(role, low)
    admin.wait_pool(role, low, timeout_s)
    before = set(admin.instances(role))
    load = Load(url, model, clients, max_tokens, prompt_words)
    load.start()
    try:
        time.sleep(settle_s)
        t_up = time.time()
        admin.scale(role, peak)
        up_done = admin.wait_pool(role, peak, timeout_s)
        at_up = admin.instances(role)
        added = sorted(set(at_up) - before)
        # Each worker's own word for when it was ready (its /health's ready_since), where it gives it.
        ready_since = {iid: _ready_since(at_up[iid].get("url")) for iid in added}
        # Until each new instance has taken work (bounded), then the way down.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _all_took_traffic(admin, load, added, role):
            time.sleep(0.25)
        time.sleep(settle_s)
        at_peak = set(admin.instances(role))
        if burst_at_down:
            load.burst(burst_at_down, burst_words)
            time.sleep(0.3)  # sent (client threads start slowly under load), routed, prefilling
        t_down = time.time()
        admin.scale(role, low)
        down_done = admin.wait_pool(role, low, timeout_s)
        removed = sorted(at_peak - set(admin.instances(role)))
        time.sleep(settle_s)
    finally:
        load.stop()
    records = _records(admin, load.sent)
    registered = {e["instance_id"]: e for e in admin.get("/admin/events", kind="register", limit=1000)["events"]}
    deregistered = {e["instance_id"]: e for e in admin.get("/admin/events", kind="deregister", limit=1000)["events"]}
    field_ = "decode_instance" if role != "prefill" else "prefill_instance"
    new = []
    for iid in added:
        ev = registered.get(iid)
        registering_at = ev["at"] - (ev["duration_s"] or 0.0) if ev else None
        ready_at = ready_since.get(iid) or registering_at
        ran = [r for r in records.values() if r.get(field_) == iid and r.get("prefill_started_at")]
        # Routed: both instances of a request are chosen when its prefill is sent.
        first = min((r["prefill_started_at"] for r in ran), default=None)
        first_decode = min((r["decode_started_at"] for r in ran if r.get("decode_started_at")), default=None)
        ready_s = ready_at - t_up if ready_at is not None else None
        traffic_s = first - t_up if first is not None else None
        new.append({
            "id": iid, "ready_s": ready_s, "ready_from": "worker" if ready_since.get(iid) else "register event",
            "registering_s": registering_at - t_up if registering_at is not None else None,
            "registered_s": ev["at"] - t_up if ev else None,
            "first_traffic_s": traffic_s, "first_decode_s": first_decode - t_up if first_decode else None,
            "requests": len(ran),
            "after_ready_s": traffic_s - ready_s if traffic_s is not None and ready_s is not None else None,
            "within_target": traffic_s is not None and ready_s is not None
            and traffic_s <= ready_s + 2 * monitor_interval_s,
        })  # fmt: skip
    during_down = [s for s in load.sent if s.ended >= t_down and s.started <= down_done]
    # What the leaving instances had to drain: requests routed there before the scale-down began
    # that were still running then.
    drained = [r for r in records.values() if r.get(field_) in removed and (r.get("prefill_started_at") or 0) <= t_down
               and (r.get("finished_at") or 0) >= t_down]  # fmt: skip
    # Of those, the ones whose prefill (elsewhere) had not ended: their KV reached a leaving instance.
    kv_pending = [r for r in drained if (r.get("first_token_at") or 0) >= t_down]
    failed = [s for s in load.sent if s.status != 200 or s.error]
    return {
        "role": role, "low": low, "peak": peak, "clients": clients, "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "monitor_interval_s": monitor_interval_s,
        "scale_up": {"pool_ready_s": up_done - t_up, "instances": new,
                     "target_met": bool(new) and all(n["within_target"] for n in new)},
        "scale_down": {"pool_settled_s": down_done - t_down, "removed": [
            {"id": iid, "drain_s": deregistered[iid]["duration_s"] if iid in deregistered else None}
            for iid in removed], "requests": len(during_down), "drained_requests": len(drained),
            "drained_failed": sum(1 for r in drained if r.get("state") != "finished"),
            "kv_pending": len(kv_pending), "requested_at": t_down,
            "failed": sum(1 for s in during_down if s.status != 200 or s.error)},
        "requests": {"sent": len(load.sent), "ok": len(load.sent) - len(failed), "failed": len(failed),
                     "errors": sorted({s.error or str(s.status) for s in failed})[:5],
                     "not_finished": sum(1 for r in records.values() if r.get("state") != "finished")},
        "per_instance": _per_instance(records.values(), field_),
    }  # fmt: skip


def _ready_since(url: str | None) -> float | None:
    """A built-in worker's /health `ready_since` (epoch seconds), or None."""
    if not url:
        return None
    try:
        value = httpx.get(f"{url}/health", timeout=5).json().get("ready_since")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _all_took_traffic(admin: Admin, load: Load, ids: list[str], role: str) -> bool:
    field_ = "decode_instance" if role != "prefill" else "prefill_instance"
    recent = [s.id for s in list(load.sent)[-4 * max(1, len(ids)) * load.clients :] if s.id]
    seen = {r.get(field_) for r in _records(admin, [Sent(0.0, id=i) for i in recent]).values()}
    return all(i in seen for i in ids)


def _records(admin: Admin, sent: list[Sent]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in sent:
        if s.id:
            resp = admin.http.get(f"/admin/requests/{s.id}")
            if resp.status_code == 200:
                out[s.id] = resp.json()
    return out


def _per_instance(records: Any, field_: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        key = r.get(field_) or "-"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


@contextmanager
def tetri_up(model: str, kv_tokens: int, chunk_size: str, log_dir: Path, timeout_s: float = 600) -> Iterator[str]:
    """`tetri up` (1 prefill, 1 decode worker) as a child process on free ports; its URL."""
    from orchestrator.launcher import free_port

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TETRI_DATABASE_URL": f"sqlite:///{log_dir / 'tetri.db'}", "TETRI_ADMIN_TOKEN": "bench",
           "TETRI_LOG_DIR": str(log_dir), "TETRI_PREDICTOR": "constant"}  # fmt: skip
    cmd = [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), "--model", model, "--kv-tokens",
           str(kv_tokens), "--chunk-size", chunk_size]  # fmt: skip
    out = (log_dir / "tetri-up.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while "tetri ready at" not in (log_dir / "tetri-up.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tetri up did not start:\n" + (log_dir / "tetri-up.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        out.close()


def markdown(result: dict[str, Any]) -> str:
    up, down = result["scale_up"], result["scale_down"]
    lines = [f"{result['role']} pool {result['low']} -> {result['peak']} -> {result['low']}, "
             f"{result['clients']} closed-loop clients, max_tokens {result['max_tokens']}", "",
             "| instance | ready (s) | registering (s) | registered (s) | first traffic (s) | after ready (s) "
             "| within ready + 2 ticks |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in up["instances"]:
        lines.append(f"| {n['id']} | {_f(n['ready_s'])} | {_f(n.get('registering_s'))} | {_f(n['registered_s'])} | "
                     f"{_f(n['first_traffic_s'])} | {_f(n['after_ready_s'])} | "
                     f"{'yes' if n['within_target'] else 'no'} |")  # fmt: skip
    drains = ", ".join(f"{r['id']} {_f(r['drain_s'])} s" for r in down["removed"])
    lines += ["", f"Scale-down: {down['requests']} requests in flight or sent while the pool shrank, "
              f"{down['failed']} failed; {down['drained_requests']} were running on the leaving instances "
              f"({down['drained_failed']} did not finish); drains: {drains}; "
              f"settled in {down['pool_settled_s']:.2f} s."
              + (f" {down['migrated_refused_kv']} requests whose KV a leaving instance refused were continued "
                 "elsewhere (re-prefilled)." if down.get("migrated_refused_kv") else ""),
              f"All: {result['requests']['sent']} requests, {result['requests']['failed']} failed; "
              f"per instance: {result['per_instance']}"]  # fmt: skip
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
