"""The saturation-knee profiler (backends/native/profile.py) and chunk_size="auto"."""

from __future__ import annotations

import json

import pytest

from backends.native import profile
from backends.native.engine import NativeEngine

TINY = "random:tiny-llama"


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "cache_dir", lambda: tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny() -> NativeEngine:
    return NativeEngine(TINY, chunk_size=64, kv_tokens=4096)


def test_find_knee_is_smallest_size_within_5_percent_of_peak():
    curve = [(16, 100.0), (32, 180.0), (64, 380.0), (128, 396.0), (256, 400.0), (512, 390.0)]
    assert profile.find_knee(curve) == 64
    assert profile.find_knee([(16, 10.0), (32, 9.0)]) == 16
    assert profile.find_knee([(16, 1.0), (32, 2.0), (64, 3.0)]) == 64


def test_profile_knee_sweeps_and_caches(tiny, tmp_cache):
    result = profile.profile_knee(TINY, "cpu", sizes=[16, 32, 64, 128], engine=tiny, rounds=2)
    sizes = [n for n, _ in result.curve]
    assert sizes[0] == 16 and sizes == sorted(sizes) and set(sizes) <= {16, 32, 64, 128}
    assert all(tps > 0 for _, tps in result.curve)
    assert result.knee in sizes
    peak = max(t for _, t in result.curve)
    assert dict(result.curve)[result.knee] >= 0.95 * peak
    assert tiny.pool.free_tokens == tiny.pool.total_tokens  # the sweep gives its blocks back
    path = profile.profile_path(TINY, "cpu")
    assert path.parent == tmp_cache / "profiles" and path.exists()
    cached = profile.load_cached(TINY, "cpu")
    assert cached is not None and cached.knee == result.knee and cached.curve == result.curve


def test_auto_chunk_size_uses_the_cached_knee(tmp_cache, monkeypatch):
    assert profile.resolve_chunk_size(96, TINY) == 96
    profile.save_cached(profile.ProfileResult(model=TINY, device="x", curve=[(48, 1.0)], knee=48))

    def no_profiling(*a, **k):
        raise AssertionError("must not profile when a knee is cached")

    monkeypatch.setattr(profile, "profile_knee", no_profiling)
    assert profile.resolve_chunk_size("auto", TINY, "cpu") == 48
    eng = NativeEngine(TINY, chunk_size="auto", kv_tokens=1024)
    assert eng.chunk_size == 48 and eng.load().chunk_size == 48


def test_auto_chunk_size_profiles_once_when_nothing_is_cached(tmp_cache, monkeypatch):
    monkeypatch.setattr(profile, "DEFAULT_SIZES", (16, 32))
    eng = NativeEngine(TINY, chunk_size="auto", kv_tokens=1024)
    assert eng.chunk_size in (16, 32)
    assert profile.load_cached(TINY, "cpu").knee == eng.chunk_size


def test_decode_throughput(tiny):
    rows = profile.decode_throughput(tiny, batch_sizes=(1, 4), context=20, steps=2)
    assert [b for b, *_ in rows] == [1, 4]
    assert all(tps > 0 and 0 < ms <= med for _, tps, ms, med in rows)
    assert not tiny.has_work() and tiny.pool.free_tokens == tiny.pool.total_tokens


def test_profile_command_prints_curve_and_knee(tmp_cache, tmp_path, capsys):
    out = tmp_path / "knee.json"
    profile.profile_command(model=TINY, device="cpu", json_out=out, sizes="16,32")
    printed = capsys.readouterr().out
    assert "knee" in printed and "tokens/s" in printed
    data = json.loads(out.read_text())
    assert data["knee"] in (16, 32) and len(data["curve"]) == 2
    profile.profile_command(model=TINY, device="cpu", json_out=True, sizes="16")
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["knee"] == 16
