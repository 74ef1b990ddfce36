"""A first `tetri up` that explains itself: convert the model and profile the chunk-size knee in
the foreground, with progress bars, before the workers start (they then find both cached and
start in seconds, instead of a silent minute spent inside their log files)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from backends.engines.native.model_source import CONVERT_STEPS, DEFAULT_MODEL, convert_model, gguf_to_convert


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
    from backends.engines.paths import cache_dir

    console.print(f"first run: converting [bold]{gguf.name}[/] to safetensors, once "
                  f"(cached in {cache_dir() / 'models' / name})")
    with _progress(console) as bar:
        task = bar.add_task("converting", total=len(CONVERT_STEPS), note="")

        def step(what: str) -> None:
            bar.update(task, completed=CONVERT_STEPS.index(what), note=what)

        convert_model(spec, step=step)
        bar.update(task, completed=len(CONVERT_STEPS), note="done")


def ensure_profiled(spec: str, device: str, console: Console) -> None:
    """Profile the chunk-size knee now unless one is cached for this (device, model)."""
    from backends.engines.native import profile
    from backends.engines.native.model_source import file_lock

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

            result = profile.profile_knee(spec, device, progress=on_size)
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
