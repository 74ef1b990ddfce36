"""The `tetri` command line."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="tetri: TetriInfer-style LLM inference orchestration.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="The SQL store.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")


def _mount(module: str, name: str, help_text: str) -> None:
    """Sub-apps owned by other packages; a broken one must not take the whole CLI down."""
    try:
        sub = __import__(module, fromlist=["app"]).app
    except Exception as exc:  # noqa: BLE001
        sub = typer.Typer(help=f"{help_text} (unavailable: {exc})")
    app.add_typer(sub, name=name, help=help_text)


_mount("predictor.cli", "predictor", "Output-length predictor: train, eval, label.")
_mount("bench.cli", "bench", "Workloads, live runs, simulator comparisons.")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def _logging(level: str = "WARNING") -> None:
    logging.basicConfig(level=os.environ.get("TETRI_LOG_LEVEL", level).upper(),  # "info" works too
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def _require_admin_token_off_loopback(host: str, admin_token: str | None) -> None:
    """Off loopback the admin API (instances, drains, flips) would face the network with no token."""
    if not admin_token and not _is_loopback(host):
        typer.echo(f"error: refusing to serve on {host}, not a loopback address, without an admin token: "
                   "set TETRI_ADMIN_TOKEN (e.g. `export TETRI_ADMIN_TOKEN=$(openssl rand -hex 16)`), "
                   "or bind 127.0.0.1", err=True)
        raise typer.Exit(2)


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="Orchestrator port [default: 8000].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [default: 127.0.0.1].")] = None,
    prefill: Annotated[int, typer.Option(help="Prefill workers.")] = 1,
    decode: Annotated[int, typer.Option(help="Decode workers.")] = 1,
    colocated: Annotated[int, typer.Option(help="Co-located workers.")] = 0,
    model: Annotated[str, typer.Option(help="Model spec for the built-in engine.")] = "smollm2-135m-instruct",
    backend: Annotated[str, typer.Option(help="Worker backend: native or sim.")] = "native",
    chunk_size: Annotated[str, typer.Option(help="Tokens per prefill pass, or 'auto' (profiled knee).")] = "auto",
    batching: Annotated[str, typer.Option(help="Co-located batching style: sarathi or vllm.")] = "sarathi",
    kv_tokens: Annotated[int | None, typer.Option(help="KV pool size per worker, tokens.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file.")] = None,
) -> None:
    """Start the orchestrator with its workers as child processes; Ctrl-C stops everything."""
    import uvicorn

    from orchestrator.app import create_app
    from orchestrator.config import InstanceSpec, Settings
    from orchestrator.launcher import process_fleet

    _logging()
    # The local pool provider: PUT /admin/pools/{role} starts and stops workers like these ones.
    settings = Settings.load(
        config, port=port, model=model, host=host, pool_provider="local", local_worker_backend=backend,
        local_worker_chunk_size=chunk_size, local_worker_batching=batching, local_worker_kv_tokens=kv_tokens,
    )  # fmt: skip
    _require_admin_token_off_loopback(settings.host, settings.admin_token)
    roles = ["prefill"] * prefill + ["decode"] * decode + ["colocated"] * colocated
    if not roles:
        raise typer.BadParameter("start at least one worker")
    if backend == "native":
        # A first run converts the model and profiles the chunk size: do it here, with progress
        # bars, rather than silently inside every worker (which then find both cached).
        from backends.engines.native.prepare import prepare

        prepare(model, "cpu", chunk_size)
    fleet = process_fleet()  # the provider's too: it counts (and may stop) these workers
    try:
        for role in roles:
            w = fleet.start_worker(role, model, backend=backend, chunk_size=chunk_size,  # type: ignore[arg-type]
                                   batching=batching, kv_tokens=kv_tokens)
            typer.echo(f"starting {role} worker on {w.url} (log: {w.log_path}) ...")
        fleet.wait_healthy(on_ready=lambda w, s: typer.echo(f"{w.role} worker ready on {w.url} ({s:.1f} s)"))
        settings.instances = [
            InstanceSpec(url=w.url, backend=backend, role=w.role, model=settings.public_model_name,  # type: ignore[arg-type]
                         id=f"{w.role}-{i}")
            for i, w in enumerate(fleet.workers)
        ]
        url = f"http://{settings.host}:{settings.port}"
        server = uvicorn.Server(uvicorn.Config(create_app(settings, on_ready=lambda: typer.echo(
            f"tetri ready at {url}  (OpenAI API: {url}/v1, model {settings.public_model_name!r}; Ctrl-C stops it)"
        )), host=settings.host, port=settings.port, log_level="warning"))
        # uvicorn re-raises the signal that stopped it once it has shut down; make SIGTERM an
        # exception (as SIGINT already is) so that the `finally` below still stops the workers.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        server.run()
    finally:
        fleet.stop()
        typer.echo("stopped.")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Orchestrator port [default: 8000].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [default: 127.0.0.1].")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with instances and knobs.")] = None,
) -> None:
    """Run the orchestrator alone; instances come from the config or POST /admin/instances."""
    import uvicorn

    from orchestrator.app import create_app
    from orchestrator.config import Settings

    _logging()
    settings = Settings.load(config, port=port, host=host)
    _require_admin_token_off_loopback(settings.host, settings.admin_token)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


@app.command()
def worker(
    role: Annotated[str, typer.Option(help="prefill, decode or colocated.")] = "colocated",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 9000,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    backend: Annotated[str, typer.Option(help="native (PyTorch engine) or sim (timing model).")] = "native",
    model: Annotated[str, typer.Option(help="Model spec.")] = "smollm2-135m-instruct",
    chunk_size: Annotated[str, typer.Option(help="Tokens per prefill pass or 'auto'.")] = "auto",
    batching: Annotated[str, typer.Option(help="Co-located style: sarathi or vllm.")] = "sarathi",
    kv_tokens: Annotated[int | None, typer.Option(help="KV pool size in tokens.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    profile: Annotated[str, typer.Option(help="Sim backend: timing profile.")] = "cpu-smollm2",
    kv_port: Annotated[int, typer.Option(help="Raw KV socket port (0: any free port, -1: HTTP pushes only).")] = 0,
    prefix_caching: Annotated[bool, typer.Option(help="Reuse cached prompt blocks (TETRI_PREFIX_CACHING).")] = True,
) -> None:
    """Run one engine worker process (the HTTP API of docs/contracts.md)."""
    import uvicorn

    from backends.engines.server import create_worker_app

    _logging()
    if not prefix_caching:
        os.environ["TETRI_PREFIX_CACHING"] = "0"  # the engine reads it (engine_base.PREFIX_CACHING_ENV)
    chunk: int | str = int(chunk_size) if chunk_size.isdigit() else chunk_size
    if role not in ("prefill", "decode", "colocated"):
        raise typer.BadParameter(f"unknown role {role!r}")
    if backend == "native":
        from rich.console import Console

        from backends.engines.native.engine import NativeEngine
        from backends.engines.native.prepare import prepare

        # A first start converts the model and profiles the chunk size: say so in the worker's log
        # (a container's first start would otherwise be a silent minute).
        prepare(model, device, chunk_size, Console(stderr=True))
        core = NativeEngine(model=model, role=role, batching=batching, chunk_size=chunk,  # type: ignore[arg-type]
                            kv_tokens=kv_tokens, device=device)
    elif backend == "sim":
        from backends.engines.simulated.engine import SimEngine

        core = SimEngine(profile=profile, role=role, batching=batching, chunk_size=chunk,  # type: ignore[arg-type]
                         kv_tokens=kv_tokens)
    else:
        raise typer.BadParameter(f"unknown backend {backend!r}")
    # The KV socket binds the HTTP API's address: never wider than the API itself.
    app_ = create_worker_app(core, backend, kv_port=None if kv_port < 0 else kv_port, kv_host=host)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="Model spec.")] = "smollm2-135m-instruct",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    sizes: Annotated[str | None, typer.Option(help="Comma-separated tokens per pass.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Re-measure; say whether the cached knee still holds "
                                        "(exit 1 if not); cache nothing.")] = False,
) -> None:
    """Sweep tokens per prefill pass; print the curve and the saturation knee (cached)."""
    from backends.engines.native.prepare import profile_command

    try:
        profile_command(model, device, json_out, sizes, check=check)
    except SystemExit as exc:
        raise typer.Exit(int(exc.code or 0)) from None


@app.command()
def status(
    url: Annotated[str, typer.Option(help="Orchestrator base URL.")] = "http://127.0.0.1:8000",
) -> None:
    """Instances (role, backend, state, queue, KV use) and pools of a running orchestrator
    (admin API: the token comes from TETRI_ADMIN_TOKEN)."""
    from rich.console import Console

    from orchestrator.status import StatusError, fetch_status, render_status

    try:
        instances, stats = fetch_status(url, os.environ.get("TETRI_ADMIN_TOKEN"))
    except StatusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    render_status(instances, stats, Console())


@db_app.command("upgrade")
def db_upgrade(url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None) -> None:
    """Apply the Alembic migrations (SQLite file by default, TETRI_DATABASE_URL otherwise)."""
    from orchestrator.store import db_upgrade_command

    typer.echo(db_upgrade_command(url))


# Whole trailing words: admin_token, api_keys, kv_secret, password (not max_tokens, tokenizers).
_SECRET_NAME = re.compile(r"(^|_)(token|secret|password|passwd|api_?keys?|apikey|credentials?|authorization)$",
                          re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^/:@\s]*:)(?P<password>[^/\s]*)(?=@)", re.IGNORECASE)
REDACTED = "***"


def redact(value: Any, name: str = "") -> Any:
    """The configuration with secrets masked: values under a secret-sounding name (admin_token,
    api_keys, an instance option's api_key...) and the password of any URL (database_url)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if _SECRET_NAME.search(name) and value not in (None, "", []):
        return [REDACTED for _ in value] if isinstance(value, list) else REDACTED
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, value)
    return value


@config_app.command("show")
def config_show(config: Annotated[Path | None, typer.Option(help="YAML file.")] = None) -> None:
    """Print the effective configuration as JSON (tokens, keys and passwords masked)."""
    from orchestrator.config import Settings

    typer.echo(json.dumps(redact(Settings.load(config).model_dump(mode="json")), indent=2))


if __name__ == "__main__":
    app()
