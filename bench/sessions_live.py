"""Closed-loop replay of a session workload (bench/sessions.py) against an OpenAI-compatible server.

Each session is one asyncio task: its first turn is sent at the session's start, each later turn
``think_s`` after the previous answer has fully arrived, as ``POST /v1/chat/completions`` with
``stream: true``, ``max_tokens`` = the turn's output length and ``ignore_eos``. The history holds
the model's own answers (the text streamed back). A failed turn ends its session: the turns after it
are recorded as errors ("session cut"), so every run reports the same request count.

Recorded per turn, on top of bench/metrics.RequestRecord (TTFT from send to first token, JCT to end
of stream): ``cached_tokens`` (``usage.prompt_tokens_details.cached_tokens``), the server's
``prompt_tokens``, the client's count of the templated prompt, and ``oracle_tokens`` (the
OracleCache of bench/sessions.py, fed in send order). The workers' prefix counters come from
``GET /admin/instances`` before and after the run when an admin token is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.metrics import RequestRecord, summarize
from bench.runner import api_base, chunk_text, resolve_model, stream_chunks
from bench.sessions import ChatTokenizer, OracleCache, SessionRequest, SessionWorkload, prefix_summary


@dataclass
class TurnRecord(RequestRecord):
    session: str = ""
    turn: int = 0
    cached_tokens: int | None = None
    client_prompt_tokens: int | None = None
    oracle_tokens: int = 0


async def send_turn(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    req: SessionRequest,
    messages: list[dict[str, str]],
    rec: TurnRecord,
    clock: Callable[[], float],
) -> str:
    """Stream one chat turn into `rec`; returns the answer's text."""
    body: dict[str, Any] = {
        "model": model, "messages": messages, "max_tokens": req.output_tokens, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    parts: list[str] = []
    async for now, obj in stream_chunks(client, base + "/chat/completions", body, rec, clock):
        text, finish = chunk_text(obj)
        if text:
            rec.add_tokens(now, 1)
            parts.append(text)
        if finish:
            rec.finish_reason = finish
        usage = obj.get("usage")
        if usage:
            rec.output_tokens = int(usage.get("completion_tokens") or rec.output_tokens)
            rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                rec.cached_tokens = int(details["cached_tokens"])
    return "".join(parts)


async def run_sessions_async(
    url: str,
    wl: SessionWorkload,
    tok: ChatTokenizer,
    model: str | None = None,
    timeout_s: float = 600.0,
    api_key: str | None = None,
    on_done: Callable[[TurnRecord], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    transport: httpx.AsyncBaseTransport | None = None,  # tests: an in-process server
) -> tuple[list[TurnRecord], float, str]:
    base = api_base(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    oracle = OracleCache()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), headers=headers,
                                 limits=limits, transport=transport) as client:  # fmt: skip
        used = model or await resolve_model(client, base)
        records: list[TurnRecord] = []

        async def session(turns: list[SessionRequest], t0: float) -> None:
            history: list[dict[str, str]] = []
            failed = False
            for r in turns:
                rec = TurnRecord(id=r.id, cls=r.cls, prompt_tokens=r.prompt_tokens,
                                 expected_output_tokens=r.output_tokens, session=r.session, turn=r.turn)  # fmt: skip
                records.append(rec)
                if failed:
                    rec.error = "session cut: an earlier turn failed"
                    continue
                wait = (t0 + r.arrival - clock()) if r.after is None else r.think_s
                if wait > 0:
                    await asyncio.sleep(wait)
                rec.arrival = clock() - t0
                msgs = r.messages(history)
                ids = tok.chat(msgs)
                rec.client_prompt_tokens = len(ids)
                rec.oracle_tokens = oracle.reuse(ids)
                answer = await send_turn(client, base, used, r, msgs, rec, clock)
                if on_done:
                    on_done(rec)
                if rec.error is not None:
                    failed = True
                    continue
                oracle.answered(ids, tok.encode(answer))
                asked = msgs[1:] if r.system is not None else msgs  # messages() adds the system prompt
                history = [*asked, {"role": "assistant", "content": answer}]

        t0 = clock()
        await asyncio.gather(*(session(turns, t0) for turns in wl.sessions()))
    return records, t0, used


def engine_counters(url: str, admin_token: str | None) -> dict[str, int] | None:
    """Summed prefix counters of the orchestrator's instances (None: no admin access)."""
    if not admin_token:
        return None
    try:
        resp = httpx.get(url.rstrip("/") + "/admin/instances", timeout=10.0,
                         headers={"Authorization": f"Bearer {admin_token}"})  # fmt: skip
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    out = {"hit_tokens": 0, "query_tokens": 0}
    for inst in resp.json().get("instances", []):
        load = inst.get("last_load") or {}
        out["hit_tokens"] += int(load.get("prefix_hit_tokens") or 0)
        out["query_tokens"] += int(load.get("prefix_query_tokens") or 0)
    return out


def run_sessions(
    url: str,
    wl: SessionWorkload,
    tok: ChatTokenizer | None = None,
    instances: int = 1,
    model: str | None = None,
    admin_token: str | None = None,
    timeout_s: float = 600.0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Replay `wl` against `url`; {"summary" (with the prefix hit rates), "requests", ...}."""
    from bench.sessions import default_tokenizer

    tok = tok or default_tokenizer()
    done = 0

    def tick(rec: TurnRecord) -> None:
        nonlocal done
        done += 1
        if show_progress and done % 10 == 0:
            print(f"  {done}/{len(wl.requests)} turns", flush=True)

    before = engine_counters(url, admin_token)
    records, t0, used = asyncio.run(run_sessions_async(url, wl, tok, model, timeout_s, on_done=tick))
    after = engine_counters(url, admin_token)
    engine = None
    if before is not None and after is not None:
        engine = {k: after[k] - before[k] for k in after}
    records.sort(key=lambda r: (r.session, r.turn))
    dicts = [r.to_dict(t0) for r in records]
    summary = summarize(dicts, instances)
    summary.update(prefix_summary(dicts, engine))
    rate = wl.meta.get("rate")
    return {
        "url": url,
        "model": used,
        "rate": rate if rate is None or rate != float("inf") else "inf",
        "workload": wl.stats(),
        "summary": summary,
        "requests": dicts,
    }
