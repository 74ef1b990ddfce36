"""`tetri status`: the instances and pools of a running orchestrator, read from its admin API."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table


class StatusError(Exception):
    """A message for the operator (unreachable orchestrator, wrong token), not a traceback."""


def fetch_status(url: str, token: str | None, timeout_s: float = 5.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GET /admin/instances and /admin/stats; a StatusError that says what to do when either fails."""
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: list[dict[str, Any]] = []
    try:
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            for path in ("/admin/instances", "/admin/stats"):
                resp = client.get(base + path)
                if resp.status_code == 401:
                    raise StatusError(
                        f"{base} refused the admin request: "
                        + ("set TETRI_ADMIN_TOKEN to the orchestrator's admin token (its admin API is "
                           "closed unless it was started with TETRI_ADMIN_TOKEN set)" if not token
                           else "TETRI_ADMIN_TOKEN does not match the orchestrator's admin token"))
                if resp.status_code != 200:
                    raise StatusError(f"{base}{path} answered {resp.status_code}: {resp.text[:200]}")
                out.append(resp.json())
    except httpx.TransportError as exc:
        raise StatusError(f"no orchestrator reachable at {base} ({type(exc).__name__}: {exc}); "
                          "is `tetri up` / `tetri serve` running there? (--url to point elsewhere)") from exc
    except ValueError as exc:  # not JSON: something else listens on that port
        raise StatusError(f"{base} did not answer like a tetri orchestrator ({exc})") from exc
    return out[0].get("instances", []), out[1]


def _kv_use(load: dict[str, Any] | None) -> str:
    if not load or not load.get("total_kv_tokens"):
        return "-"
    total = load["total_kv_tokens"]
    used = total - load.get("free_kv_tokens", 0)
    return f"{used}/{total} ({100 * used / total:.0f}%)"


def render_status(instances: list[dict[str, Any]], stats: dict[str, Any], console: Console) -> None:
    table = Table(title="Instances")
    for col in ("id", "role", "backend", "state", "queued", "running", "KV used", "url"):
        table.add_column(col, justify="right" if col in ("queued", "running", "KV used") else "left")
    for inst in sorted(instances, key=lambda i: (str(i.get("role")), str(i.get("id")))):
        load = inst.get("last_load") or {}
        state = str(inst.get("state"))
        style = {"healthy": "green", "draining": "yellow"}.get(state, "red")
        table.add_row(str(inst.get("id")), str(inst.get("role")), str(inst.get("backend")), f"[{style}]{state}[/]",
                      str(load.get("queued", "-")), str(load.get("running", "-")), _kv_use(load),
                      str(inst.get("url")))
    console.print(table)

    pools = Table(title="Pools")
    for col in ("role", "instances", "healthy", "queued", "running", "KV used"):
        pools.add_column(col, justify="left" if col == "role" else "right")
    by_role: dict[str, Counter[str]] = {}
    for inst in instances:
        load = inst.get("last_load") or {}
        c = by_role.setdefault(str(inst.get("role")), Counter())
        c["instances"] += 1
        c["healthy"] += inst.get("state") == "healthy"
        c["queued"] += int(load.get("queued") or 0)
        c["running"] += int(load.get("running") or 0)
        c["kv_total"] += int(load.get("total_kv_tokens") or 0)
        c["kv_free"] += int(load.get("free_kv_tokens") or 0)
    for role, c in sorted(by_role.items()):
        pools.add_row(role, str(c["instances"]), str(c["healthy"]), str(c["queued"]), str(c["running"]),
                      _kv_use({"total_kv_tokens": c["kv_total"], "free_kv_tokens": c["kv_free"]}))
    console.print(pools)

    live = (stats.get("predictor") or {}).get("live") or {}
    console.print(f"in-flight requests (orchestrator): {stats.get('active_requests', '-')}   "
                  f"predictor: {(stats.get('predictor') or {}).get('name', '-')}"
                  + (f", live accuracy {live['accuracy']:.2f} over {live['n']} requests" if live.get("n") else ""))
