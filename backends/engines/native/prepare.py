"""A first `tetri up` that explains itself: convert the model and profile the chunk-size knee in
the foreground, with progress bars, before the workers start (they then find both cached and
start in seconds, instead of a silent minute spent inside their log files). Also `tetri profile`.

Building an engine to profile is done here, above profile.py: the engine imports profile.py (to
resolve chunk_size="auto" on itself), so profile.py never imports the engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from backends.engines.native import profile
from backends.engines.native.engine import NativeEngine
from backends.engines.native.model_source import (
    CONVERT_STEPS,
    DEFAULT_MODEL,
    convert_model,
    file_lock,
    gguf_to_convert,
)
from backends.engines.paths import cache_dir


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
                    TimeElapsedColumn(), console=console, transient=False)


def model_name(spec: str) -> str:
    """The name load_model gives `spec` (the profile cache's key), without loading it."""
    spec = spec or DEFAULT_MODEL
    if spec.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        return DEFAULT_MODEL
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec).resolve().stem
    if Path(spec).is_dir():
        return Path(spec).resolve().name
    return spec


def ensure_converted(spec: str, console: Console) -> None:
    todo = gguf_to_convert(spec)
    if todo is None:
        return
    gguf, name = todo
    console.print(f"first run: converting [bold]{gguf.name}[/] to safetensors, once "
                  f"(cached in {cache_dir() / 'models' / name})")
    with _progress(console) as bar:
        task = bar.add_task("converting", total=len(CONVERT_STEPS), note="")

        def step(what: str) -> None:
            bar.update(task, completed=CONVERT_STEPS.index(what), note=what)

        convert_model(spec, step=step)
        bar.update(task, completed=len(CONVERT_STEPS), note="done")


def profile_model(
    spec: str,
    device: str = "cpu",
    sizes: list[int] | None = None,
    *,
    save: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> profile.ProfileResult:
    """Load `spec` into an engine whose chunk fits the largest size, and profile its knee."""
    engine = NativeEngine(spec, chunk_size=max(sizes or profile.DEFAULT_SIZES), device=device)
    return profile.profile_knee(engine, sizes, save=save, progress=progress)


def ensure_profiled(spec: str, device: str, console: Console) -> None:
    """Profile the chunk-size knee now unless one is cached for this (device, model)."""
    name = model_name(spec)
    if profile.load_cached(name, device) is not None:
        return
    budget = profile.BUDGET_SECONDS.get(device.split(":")[0], 60.0)
    console.print(f"first run: profiling the prefill chunk size (tokens per forward pass) of [bold]{name}[/] "
                  f"on {profile.device_name(device)}, once (up to ~{budget:.0f} s; cached in "
                  f"{profile.profile_path(name, device)})")
    with file_lock(f"profile-{profile._slug(profile.device_name(device))}-{profile._slug(name)}"):
        if profile.load_cached(name, device) is not None:
            return
        with _progress(console) as bar:
            task = bar.add_task("profiling", total=None, note="loading the model")

            def on_size(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, note=f"{done}/{total} sizes")

            result = profile_model(spec, device, progress=on_size)
            bar.update(task, completed=bar.tasks[0].total or 1, total=bar.tasks[0].total or 1, note="done")
        console.print(f"chunk size: [bold]{result.knee}[/] tokens per forward pass")
        for warning in result.warnings():
            console.print(f"[yellow]warning:[/] {warning}")


def prepare(spec: str, device: str = "cpu", chunk_size: str = "auto", console: Console | None = None) -> None:
    """What a native worker would do silently on its first start, done here where it can be seen."""
    console = console or Console()
    ensure_converted(spec, console)
    if chunk_size == "auto":
        ensure_profiled(spec, device, console)


# ---- `tetri profile` ---------------------------------------------------------------------------
_Model = Annotated[str, typer.Option("--model", help="model spec (name, HF dir, .gguf, random:<shape>)")]
_Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
_Json = Annotated[Path | None, typer.Option("--json", "--json-out", help="also write the result as JSON here")]
_Sizes = Annotated[str | None, typer.Option("--sizes", help="comma-separated tokens per pass")]


def profile_command(
    model: _Model = DEFAULT_MODEL,
    device: _Device = "cpu",
    json_out: _Json = None,
    sizes: _Sizes = None,
    check: bool = False,
) -> None:
    """Sweep tokens per prefill forward pass, print the curve and the knee, cache the knee.
    `check`: re-measure, compare with the cached knee (exit 1 when it no longer holds), cache nothing."""
    size_list = [int(s) for s in sizes.split(",")] if sizes else None
    console = Console()
    cached = None
    if check:
        cached = profile.load_cached(model_name(model), device)
        if cached is None:
            console.print(f"no cached profile of {model} on {profile.device_name(device)} to check; "
                          "run `tetri profile`")
            raise SystemExit(2)
        size_list = size_list or sorted(n for n, _ in cached.curve)
    console.print(f"profiling prefill of [bold]{model}[/] on {profile.device_name(device)} ...")
    result = profile_model(model, device, sizes=size_list, save=not check)
    peak = result.peak_tokens_per_s
    table = Table(title=f"prefill throughput vs tokens per forward pass ({result.model}, "
                        f"median of {result.repeats}+ passes)")
    table.add_column("tokens/pass", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("% of peak", justify="right")
    table.add_column("fit", justify="right")
    table.add_column("")
    fit = result.fit
    for n, tps in result.curve:
        fitted = f"{float(profile.saturation(n, fit['a'], fit['k'], fit.get('n', 1.0))):,.0f}" if fit else "-"
        table.add_row(str(n), f"{tps:,.0f}", f"{100 * tps / peak:.0f}%", fitted,
                      "knee" if n == result.knee and result.knee_found else "")
    console.print(table)
    if result.knee_found:
        basis = (f"fitted asymptote {fit['a']:,.0f} tokens/s, R² {fit['r2']:.2f}" if fit
                 else f"peak {peak:,.0f} tokens/s")
        console.print(f"knee: [bold]{result.knee}[/] tokens per forward pass (smallest within "
                      f"{profile.KNEE_TOLERANCE:.0%} of the {basis})")
    for warning in result.warnings():
        console.print(f"[yellow]warning:[/] {warning}")
    if not check:
        console.print(f"cached at {profile.profile_path(result.model, device)}")
    if json_out is True:  # a flag: print the result as JSON too
        print(json.dumps(result.to_dict(), indent=2))
    elif json_out:  # a path: write it there
        Path(json_out).write_text(json.dumps(result.to_dict(), indent=2))
    if cached is not None:
        holds, why = profile.check_knee(cached, result)
        console.print(("[green]ok:[/] " if holds else "[red]changed:[/] ") + why)
        if not holds:
            raise SystemExit(1)
