"""Live runner: drive any OpenAI-compatible endpoint with a workload over streaming HTTP.

Each request is sent at its scheduled arrival time (open loop: a slow server does not slow the
arrivals down), as ``POST {base}/v1/completions`` (or ``/chat/completions``) with ``stream: true``,
``max_tokens`` = the request's output length and ``ignore_eos: true`` (the vLLM/SGLang extension our
API accepts too), so every run does the same work. Every streamed chunk that carries text is one
token event; the final ``usage`` chunk (``stream_options.include_usage``) gives the exact token count
when the server sends it. Recorded per request: send time, every token time (hence TTFT, every
inter-token gap, TPOT), end of stream (JCT), token count, HTTP status, errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from bench.metrics import RequestRecord, summarize
from bench.workloads import BenchRequest, Workload


def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def resolve_model(client: httpx.AsyncClient, base: str) -> str:
    resp = await client.get(f"{base}/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base}/models lists no model")
    return str(data[0]["id"])


def _chat_body(req: BenchRequest, model: str) -> dict[str, Any]:
    body = req.openai_body(model)
    prompt = body.pop("prompt")
    body["messages"] = [{"role": "user", "content": prompt}]
    return body


def parse_sse_line(line: str) -> dict[str, Any] | None | str:
    """One SSE line: a JSON chunk (dict), "DONE", or None for anything else."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "DONE"
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


async def stream_chunks(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord, clock: Callable[[], float]
) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """POST a streamed completion and yield (arrival time, JSON chunk) until `[DONE]`; `rec` gets the
    send and end times, the status, and the error (HTTP status, an error chunk, a broken connection,
    or no tokens at all)."""
    rec.sent = clock()
    try:
        async with client.stream("POST", url, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                rec.end = clock()
                return
            async for line in resp.aiter_lines():
                obj = parse_sse_line(line)
                if obj is None:
                    continue
                if obj == "DONE":
                    break
                assert isinstance(obj, dict)
                if obj.get("error"):
                    rec.error = str(obj["error"])[:300]
                    break
                yield clock(), obj
        rec.end = clock()
    except (TimeoutError, httpx.HTTPError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
        rec.end = clock()
    if rec.error is None and not rec.token_times:
        rec.error = "no tokens streamed"


def chunk_text(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """(text of the chunk or None, finish_reason or None)."""
    choices = obj.get("choices") or []
    if not choices:
        return None, None
    c = choices[0]
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content")
    return text, c.get("finish_reason")


async def send_one(
    client: httpx.AsyncClient,
    base: str,
    req: BenchRequest,
    model: str,
    rec: RequestRecord,
    endpoint: str = "completions",
    clock: Callable[[], float] = time.monotonic,
) -> RequestRecord:
    body = _chat_body(req, model) if endpoint == "chat" else req.openai_body(model)
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    usage_tokens: int | None = None
    async for now, obj in stream_chunks(client, base + path, body, rec, clock):
        text, finish = chunk_text(obj)
        if text:
            rec.add_tokens(now, 1)
        if finish:
            rec.finish_reason = finish
        usage = obj.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
        if usage and usage.get("prompt_tokens"):
            rec.prompt_tokens = int(usage["prompt_tokens"])  # as the server tokenized it
    if usage_tokens is not None:
        rec.output_tokens = usage_tokens
    return rec


async def run_async(
    url: str,
    workload: Workload,
    model: str | None = None,
    concurrency: int = 0,
    timeout_s: float = 600.0,
    api_key: str | None = None,
    endpoint: str = "completions",
    on_done: Callable[[RequestRecord], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[RequestRecord], float, str]:
    base = api_base(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency or 1000, max_keepalive_connections=100)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as client:
        model = model or await resolve_model(client, base)
        sem = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        records = [
            RequestRecord(
                id=r.id, cls=r.cls, prompt_tokens=r.prompt_tokens, expected_output_tokens=r.output_tokens,
                arrival=r.arrival,
            )  # fmt: skip
            for r in workload.requests
        ]

        async def one(r: BenchRequest, rec: RequestRecord) -> None:
            if sem is not None:
                async with sem:
                    await send_one(client, base, r, model, rec, endpoint, clock)  # type: ignore[arg-type]
            else:
                await send_one(client, base, r, model, rec, endpoint, clock)  # type: ignore[arg-type]
            if on_done:
                on_done(rec)

        t0 = clock()
        tasks = []
        for r, rec in zip(workload.requests, records, strict=True):
            delay = t0 + r.arrival - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(r, rec)))
        await asyncio.gather(*tasks)
    return records, t0, model  # type: ignore[return-value]


def records_to_dicts(records: list[RequestRecord], t0: float) -> list[dict[str, Any]]:
    return [r.to_dict(t0) for r in records]


def run_workload(
    url: str,
    workload: Workload,
    model: str | None = None,
    concurrency: int = 0,
    timeout_s: float = 600.0,
    api_key: str | None = None,
    endpoint: str = "completions",
    show_progress: bool = True,
    instances: int = 1,
) -> dict[str, Any]:
    """Run the workload against `url`; returns {"summary", "requests", ...} (times in s / ms)."""
    progress = None
    task_id = None
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[errs]} errors"), transient=False,
        )  # fmt: skip
        progress.start()
        task_id = progress.add_task(f"{workload.name} @ {url}", total=len(workload.requests), errs=0)
    errs = 0

    def done(rec: RequestRecord) -> None:
        nonlocal errs
        if rec.error:
            errs += 1
        if progress is not None:
            progress.update(task_id, advance=1, errs=errs)  # type: ignore[arg-type]

    try:
        records, t0, used_model = asyncio.run(
            run_async(url, workload, model, concurrency, timeout_s, api_key, endpoint, on_done=done)
        )
    finally:
        if progress is not None:
            progress.stop()
    dicts = records_to_dicts(records, t0)
    rate = workload.meta.get("rate")
    return {
        "url": url,
        "model": used_model,
        "rate": rate if rate is None or rate != float("inf") else "inf",
        "workload": workload.stats(),
        "summary": summarize(dicts, instances),
        "requests": dicts,
    }
