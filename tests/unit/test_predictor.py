"""Output-length predictor: bucket arithmetic, metrics, live accuracy, baselines, parsing, training."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from predictor import (
    LiveAccuracy,
    MissingOutputLength,
    bucket_of,
    bucket_range,
    default_num_buckets,
    is_heavy_bucket,
    load_predictor,
)
from predictor.data import Example, base_id, iter_records, load_jsonl, split_of
from predictor.evaluate import bucket_metrics, confusion, majority_bucket
from predictor.features import from_messages, parse_prompt

# ---- bucket arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "g", "k", "want"), [
    (0, 200, None, 0), (199, 200, None, 0), (200, 200, None, 1), (1999, 200, None, 9),
    (1999, 200, 5, 4), (800, 200, 5, 4), (799, 200, 5, 3), (-7, 100, None, 0), (450, 400, 3, 1),
])
def test_bucket_of(length: int, g: int, k: int | None, want: int) -> None:
    assert bucket_of(length, g, k) == want


def test_bucket_range_and_defaults() -> None:
    assert bucket_range(0, 200) == (0, 200)
    assert bucket_range(3, 100) == (300, 400)
    assert [default_num_buckets(g) for g in (100, 200, 400)] == [9, 5, 3]
    for g in (100, 200, 400):  # the last bucket starts at 800 tokens for every supported width
        assert bucket_range(default_num_buckets(g) - 1, g)[0] == 800
    assert not is_heavy_bucket(0, 200) and is_heavy_bucket(1, 200)
    assert not is_heavy_bucket(1, 100) and is_heavy_bucket(2, 100)  # lower end 100 is not > 128
    with pytest.raises(ValueError):
        bucket_of(10, 0)
    with pytest.raises(ValueError):
        bucket_range(-1, 200)


def test_bucket_metrics_hand_made() -> None:
    lengths = np.array([50, 450, 450, 2000, 150, 90])
    pred = np.array([0, 1, 2, 4, 0, 3])
    m = bucket_metrics(pred, lengths, 200, 5, majority=0)
    # true buckets: 0, 2, 2, 4, 0, 0 -> hits at 0, 2, 3, 4
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["within_one_bucket"] == pytest.approx(5 / 6)  # only 0 vs 3 is off by more than one
    assert m["majority_accuracy"] == pytest.approx(3 / 6)
    # heavy (> 128 tokens): 450, 450, 2000, 150; predicted heavy: buckets 1, 2, 4 but not 0
    assert m["heavy_recall"] == pytest.approx(3 / 4)
    assert m["heavy_precision"] == pytest.approx(3 / 4)  # bucket 3 for a 90-token answer is wrong
    assert confusion(pred, [0, 2, 2, 4, 0, 0], 5).tolist()[0] == [2, 0, 0, 1, 0]
    assert majority_bucket([10, 250, 260, 900, 1500], 200) == 1
    assert majority_bucket([900, 1500, 250], 200) == 4  # capped: both long answers share the last bucket


# ---- live accuracy -------------------------------------------------------------------------------


def test_live_accuracy_counts() -> None:
    live = LiveAccuracy(granularity=200)
    assert live.snapshot()["n"] == 0 and live.snapshot()["accuracy"] == 0.0
    live.record(0, 50)     # hit, light
    live.record(1, 450)    # off by one, heavy predicted heavy
    live.record(0, 300)    # off by one, heavy predicted light
    live.record(4, 100)    # far off
    live.record(None, 100)  # no prediction: ignored
    s = live.snapshot()
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(1 / 4)
    assert s["within_one_bucket"] == pytest.approx(3 / 4)
    assert s["heavy_recall"] == pytest.approx(1 / 2)
    capped = LiveAccuracy(granularity=200, num_buckets=5)
    capped.record(4, 5000)
    assert capped.snapshot()["accuracy"] == 1.0


def test_live_accuracy_thread_safe() -> None:
    live = LiveAccuracy(granularity=100)

    def work() -> None:
        for i in range(2000):
            live.record(i % 3, (i % 3) * 100 + 10)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = live.snapshot()
    assert s["n"] == 16000 and s["accuracy"] == 1.0


# ---- baselines -----------------------------------------------------------------------------------


def test_oracle_and_constant() -> None:
    oracle = load_predictor("oracle", granularity=200)
    assert oracle.granularity == 200
    assert oracle.predict_bucket("hi", meta={"output_len": 450}) == 2
    assert oracle.predict_bucket("hi", 5, {"output_len": 0}) == 0
    with pytest.raises(MissingOutputLength, match="output_len"):
        oracle.predict_bucket("hi", meta={})
    with pytest.raises(KeyError):
        oracle.predict_bucket("hi")
    assert load_predictor("constant").predict_bucket("anything") == 0
    assert load_predictor("constant", 100, bucket=3).predict_bucket("x") == 3
    with pytest.raises(ValueError, match="unknown predictor"):
        load_predictor("psychic")


# ---- data ----------------------------------------------------------------------------------------


def test_truncated_json_keeps_complete_records(tmp_path: Path) -> None:
    recs = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"q{i}"},
                                                {"from": "gpt", "value": "a" * i}]} for i in range(3)]
    text = json.dumps(recs, indent=2)
    cut = text[: text.rindex('"a') + 3]  # inside the last record
    f = tmp_path / "x.json"
    f.write_text(cut)
    assert [r["id"] for r in iter_records(f)] == ["c0_0", "c1_0"]
    f.write_text(text)
    assert len(list(iter_records(f))) == 3


def test_split_by_original_conversation() -> None:
    assert base_id("QWJhYvA_3") == "QWJhYvA" and base_id("plain") == "plain"
    ids = [f"conv{i}" for i in range(20000)]
    for i in ids[:200]:
        assert split_of(i + "_0") == split_of(i + "_7") == split_of(i)
    share = {s: sum(split_of(i) == s for i in ids) / len(ids) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.01)


def test_chatml_prompt_parses_back_to_messages() -> None:
    from predictor.tokenizer import load_default_tokenizer

    msgs = [("user", "Write a poem\nabout cats"), ("assistant", "Cats sit.\n\nOn mats."),
            ("user", "Longer, please: 3 stanzas")]
    prompt = load_default_tokenizer().apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=True)
    p = parse_prompt(prompt)
    direct = from_messages(msgs)
    assert (p.user, p.history) == (direct.user, direct.history) == (msgs[-1][1], tuple(msgs[:2]))
    assert p.system  # SmolLM2's template adds its default system prompt
    q = parse_prompt("", {"messages": [{"role": r, "content": c} for r, c in msgs]})
    assert q.user == msgs[-1][1]
    assert parse_prompt("raw completion prompt").user == "raw completion prompt"


# ---- label ---------------------------------------------------------------------------------------


def test_label_records_completion_tokens(tmp_path: Path) -> None:
    from predictor.label import label, write_jsonl

    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        seen.append(req.url.path)
        n = 7 * len(body["messages"][-1]["content"])
        return httpx.Response(200, json={"choices": [{"finish_reason": "stop"}],
                                         "usage": {"completion_tokens": n, "prompt_tokens": 3}})

    exs = [Example(f"conv{i}#1", (("user", "x" * (i + 1)),), -1) for i in range(6)]
    out = tmp_path / "labels.jsonl"
    with open(out, "w") as fh:
        ok, errors = write_jsonl(label("http://test", exs, transport=httpx.MockTransport(handler)), fh)
    assert (ok, errors) == (6, [])
    assert set(seen) == {"/v1/chat/completions"}
    rows = [e for s in load_jsonl(out).values() for e in s]
    assert sorted(e.answer_len for e in rows) == [7 * (i + 1) for i in range(6)]


# ---- training and the learned predictor ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    from predictor.data import examples_of, load_conversations
    from predictor.model import _default_counter
    from predictor.train import TrainConfig, train

    convs = load_conversations(progress=False, limit=900)
    ex: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for c in convs:
        ex[split_of(c.id)].extend(examples_of(c))
    cfg = TrainConfig(folds=2, text_epochs=6, max_iter=60, learning_rate=0.15, progress=False,
                      threads=1)
    model = train(ex["train"], ex["val"], _default_counter(), (200,), cfg)
    return model, ex


def test_small_training_beats_majority_on_its_validation_split(small_model) -> None:
    from predictor.evaluate import batch_predict
    from predictor.model import _default_counter

    model, ex = small_model
    assert len(ex["train"]) > 1500 and len(ex["val"]) > 150
    pred = batch_predict(model, ex["val"], 200, _default_counter())
    lengths = np.array([e.answer_len for e in ex["val"]])
    maj = majority_bucket([e.answer_len for e in ex["train"]], 200)
    m = bucket_metrics(pred, lengths, 200, 5, maj)
    assert m["accuracy"] > m["majority_accuracy"] + 0.05, m


def test_learned_serving_path_matches_batch_and_is_thread_safe(small_model) -> None:
    from predictor.evaluate import batch_predict, templated
    from predictor.model import LearnedPredictor, _default_counter
    from predictor.tokenizer import load_default_tokenizer

    model, ex = small_model
    sample = ex["val"][:40]
    want = batch_predict(model, sample, 200, _default_counter()).tolist()
    prompts = templated(sample, load_default_tokenizer())
    pred = LearnedPredictor(model, 200)
    assert pred.granularity == 200 and pred.num_buckets == 5
    assert [pred.predict_bucket(p) for p in prompts] == want
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = [pred.predict_bucket(p) for p in prompts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == want for r in results.values())


def test_shipped_artifact_loads() -> None:
    from predictor.registry import ARTIFACT

    if not ARTIFACT.exists():
        pytest.skip("no shipped artifact")
    for g in (100, 200, 400):
        p = load_predictor("learned", g)
        b = p.predict_bucket("<|im_start|>user\nWrite a 2000-word essay on Rome.<|im_end|>\n"
                             "<|im_start|>assistant\n")
        assert 0 <= b < default_num_buckets(g)


def test_cli_eval_json_on_labelled_file(small_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from predictor.cli import app

    model, ex = small_model
    path = tmp_path / "m.joblib"
    model.save(path)
    data = tmp_path / "labels.jsonl"
    with open(data, "w") as fh:
        for e in ex["train"][:300] + ex["val"] + ex["test"]:
            fh.write(json.dumps({"id": e.id, "completion_tokens": e.answer_len,
                                 "messages": [{"role": r, "content": c} for r, c in e.messages]}) + "\n")
    png = tmp_path / "cm.png"
    res = CliRunner().invoke(app, ["eval", "--json", "-g", "200", "--model", str(path), "--data", str(data),
                                   "--png", str(png), "--latency-n", "10"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("granularity", "n", "accuracy", "majority_accuracy", "within_one_bucket",
                "p50_latency_ms", "p99_latency_ms", "heavy_recall"):
        assert key in out
    assert out["granularity"] == 200 and out["n"] == len(ex["test"])
    assert 0.0 <= out["accuracy"] <= 1.0 and out["p50_latency_ms"] > 0
    assert png.exists() and png.stat().st_size > 1000
    # Without --plot nothing is written, in the current directory or elsewhere.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(app, ["eval", "-g", "200", "--model", str(path), "--data", str(data),
                                   "--latency-n", "10"])
    assert res.exit_code == 0, res.output
    assert list(cwd.iterdir()) == [] and "confusion matrix" not in res.output
    res = CliRunner().invoke(app, ["eval", "--json", "-g", "200", "--model", str(path), "--data", str(data),
                                   "--plot", str(cwd / "p.png"), "--latency-n", "10"])
    assert res.exit_code == 0 and (cwd / "p.png").exists()
    bad = CliRunner().invoke(app, ["eval", "-g", "100", "--model", str(path), "--data", str(data)])
    assert bad.exit_code == 2 and "granularity 100" in bad.output
