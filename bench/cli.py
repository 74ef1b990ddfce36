"""`tetri bench ...`: workloads, live runs, simulator comparisons, A/B runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from bench.spec import split_list as _split_list
from bench.spec import split_systems

app = typer.Typer(help="Workloads, live runs, simulator comparisons.", no_args_is_help=True)


@app.command()
def workload(
    name: Annotated[str, typer.Argument(help="LPLD|LPHD|HPLD|HPHD|Mixed|Mixed-natural|synthetic:P:O|trace:PATH|"
                                             "sessions[:...]|shared-prefix[:...]")],
    requests: Annotated[int, typer.Option("--requests", "-n", help="Number of requests.")] = 500,
    rate: Annotated[str, typer.Option(help="Poisson rate req/s, 'inf', or a sweep '1,2,4' / '1:8:1'.")] = "inf",
    seed: Annotated[int, typer.Option(help="RNG seed (same seed, same workload).")] = 0,
    max_context: Annotated[int, typer.Option(help="Drop ShareGPT pairs longer than this (prompt+output).")] = 4096,
    out: Annotated[Path | None, typer.Option(help="Write JSONL here (one file per rate in a sweep).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print statistics as JSON.")] = False,
) -> None:
    """Build a workload (ShareGPT class, synthetic, or trace) with Poisson arrivals; print its stats."""
    from bench.sessions import build_session_workload, is_session_workload
    from bench.workloads import build_workload, parse_rates

    rates = parse_rates(rate) or [math.inf]
    if is_session_workload(name):  # -n sessions; JSONL rows carry session, turn, after, think_s, blocks
        base = build_session_workload(name, requests, seed=seed, max_context=max_context)
    else:
        base = build_workload(name, requests, rate=None, seed=seed, max_context=max_context)
    stats = []
    for r in rates:
        wl = base.with_arrivals(r, seed + 1)
        st = wl.stats()
        if out is not None:
            path = out if len(rates) == 1 else out.with_name(f"{out.stem}-rate{r:g}{out.suffix or '.jsonl'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            wl.to_jsonl(path)
            st["file"] = str(path)
        stats.append(st)
    if json_out:
        typer.echo(json.dumps(stats if len(stats) > 1 else stats[0], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"workload {name}")
    for col in ("rate", "requests", "mean prompt", "mean output", "LPLD/LPHD/HPLD/HPHD", "duration s", "file"):
        t.add_column(col)
    for st in stats:
        cls = "/".join(str(st.get("classes", {}).get(c, 0)) for c in ("LPLD", "LPHD", "HPLD", "HPHD"))
        t.add_row(
            str(st.get("rate")), str(st["requests"]), f"{st['mean_prompt_tokens']:.1f}",
            f"{st['mean_output_tokens']:.1f}", cls, f"{st['duration_s']:.1f}", st.get("file", "-"),
        )  # fmt: skip
    Console().print(t)


@app.command()
def run(
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible server (…/v1 or root).")],
    workload_name: Annotated[
        str, typer.Option("--workload", "-w", help="Workload name (see `bench workload`).")
    ] = "Mixed",
    requests: Annotated[int, typer.Option("--requests", "-n")] = 50,
    rate: Annotated[str, typer.Option(help="Poisson rate req/s or 'inf'.")] = "2",
    seed: Annotated[int, typer.Option()] = 0,
    model: Annotated[str | None, typer.Option(help="Model name to request (default: the server's first).")] = None,
    length_scale: Annotated[float, typer.Option(help="Multiply prompt/output lengths (small live runs).")] = 1.0,
    max_prompt: Annotated[int | None, typer.Option(help="Cap prompt tokens.")] = None,
    max_output: Annotated[int | None, typer.Option(help="Cap output tokens.")] = None,
    max_context: Annotated[int, typer.Option(help="Drop ShareGPT pairs longer than this.")] = 4096,
    concurrency: Annotated[int, typer.Option(help="Max requests in flight (0: unbounded).")] = 0,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, s.")] = 600.0,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer token.")] = None,
    endpoint: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
    out: Annotated[Path | None, typer.Option(help="Write results.json (+ records) into this folder.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Drive an OpenAI-compatible endpoint with a workload (streaming); record TTFT, gaps, TPOT, JCT."""
    from bench.runner import run_workload
    from bench.workloads import build_workload, parse_rates

    rates = parse_rates(rate) or [math.inf]
    wl = build_workload(workload_name, requests, rate=None, seed=seed, max_context=max_context)
    if length_scale != 1.0 or max_prompt or max_output:
        wl = wl.scaled(length_scale, max_prompt, max_output)
    all_results = []
    for r in rates:
        res = run_workload(
            url, wl.with_arrivals(r, seed + 1), model=model, concurrency=concurrency, timeout_s=timeout,
            api_key=api_key, endpoint=endpoint, show_progress=progress and not json_out,
        )  # fmt: skip
        all_results.append(res)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            name = "results.json" if len(rates) == 1 else f"results-rate{r:g}.json"
            (out / name).write_text(json.dumps(res, indent=1, default=str))
    summaries = [{"rate": x["rate"], **x["summary"]} for x in all_results]
    if json_out:
        typer.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, default=str))
    else:
        _print_summaries({f"rate {s['rate']}": s for s in summaries})


def _print_summaries(rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    cols = ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_jct_ms", "p99_jct_ms", "throughput_rps",
            "completed", "errors")  # fmt: skip
    t.add_column("")
    for c in cols:
        t.add_column(c)
    for name, s in rows.items():
        t.add_row(name, *[(f"{s[c]:.1f}" if isinstance(s.get(c), float) else str(s.get(c))) for c in cols])
    Console(stderr=True).print(t)


@app.command()
def compare(
    workload_name: Annotated[str, typer.Option("--workload", "-w", help="Workload(s), comma separated; "
                             "sessions[:turns=6:think=1:max_output=128:ctx=4096] and shared-prefix[:groups=8:"
                             "per_group=8:system=1024:question=64:output=32] replay closed-loop "
                             "(-n: sessions).")] = "Mixed",
    backend: Annotated[str, typer.Option(help="sim (discrete-event cluster) or native (live, small scale).")] = "sim",
    profile: Annotated[
        str, typer.Option(help="Timing profile (sim), e.g. h100-llama-2-7b, cpu-smollm2.")
    ] = "h100-llama-2-7b",
    instances: Annotated[int, typer.Option(help="Instances per system (equal for all).")] = 4,
    requests: Annotated[int, typer.Option("--requests", "-n")] = 500,
    rate: Annotated[str, typer.Option(help="req/s, 'inf', or 'auto' (= --load x baseline capacity).")] = "auto",
    load: Annotated[
        float, typer.Option(help="Offered load for --rate auto, x the co-located baseline's capacity.")
    ] = 1.0,
    systems: Annotated[str, typer.Option(help="Systems, comma separated; 'name+key=value' overrides (live: "
                                              "+global_scheduler=least_loaded|prefix_aware|sglang_cache_aware, "
                                              "+prefix_caching=0 turns the workers' cache off).")] = (
        "colocated-vllm,colocated-sarathi,disagg-simple,tetri"
    ),
    seed: Annotated[int, typer.Option()] = 0,
    network: Annotated[str, typer.Option(help="KV link (sim): inter (between nodes) or intra (NVLink).")] = "inter",
    kv_tokens: Annotated[int | None, typer.Option(help="KV pool per instance, tokens (default: profile).")] = None,
    length_scale: Annotated[float, typer.Option(help="Multiply prompt/output lengths.")] = 1.0,
    max_prompt: Annotated[int | None, typer.Option(help="Cap prompt tokens.")] = None,
    max_output: Annotated[int | None, typer.Option(help="Cap output tokens.")] = None,
    model: Annotated[str, typer.Option(help="Model (native backend).")] = "smollm2-135m-instruct",
    live_backend: Annotated[
        str, typer.Option(help="Worker backend for --backend native runs: native or sim.")
    ] = "native",
    out: Annotated[Path, typer.Option(help="Folder for report.md, plots and results.json.")] = Path("bench-out"),
    json_out: Annotated[bool, typer.Option("--json", help="Print {'systems': {NAME: {...}}} as JSON.")] = False,
) -> None:
    """Run a workload against colocated-vllm, colocated-sarathi, disagg-simple and tetri (or any
    systems you name) at equal instance counts; write report.md, PNG plots and results.json."""
    from bench.compare import CompareSpec, compact, run_compare
    from orchestrator.sim import system_config

    if backend == "sim":
        for name in split_systems(systems):
            try:
                system_config(name)
            except ValueError as exc:  # an unknown system, option or option value, named by the message
                raise typer.BadParameter(str(exc), param_hint="--systems") from exc
    spec = CompareSpec(
        workloads=_split_list(workload_name), backend=backend, profile=profile, instances=instances,
        requests=requests, rate=rate, load=load, systems=split_systems(systems), seed=seed, network=network,
        kv_tokens=kv_tokens, length_scale=length_scale, max_prompt=max_prompt, max_output=max_output, model=model,
        live_backend=live_backend,
    )  # fmt: skip

    def progress(w: str, s: str, m: dict) -> None:
        if not json_out:
            typer.echo(
                f"{w:>14s} {s:<24s} TTFT {m.get('mean_ttft_ms') or 0:9.1f} ms  JCT {m.get('mean_jct_ms') or 0:9.1f} ms"
                f"  TPOT {m.get('mean_tpot_ms') or 0:6.2f} ms  {m.get('throughput_rps') or 0:7.2f} req/s",
                err=True,
            )

    results = run_compare(spec, out_dir=out, progress=progress)
    if json_out:
        typer.echo(json.dumps(compact(results), default=str))
    else:
        typer.echo(f"report: {out / 'report.md'}", err=True)


@app.command()
def ab(
    a: Annotated[str, typer.Option("--a", help="Deployment A: a URL (live) or a system name (sim).")],
    b: Annotated[str, typer.Option("--b", help="Deployment B: a URL (live) or a system name (sim).")],
    workload_name: Annotated[str, typer.Option("--workload", "-w")] = "Mixed",
    requests: Annotated[int, typer.Option("--requests", "-n")] = 100,
    rate: Annotated[str, typer.Option(help="req/s or 'inf' ('auto' in sim: --load x baseline capacity).")] = "auto",
    load: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    profile: Annotated[str, typer.Option(help="Timing profile for sim systems.")] = "h100-llama-2-7b",
    instances: Annotated[int, typer.Option(help="Instances (sim).")] = 4,
    model: Annotated[str | None, typer.Option(help="Model name (live).")] = None,
    model_b: Annotated[str | None, typer.Option(help="Model name for B if it differs (live).")] = None,
    length_scale: Annotated[float, typer.Option()] = 1.0,
    max_prompt: Annotated[int | None, typer.Option()] = None,
    max_output: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option()] = Path("bench-ab"),
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The same workload against two deployments (URLs, live) or two system configurations (sim),
    reported side by side."""
    from bench.ab import run_ab

    results = run_ab(
        a, b, workload_name, requests=requests, rate=rate, load=load, seed=seed, profile=profile,
        instances=instances, model=model, model_b=model_b, length_scale=length_scale, max_prompt=max_prompt,
        max_output=max_output, out_dir=out, show_progress=not json_out,
    )  # fmt: skip
    from bench.compare import compact

    if json_out:
        typer.echo(json.dumps(compact(results), default=str))
    else:
        _print_summaries({n: s["summary"] for n, s in next(iter(results["workloads"].values()))["systems"].items()})
        typer.echo(f"report: {out / 'report.md'}", err=True)


@app.command()
def plan(
    workload_name: Annotated[
        str, typer.Option("--workload", "-w", help="Traffic to plan for (see `bench workload`; trace:PATH too).")
    ] = "Mixed",
    rate: Annotated[float, typer.Option(help="Offered load, req/s.")] = 100.0,
    instances: Annotated[int, typer.Option(help="Instances to divide.")] = 16,
    profile: Annotated[str, typer.Option(help="Timing profile of one instance.")] = "h100-llama-2-7b",
    objective: Annotated[
        str, typer.Option(help="balanced (TTFT x JCT), ttft, jct, or slo (least JCT meeting --ttft-slo-ms at p99).")
    ] = "balanced",
    ttft_slo_ms: Annotated[float, typer.Option(help="p99 TTFT target of --objective slo, ms.")] = 200.0,
    requests: Annotated[int, typer.Option("--requests", "-n", help="Length samples drawn from the workload.")] = 4000,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """The prefill:decode split (P = 0: every request co-located) to run for this traffic, chosen by
    simulating the candidates: what `tetri` does in `bench compare`, and `GET /admin/plan` live."""
    from backends.engines.simulated.profiles import get_timing, profile_names
    from bench.workloads import build_workload
    from orchestrator.sim import system_config
    from orchestrator.sim.planner import OBJECTIVES, recommend_split

    if objective not in OBJECTIVES:
        raise typer.BadParameter(f"choose one of {', '.join(OBJECTIVES)}", param_hint="--objective")
    if profile not in profile_names():
        raise typer.BadParameter(f"known: {', '.join(profile_names())}", param_hint="--profile")
    if not 0 < ttft_slo_ms < float("inf"):
        raise typer.BadParameter("a positive number of milliseconds", param_hint="--ttft-slo-ms")
    tm = get_timing(profile)
    wl = build_workload(workload_name, requests, rate=None, seed=seed, max_context=tm.max_context)
    prompts = [r.prompt_tokens for r in wl.requests]
    outputs = [r.output_tokens for r in wl.requests]
    try:
        cfg = system_config("tetri", plan_objective=objective, plan_ttft_slo_ms=ttft_slo_ms)
        choice = recommend_split(instances, prompts, outputs, rate, tm, cfg, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    doc = {"recommended": {"prefill": choice.prefill, "decode": choice.decode}, "instances": instances,
           "rate_rps": rate, "workload": workload_name, "profile": profile, "objective": objective,
           **({"ttft_slo_ms": ttft_slo_ms} if objective == "slo" else {}),
           "candidates": choice.candidates, "rejected": choice.rejected}  # fmt: skip
    if json_out:
        typer.echo(json.dumps(doc))
        return
    from rich.console import Console
    from rich.table import Table

    goal = f"slo: p99 TTFT <= {ttft_slo_ms:g} ms" if objective == "slo" else objective
    t = Table(title=f"{workload_name} at {rate:g} req/s on {instances} x {profile} ({goal})")
    for col in ("P:D", "mean TTFT ms", "p99 TTFT ms", "mean JCT ms", "score", "steady-state utilisation", ""):
        t.add_column(col)
    chosen = f"{choice.prefill}:{choice.decode}"
    for split, c in choice.candidates.items():
        label = split + (" (all co-located)" if split.startswith("0:") else "")
        mark = "<- recommended" if split == chosen else ("misses the SLO" if c.get("meets_slo") is False else "")
        util = f"{c['util']:.2f}" + (" (over capacity)" if c["util"] >= 1 else "")
        t.add_row(label, f"{c['mean_ttft_ms']:.1f}", f"{c['p99_ttft_ms']:.0f}", f"{c['mean_jct_ms']:.0f}",
                  f"{c['score']:.3f}", util, mark)  # fmt: skip
    for split, util in choice.rejected.items():
        t.add_row(split, "–", "–", "–", "–", f"{util:.2f} (over capacity)", "not simulated: a pool falls behind")
    Console().print(t)
    typer.echo(f"recommended prefill:decode = {chosen}")


@app.command()
def headroom(
    out: Annotated[Path, typer.Option(help="Directory for headroom.md, headroom.json and the plot.")] = Path(
        "bench-headroom"
    ),
    profile: Annotated[str, typer.Option(help="Timing profile of one instance.")] = "h100-llama-2-7b",
    instances: Annotated[int, typer.Option(help="Instances, the same for every system.")] = 4,
    workload_names: Annotated[str, typer.Option("--workload", "-w", help="Comma-separated.")] = "LPHD,Mixed",
    loads: Annotated[str, typer.Option(help="Fractions of the decode capacity, comma-separated.")] = "0.3,0.6,0.9",
    systems: Annotated[str, typer.Option(help="Comma-separated systems.")] = (
        "colocated-vllm,colocated-sarathi,disagg-simple,tetri"
    ),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Steady-state mean JCT of each system next to the floor no scheduler can beat, at loads set as
    fractions of the cluster's decode capacity (simulator)."""
    from backends.engines.simulated.profiles import profile_names
    from bench.headroom import headroom as run_headroom
    from bench.headroom import markdown

    if profile not in profile_names():
        raise typer.BadParameter(f"known: {', '.join(profile_names())}", param_hint="--profile")
    try:
        fractions = tuple(float(x) for x in _split_list(loads))
    except ValueError as exc:
        raise typer.BadParameter("loads are numbers, e.g. 0.3,0.6,0.9", param_hint="--loads") from exc
    if not fractions or any(not 0 < f < 1.5 for f in fractions):
        raise typer.BadParameter("each load is a fraction of capacity in (0, 1.5)", param_hint="--loads")
    if not 1 <= instances <= 512:
        raise typer.BadParameter("between 1 and 512", param_hint="--instances")
    try:
        doc = run_headroom(out, profile, instances, tuple(_split_list(workload_names)), fractions,
                           tuple(split_systems(systems)), seed)  # fmt: skip
    except ValueError as exc:  # an unknown workload or system, named by the message
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(markdown(doc))
    typer.echo(f"wrote {out}/headroom.md, headroom.json, headroom_jct.png")


@app.command()
def goodput(
    workload_names: Annotated[str, typer.Option("--workload", "-w", help="Comma-separated workloads.")] = "Mixed",
    systems: Annotated[str, typer.Option(help="Comma-separated systems; 'name+key=value' overrides.")] = (
        "colocated-vllm,colocated-sarathi,disagg-simple,tetri"
    ),
    backend: Annotated[str, typer.Option(help="sim (cluster simulator) or native (live, small scale).")] = "sim",
    profile: Annotated[str, typer.Option(help="Timing profile of one instance (sim).")] = "h100-llama-2-7b",
    instances: Annotated[int, typer.Option(help="Instances, the same for every system.")] = 16,
    kv_tokens: Annotated[str, typer.Option(help="KV regimes, comma-separated: tokens per instance or "
                                                "'profile' (the profile's full pool).")] = "profile",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (workload draw, arrivals, predictor).")] = "0",
    slo_ttft_ms: Annotated[float | None, typer.Option(help="TTFT SLO, ms (default: 5x the baseline's "
                                                           "light-load mean TTFT).")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO, ms (default: 1.5x the baseline's "
                                                           "light-load mean TPOT).")] = None,
    share: Annotated[float, typer.Option(help="Share of requests that must meet both SLOs.")] = 0.9,
    span_s: Annotated[float, typer.Option(help="Seconds of Poisson arrivals per probe.")] = 60.0,
    rel_tol: Annotated[float, typer.Option(help="Bisect until the bracket is this close (relative).")] = 0.03,
    jobs: Annotated[int, typer.Option(help="Worker processes (sim).")] = 1,
    rate_hint: Annotated[float, typer.Option(help="native: first guess of the goodput, req/s.")] = 1.0,
    out: Annotated[Path, typer.Option(help="Folder for goodput.md, goodput_attainment.png, results.json.")] = Path(
        "bench-goodput"
    ),
) -> None:
    """Goodput: the highest Poisson rate per instance at which a share of requests (90%) meets both a
    TTFT and a TPOT SLO, bisected for each system; a Markdown table, an attainment plot, results.json."""
    from rich.progress import Progress

    from backends.engines.simulated.profiles import profile_names
    from bench.goodput import goodput_live, goodput_sim, markdown, write
    from bench.workloads import WORKLOADS
    from orchestrator.sim import system_config

    names = split_systems(systems)
    wls = _split_list(workload_names)
    if not names:
        raise typer.BadParameter("name at least one system", param_hint="--systems")
    for name in names:
        try:
            system_config(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--systems") from exc
    bad = [w for w in wls if w not in WORKLOADS and not w.startswith(("synthetic:", "trace:"))]
    if not wls or bad:
        raise typer.BadParameter(f"unknown {bad or 'none'}; known: {', '.join(WORKLOADS)}", param_hint="--workload")
    if backend not in ("sim", "native"):
        raise typer.BadParameter("sim or native", param_hint="--backend")
    if profile not in profile_names():
        raise typer.BadParameter(f"known: {', '.join(profile_names())}", param_hint="--profile")
    if not 1 <= instances <= 512:
        raise typer.BadParameter("between 1 and 512", param_hint="--instances")
    if not 0 < share <= 1:
        raise typer.BadParameter("a share in (0, 1]", param_hint="--share")
    for value, hint in ((slo_ttft_ms, "--slo-ttft-ms"), (slo_tpot_ms, "--slo-tpot-ms")):
        if value is not None and not 0 < value < math.inf:
            raise typer.BadParameter("a positive number of milliseconds", param_hint=hint)
    try:
        seed_list = [int(x) for x in _split_list(seeds)]
        kvs = [None if x == "profile" else int(x) for x in _split_list(kv_tokens)]
    except ValueError as exc:
        raise typer.BadParameter(f"integers: {exc}") from exc
    if not seed_list or not kvs or any(k is not None and k <= 0 for k in kvs):
        raise typer.BadParameter("seeds and KV regimes: at least one each, KV tokens positive")
    if span_s <= 0 or not 0 < rel_tol < 1 or jobs < 1:
        raise typer.BadParameter("--span-s > 0, 0 < --rel-tol < 1, --jobs >= 1")
    with Progress(transient=True) as bar:
        if backend == "sim":
            task = bar.add_task("goodput", total=len(wls) * len(kvs) * len(seed_list) * len(names))

            def step(msg: str) -> None:
                bar.update(task, advance=1, description=msg[:70])
                bar.console.print(msg)

            doc = goodput_sim(wls, names, seed_list, kvs, profile, instances, span_s, share, slo_ttft_ms,
                              slo_tpot_ms, rel_tol, jobs, progress=step)  # fmt: skip
        else:
            task = bar.add_task("goodput (live)", total=None)

            def step(msg: str) -> None:
                bar.update(task, description=msg[:70])
                bar.console.print(msg)

            doc = goodput_live(wls[0], names, instances, span_s, share, slo_ttft_ms, slo_tpot_ms, seed_list[0],
                               rate_hint, progress=step)  # fmt: skip
    paths = write(doc, out)
    typer.echo(markdown(doc))
    typer.echo(f"wrote {paths['report']}, {paths['plot'].name}, {paths['results'].name}")


@app.command()
def calibrate(
    save: Annotated[bool, typer.Option(help="Save as the cpu-smollm2 profile.")] = True,
    out: Annotated[Path | None, typer.Option(help="Where to save (default: cache_dir()/sim/cpu-smollm2.json; "
                                                  "point TETRI_SIM_CPU_PROFILE at another path to use it).")] = None,
    url: Annotated[list[str] | None, typer.Option(help="Fit to the passes running workers logged (GET URL/passes) "
                                                       "instead of measuring a fresh engine; repeatable.")] = None,
    since: Annotated[float, typer.Option(help="With --url: only passes after this unix time.")] = 0.0,
) -> None:
    """Fit the cpu-smollm2 timing profile from measured forward passes of the built-in engine."""
    from bench.calibrate import calibrate_cpu, calibrate_from_workers

    if url:
        import httpx

        try:
            coeffs = calibrate_from_workers(url, since, save, out)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            msg = f"cannot fit to the passes of {', '.join(url)}: {exc}"
            raise typer.BadParameter(msg, param_hint="--url") from exc
    else:
        coeffs = calibrate_cpu(save=save, path=out)
    typer.echo(json.dumps(coeffs, indent=2))


@app.command()
def router(
    clients: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,16,64",
    requests: Annotated[int, typer.Option("--requests", "-n", help="Requests per system and level.")] = 2000,
    tokens: Annotated[int, typer.Option(help="Tokens each request streams.")] = 16,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 64,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds per level (systems take turns).")] = 4,
    systems: Annotated[str, typer.Option(help="Of tetri, sglang-router, floor, tetri-x2 (two tetri replicas "
                                                "on one store; the client alternates).")] = "tetri,sglang-router,floor",
    target: Annotated[str | None, typer.Option(help="Instead: load an already running tetri at this URL "
                                                    "(e.g. `tetri up`).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder (report.md, results.json, router.png).")] = Path(
        "bench-results/router"),
) -> None:
    """The router alone: tetri serve, sglang-router and a hand-done floor over the same SGLang fakes."""
    from rich.console import Console

    from bench.router import markdown, run_router_bench, run_target, temp_logs, write_report

    levels = [int(c) for c in _split_list(clients)]
    if not levels or min(levels) < 1:
        raise typer.BadParameter("positive integers", param_hint="--clients")
    console = Console(stderr=True)
    with console.status("running") as status:
        if target:
            result = run_target(target.rstrip("/"), levels, requests, tokens, prompt_tokens, progress=status.update)
            title = f"Client load against {target}"
        else:
            names = _split_list(systems)
            unknown = set(names) - {"tetri", "tetri-x2", "sglang-router", "floor"}
            if unknown:
                raise typer.BadParameter(f"unknown systems {sorted(unknown)}", param_hint="--systems")
            logs = temp_logs()
            result = run_router_bench(levels, requests, tokens, prompt_tokens, rounds, names, logs,
                                      progress=status.update)
            result["logs"] = str(logs)
            title = "Router alone: tetri serve vs sglang-router vs floor"
    report = write_report(result, out, title)
    typer.echo(markdown(result))
    typer.echo(f"wrote {report}")


@app.command()
def scale(
    url: Annotated[str | None, typer.Option(help="A running orchestrator whose pools scale (e.g. `tetri up`); "
                                                 "unset: start `tetri up` with --model here.")] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="TETRI_ADMIN_TOKEN", help="With --url.")] = None,
    model: Annotated[str, typer.Option(help="Model (served name with --url).")] = "random:tiny-llama",
    role: Annotated[str, typer.Option(help="The pool to scale: prefill, decode or colocated.")] = "decode",
    low: Annotated[int, typer.Option(help="Replicas before and after.")] = 1,
    peak: Annotated[int, typer.Option(help="Replicas in between.")] = 3,
    clients: Annotated[int, typer.Option(help="Closed-loop clients.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 8,
    prompt_words: Annotated[int, typer.Option(help="Numbers in each prompt (its length).")] = 8,
    burst_at_down: Annotated[int, typer.Option(help="Long prompts sent just before the scale-down.")] = 6,
    burst_words: Annotated[int, typer.Option(help="Numbers in each of those prompts.")] = 300,
    kv_tokens: Annotated[int, typer.Option(help="KV pool per worker (without --url).")] = 4096,
    chunk_size: Annotated[str, typer.Option(help="Prefill chunk (without --url).")] = "16",
    monitor_interval_ms: Annotated[int, typer.Option(help="The orchestrator's monitor tick (target unit).")] = 100,
    out: Annotated[Path, typer.Option(help="results.json goes here.")] = Path("bench-results/scale"),
) -> None:
    """A pool scaled low -> peak -> low under load: new instances taking traffic vs their ready time plus
    two monitor ticks; failed requests while it shrinks (issue 19's targets)."""
    import tempfile
    from contextlib import nullcontext

    from bench.scale import markdown, measure, tetri_up

    logs = Path(tempfile.mkdtemp(prefix="tetri-bench-scale-"))
    ctx = nullcontext(url.rstrip("/")) if url else tetri_up(model, kv_tokens, chunk_size, logs)
    with ctx as base:
        token = admin_token if url else "bench"
        result = measure(base, token, model, role=role, low=low, peak=peak, clients=clients, max_tokens=max_tokens,
                         prompt_words=prompt_words, monitor_interval_s=monitor_interval_ms / 1000,
                         burst_at_down=burst_at_down, burst_words=burst_words)  # fmt: skip
    result["logs"] = str(logs)
    if not url:  # requests a draining instance refused KV for, continued elsewhere (re-prefilled)
        log_text = (logs / "tetri-up.log").read_text(errors="replace")
        result["scale_down"]["migrated_refused_kv"] = log_text.count("worker is draining); migrating")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    typer.echo(markdown(result))
    typer.echo(f"wrote {out / 'results.json'}")


@app.command()
def failover(
    database_url: Annotated[str | None, typer.Option(help="The replicas' shared store; unset: a fresh SQLite file. "
                                                          "For PostgreSQL give an empty database or schema.")] = None,
    requests: Annotated[int, typer.Option("--requests", "-n", help="Requests split across both replicas.")] = 200,
    concurrency: Annotated[int, typer.Option(help="Clients in flight.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 16,
    decode_kv_tokens: Annotated[int, typer.Option(help="KV pool of each decode worker (small: contended).")] = 768,
    kill_at: Annotated[float, typer.Option(help="Kill the leader after this fraction of requests completed.")] = 0.4,
    lease_s: Annotated[float, typer.Option(help="Leader lease.")] = 3.0,
    renew_s: Annotated[float, typer.Option(help="Lease renewal period.")] = 1.0,
    out: Annotated[Path, typer.Option(help="results.json goes here.")] = Path("bench-results/failover"),
) -> None:
    """Two orchestrator replicas sharing native workers; the leader SIGKILLed mid-run: failover time,
    requests lost, KV over-admission (issue 19's target: at most 5 s, zero lost)."""
    import tempfile

    from bench.failover import markdown, measure

    logs = Path(tempfile.mkdtemp(prefix="tetri-bench-failover-"))
    url = database_url or f"sqlite:///{logs / 'tetri.db'}"
    result = measure(url, requests=requests, concurrency=concurrency, max_tokens=max_tokens,
                     decode_kv_tokens=decode_kv_tokens, kill_at=kill_at, lease_s=lease_s, renew_s=renew_s,
                     log_dir=logs)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**result.to_dict(), "logs": str(logs)}, indent=1))
    typer.echo(markdown(result))
    typer.echo(f"wrote {out / 'results.json'}")

def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
