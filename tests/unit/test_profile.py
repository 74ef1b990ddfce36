"""The saturation-knee profiler (backends/engines/native/profile.py), chunk_size="auto" and `tetri profile`
(backends/engines/native/prepare.py)."""

from __future__ import annotations

import json

import pytest

from backends.engines.native import prepare, profile
from backends.engines.native.engine import NativeEngine

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
    result = profile.profile_knee(tiny, [16, 32, 64, 128], rounds=2)
    sizes = [n for n, _ in result.curve]
    assert sizes[0] == 16 and sizes == sorted(sizes) and set(sizes) <= {16, 32, 64, 128}
    assert all(tps > 0 for _, tps in result.curve)
    assert result.knee in sizes and result.repeats == profile.REPEATS
    if result.knee_found and result.fit:  # a measured knee: the fitted curve is near its asymptote there
        fit = result.fit
        assert profile.saturation(result.knee, fit["a"], fit["k"], fit["n"]) >= 0.949 * fit["a"]
    else:
        assert result.knee == max(sizes)
    assert tiny.pool.free_tokens == tiny.pool.total_tokens  # the sweep gives its blocks back
    path = profile.profile_path(TINY, "cpu")
    assert path.parent == tmp_cache / "profiles" and path.exists()
    cached = profile.load_cached(TINY, "cpu")
    assert cached is not None and cached.knee == result.knee and cached.curve == result.curve


def test_auto_chunk_size_uses_the_cached_knee(tmp_cache, monkeypatch):
    assert profile.resolve_chunk_size(96, TINY) == 96
    with pytest.raises(LookupError):  # nothing cached and no engine to profile
        profile.resolve_chunk_size("auto", "nothing-cached", "cpu")
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
    prepare.profile_command(model=TINY, device="cpu", json_out=out, sizes="16,32")
    printed = capsys.readouterr().out
    assert "knee" in printed and "tokens/s" in printed
    data = json.loads(out.read_text())
    assert data["knee"] in (16, 32) and len(data["curve"]) == 2
    prepare.profile_command(model=TINY, device="cpu", json_out=True, sizes="16")
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["knee"] == 16


# ---- the knee from synthetic curves: a fit, not an arg-max -------------------------------------

SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)


def test_fit_finds_the_knee_of_a_saturating_curve():
    # A fixed 50 ms per pass plus 1 ms per token: 95% of 1,000 tokens/s is reached at 950 tokens.
    fit = profile.fit_knee([(t, 1000 * t / (t + 50)) for t in SIZES])
    assert fit.found and fit.knee == 1024 and fit.a == pytest.approx(1000, rel=1e-3)
    # A sharp (roofline) knee at 160 tokens: the first swept size past it.
    fit = profile.fit_knee([(t, min(5.0 * t, 800.0)) for t in SIZES])
    assert fit.found and fit.knee == 256


def test_no_knee_within_range_is_said_not_hidden():
    curve = [(t, 10.0 * t) for t in SIZES[:5]]  # still linear at the end of the sweep
    assert profile.find_knee(curve) == 256  # the arg-max rule calls the last point a knee
    fit = profile.fit_knee(curve)
    assert not fit.found and fit.knee == 256
    result = profile.ProfileResult(model="m", device="d", curve=curve, knee=fit.knee, knee_found=fit.found)
    assert any("no knee within range" in w for w in result.warnings())


def test_a_noisy_non_monotonic_curve_does_not_fool_the_fit():
    import numpy as np

    rng = np.random.default_rng(0)
    curve = [(t, 400 * t / (t + 8) * (1 + 0.04 * rng.standard_normal())) for t in SIZES]
    curve[-1] = (2048, 460.0)  # one lucky pass at the end
    assert profile.find_knee(curve) == 2048  # the arg-max rule follows the outlier
    fit = profile.fit_knee(curve)
    assert fit.found and fit.knee == 256  # the true knee (95% of 400 at 152 tokens), swept at 256
    # A curve that peaks and falls (cache effects past the knee): still the rising edge's end.
    fit = profile.fit_knee([(16, 100.0), (32, 200.0), (64, 390.0), (128, 400.0), (256, 330.0), (512, 300.0)])
    assert fit.found and fit.knee == 64


class _FakeEngine:
    """What profile_knee needs of an engine, with pass times from a formula (no model runs)."""

    model_name = "synthetic"
    max_context = 2048

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.pool = type("Pool", (), {"total_tokens": 1 << 20})()


def _timed(monkeypatch, seconds):
    calls = {"n": 0}

    def pass_seconds(engine, tokens, gen):
        calls["n"] += 1
        return seconds(tokens, calls["n"])

    monkeypatch.setattr(profile, "_prefill_pass_seconds", pass_seconds)
    monkeypatch.setattr(profile, "MIN_SECONDS", {"cpu": 0.0})
    return calls


def test_profile_takes_the_median_of_repeated_passes(monkeypatch, tmp_cache):
    # 50 ms + 1 ms per token, and every 4th pass ten times slower (another process took the CPU).
    _timed(monkeypatch, lambda t, i: (0.05 + t / 1000) * (10 if i % 4 == 0 else 1))
    monkeypatch.setattr(profile, "_loadavg", lambda: 0.1)
    result = profile.profile_knee(_FakeEngine(), SIZES, early_stop=False, save=False)
    for t, tps in result.curve:
        assert tps == pytest.approx(1000 * t / (t + 50), rel=1e-6)
    assert result.knee_found and result.knee == 1024 and result.repeats == profile.REPEATS
    assert result.loadavg == 0.1 and not result.high_load and result.warnings() == []


def test_the_load_average_is_recorded_and_a_busy_machine_flagged(monkeypatch, tmp_cache):
    _timed(monkeypatch, lambda t, i: 0.05 + t / 1000)
    monkeypatch.setattr(profile, "_loadavg", lambda: 64.0)
    result = profile.profile_knee(_FakeEngine(), SIZES[:3], save=True)
    assert result.high_load and any("profiled under load" in w for w in result.warnings())
    cached = profile.load_cached("synthetic", "cpu")
    assert cached is not None and cached.loadavg == 64.0 and cached.high_load


def test_old_cached_profiles_still_load(tmp_cache):
    path = profile.profile_path(TINY, "cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": TINY, "device": "x", "curve": [[16, 1.0], [32, 2.0]], "knee": 32}))
    cached = profile.load_cached(TINY, "cpu")
    assert cached is not None and cached.knee == 32 and cached.knee_found and cached.loadavg is None


def test_profile_check_says_whether_the_cached_knee_holds(monkeypatch, tmp_cache):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    profile.save_cached(profile.ProfileResult(model=TINY, device="x", curve=[(t, 0.0) for t in (16, 32, 64, 128)],
                                              knee=64))
    monkeypatch.setattr(profile, "_loadavg", lambda: 0.0)
    # The machine as it was: 0.5 ms per pass + 0.1 ms per token, 95% of the peak at 95 tokens -> knee 128,
    # one doubling from the cached 64: it holds.
    _timed(monkeypatch, lambda t, i: 0.0005 + t / 10000)
    runner = CliRunner()
    ok = runner.invoke(app, ["profile", "--check", "--model", TINY], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "holds" in ok.output
    assert profile.load_cached(TINY, "cpu").knee == 64  # --check caches nothing
    # The per-pass cost grew 100x (say, a slower device): no knee within 16..128 any more.
    _timed(monkeypatch, lambda t, i: 0.05 + t / 100000)
    changed = runner.invoke(app, ["profile", "--check", "--model", TINY], env={"COLUMNS": "200"})
    assert changed.exit_code == 1 and "no knee within range" in changed.output
    profile.profile_path(TINY, "cpu").unlink()
    missing = runner.invoke(app, ["profile", "--check", "--model", TINY])
    assert missing.exit_code == 2 and "no cached profile" in missing.output
