"""A first run that explains itself: where records live, and what `tetri up` does before serving."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from backends.engines.native import prepare as prep
from backends.engines.native import profile
from orchestrator.config import Settings, data_dir

TINY = "random:tiny-llama"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    for var in ("TETRI_DATA_DIR", "XDG_DATA_HOME", "TETRI_CACHE_DIR", "TETRI_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_database_is_data_not_cache(home, monkeypatch):
    assert data_dir() == home / ".local" / "share" / "tetri"
    assert Settings().database_url == f"sqlite:///{home / '.local/share/tetri/tetri.db'}"
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "xdg"))
    assert Settings().database_url == f"sqlite:///{home / 'xdg/tetri/tetri.db'}"
    monkeypatch.setenv("TETRI_DATA_DIR", str(home / "data"))
    assert Settings().database_url == f"sqlite:///{home / 'data/tetri.db'}"
    assert (home / "data").is_dir()


def test_a_database_left_in_the_cache_is_kept(home):
    legacy = home / ".cache" / "tetri" / "tetri.db"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    assert Settings().database_url == f"sqlite:///{legacy}"


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_conversion_says_what_it_does(monkeypatch, tmp_path):
    done: list[str] = []

    def convert(spec, step):
        for s in prep.CONVERT_STEPS:
            step(s)
            done.append(s)
        return tmp_path

    monkeypatch.setattr(prep, "gguf_to_convert", lambda spec: (tmp_path / "m.gguf", "m"))
    monkeypatch.setattr(prep, "convert_model", convert)
    console, buf = _console()
    prep.ensure_converted("m.gguf", console)
    out = buf.getvalue()
    assert done == list(prep.CONVERT_STEPS)
    assert "converting m.gguf" in out and "once" in out and "done" in out
    # Nothing to convert: nothing printed.
    monkeypatch.setattr(prep, "gguf_to_convert", lambda spec: None)
    console, buf = _console()
    prep.ensure_converted("m.gguf", console)
    assert buf.getvalue() == ""


def test_profiling_shows_progress_and_caches_once(monkeypatch, tmp_path):
    monkeypatch.setattr(profile, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(profile, "DEFAULT_SIZES", (16, 32))
    calls: list[tuple[int, int]] = []
    real = profile.profile_knee

    def spy(*a, progress, **k):
        return real(*a, progress=lambda done, total: (calls.append((done, total)), progress(done, total)), **k)

    monkeypatch.setattr(profile, "profile_knee", spy)
    console, buf = _console()
    prep.prepare(TINY, "cpu", "auto", console)
    out = buf.getvalue()
    assert "profiling the prefill chunk size" in out and "done" in out and "chunk size:" in out
    assert calls == [(1, 2), (2, 2)]
    assert profile.load_cached(TINY, "cpu") is not None
    console, buf = _console()
    prep.prepare(TINY, "cpu", "auto", console)
    assert buf.getvalue() == ""  # cached: a second start is silent and quick
    console, buf = _console()
    prep.prepare(TINY, "cpu", "64", console)
    assert buf.getvalue() == ""


def test_fleet_reports_each_worker_ready(tmp_path):
    from orchestrator.launcher import Fleet

    fleet = Fleet()
    ready: list[tuple[str, float]] = []
    try:
        fleet.start_worker("prefill", "x", backend="sim", chunk_size="64", log_dir=tmp_path)
        fleet.start_worker("decode", "x", backend="sim", chunk_size="64", log_dir=tmp_path)
        fleet.wait_healthy(timeout_s=120, on_ready=lambda w, s: ready.append((w.role, s)))
    finally:
        fleet.stop()
    assert sorted(r for r, _ in ready) == ["decode", "prefill"] and all(s > 0 for _, s in ready)


def test_a_worker_says_it_profiles_on_its_first_start(tmp_path, monkeypatch):
    from orchestrator.launcher import Fleet

    monkeypatch.setenv("TETRI_CACHE_DIR", str(tmp_path / "cache"))
    fleet = Fleet()
    try:
        worker = fleet.start_worker("colocated", TINY, chunk_size="auto", kv_tokens=4096, log_dir=tmp_path)
        fleet.wait_healthy(timeout_s=240)
        log = worker.log_path.read_text()
    finally:
        fleet.stop()
    assert "first run: profiling the prefill chunk size" in log and "chunk size:" in log
    assert list((tmp_path / "cache" / "profiles").glob("*tiny-llama*.json"))
