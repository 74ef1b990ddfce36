"""`tetri up`: the orchestrator and its workers as child processes on this machine.

Workers start in their own process groups so that one Ctrl-C or SIGTERM reaches us first and we
stop them in order: no orphan processes.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends.base import Role


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if we die without cleaning up (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProcess:
    role: Role
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)  # monotonic: ages, "the newest"
    stopped_at: float | None = None  # epoch seconds (as the store's events) its process was seen gone

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Fleet:
    """Worker processes started by us; `stop_worker()` ends one, `stop()` every one of them. The
    list is guarded by a lock: the local pool provider starts and stops workers from threads."""

    workers: list[WorkerProcess] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def start_worker(
        self,
        role: Role,
        model: str,
        backend: str = "native",
        chunk_size: str = "auto",
        batching: str = "sarathi",
        kv_tokens: int | None = None,
        log_dir: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> WorkerProcess:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "worker",
            "--backend",
            backend,
            "--role",
            role,
            "--port",
            str(port),
            "--model",
            model,
            "--chunk-size",
            chunk_size,
            "--batching",
            batching,
        ]
        if kv_tokens:
            cmd += ["--kv-tokens", str(kv_tokens)]
        cmd += extra_args or []
        log_dir = log_dir or Path(os.environ.get("TETRI_LOG_DIR", "/tmp/tetri-logs"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{role}-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
        worker = WorkerProcess(role, port, proc, log_path)
        with self._lock:
            self.workers.append(worker)
        return worker

    def wait_healthy(
        self, timeout_s: float = 300.0, on_ready: Callable[[WorkerProcess, float], None] | None = None
    ) -> None:
        """Wait for every worker's /health; `on_ready(worker, seconds waited)` as each one answers."""
        started = time.monotonic()
        deadline = started + timeout_s
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if worker.proc.poll() is not None:
                    tail = worker.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{worker.role} worker on port {worker.port} exited:\n{tail}")
                try:
                    if httpx.get(f"{worker.url}/health", timeout=1.0).status_code == 200:
                        pending.remove(worker)
                        if on_ready is not None:
                            on_ready(worker, time.monotonic() - started)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not healthy after {timeout_s:.0f}s: {[w.url for w in pending]}")
            if pending:
                time.sleep(0.2)

    def stop_worker(self, worker: WorkerProcess, grace_s: float = 10.0) -> int:
        """SIGTERM one worker's process group, SIGKILL after `grace_s`; forget it. Its exit code.
        (Draining it first is the caller's business: this only ends the process.)"""
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)
        _end([worker], grace_s)
        return int(worker.proc.returncode)

    def stop(self, grace_s: float = 10.0) -> None:
        with self._lock:
            workers, self.workers = list(self.workers), []
        _end(workers, grace_s)


def _end(workers: list[WorkerProcess], grace_s: float) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            with _suppress():
                os.killpg(worker.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
        if worker.stopped_at is None:
            worker.stopped_at = time.time()


_PROCESS_FLEET: Fleet | None = None


def process_fleet() -> Fleet:
    """The workers this process started for `tetri up` and its local pool provider: one fleet per
    process, so that the provider counts (and may stop) the workers `up` started before it. They
    are stopped at exit at the latest (and get SIGTERM if we die: `_die_with_parent`)."""
    global _PROCESS_FLEET
    if _PROCESS_FLEET is None:
        _PROCESS_FLEET = Fleet()
        atexit.register(_PROCESS_FLEET.stop)
    return _PROCESS_FLEET


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)  # type: ignore[arg-type]
