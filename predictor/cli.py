"""``tetri predictor train | eval | label``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from predictor.buckets import default_num_buckets

app = typer.Typer(help="Output-length predictor: train, eval, label.", no_args_is_help=True)

DEFAULT_OUT = Path.home() / ".cache" / "tetri" / "predictor" / "learned.joblib"


def _examples(data: Path | None, splits: tuple[str, ...]) -> dict:
    from predictor.data import load_examples, load_jsonl

    if data is not None:
        return load_jsonl(data)
    return load_examples(splits)


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    data: Annotated[Path | None, typer.Option(help="JSONL from `label` (default: ShareGPT labels)")] = None,
    out: Annotated[Path, typer.Option(help="where to write the model")] = DEFAULT_OUT,
    granularity: Annotated[list[int] | None, typer.Option("--granularity", "-g",
                                                          help="bucket widths to train (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="use at most this many training examples (0 = all)")] = 0,
    threads: Annotated[int | None, typer.Option(help="OpenMP threads for boosting (default: all)")] = None,
    neighbours: Annotated[bool, typer.Option(help="add nearest-neighbour answer-length features (+8 MB; "
                                             "see docs/predictor.md)")] = False,
) -> None:
    """Train the stacked model on the train split (validation split for early stopping)."""
    from predictor.model import _default_counter
    from predictor.train import GRANULARITIES, TrainConfig
    from predictor.train import train as fit

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gs = tuple(granularity or GRANULARITIES)
    for g in gs:
        default_num_buckets(g)
    ex = _examples(data, ("train", "val"))
    tr = ex["train"][:limit] if limit else ex["train"]
    if not tr:
        _err("no training examples")
    model = fit(tr, ex["val"], _default_counter(), gs, TrainConfig(threads=threads, neighbours=neighbours))
    model.save(out)
    size = out.stat().st_size / 1e6
    typer.echo(f"trained on {len(tr)} examples in {model.info['train_s']} s; wrote {out} ({size:.1f} MB)")
    typer.echo(f"serve it with TETRI_PREDICTOR_ARTIFACT={out}")


@app.command("eval")
def evaluate(
    granularity: Annotated[int, typer.Option("--granularity", "-g")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    model: Annotated[Path | None, typer.Option(help="model file (default: the shipped one)")] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL from `label` (default: ShareGPT test split)")] = None,
    png: Annotated[Path | None, typer.Option("--plot", "--png", help="write the confusion matrix as a PNG here "
                                             "(none is written without it)")] = None,
    latency_n: Annotated[int, typer.Option(help="prompts timed one at a time")] = 300,
) -> None:
    """Accuracy, majority baseline, within-one-bucket, heavy recall and latency on the test split."""
    import numpy as np

    from predictor import evaluate as ev
    from predictor.model import LearnedPredictor, _default_counter
    from predictor.registry import artifact_path, load_model
    from predictor.tokenizer import load_default_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model or artifact_path()
    try:
        stacked = load_model(path)
    except FileNotFoundError as exc:
        _err(str(exc))
    if granularity not in stacked.heads:
        _err(f"model has no head for granularity {granularity}; it has {stacked.granularities}")
    ex = _examples(data, ("train", "test"))
    test = ex["test"]
    if not test:
        _err("empty test split")
    k = default_num_buckets(granularity)
    count = _default_counter()
    t0 = time.time()
    pred = ev.batch_predict(stacked, test, granularity, count)
    lengths = np.array([e.answer_len for e in test])
    majority = ev.majority_bucket([e.answer_len for e in ex["train"]] or list(lengths), granularity, k)
    result = ev.bucket_metrics(pred, lengths, granularity, k, majority)
    predictor = LearnedPredictor(stacked, granularity, count)
    sample = test[:: max(1, len(test) // latency_n)][:latency_n]
    prompts = ev.templated(sample, load_default_tokenizer())
    result.update(ev.single_prompt_latency(predictor, prompts))
    true = np.array([min(n // granularity, k - 1) for n in lengths])
    # Files only where the operator asked for them: an eval must not litter the current directory.
    if png is not None:
        ev.plot_confusion(ev.confusion(pred, true, k), granularity, png,
                          f"g={granularity}: accuracy {result['accuracy']:.3f} "
                          f"(majority {result['majority_accuracy']:.3f}), n={len(test)}")
        result["confusion_png"] = str(png)
    result["model"] = str(path)
    result["eval_s"] = round(time.time() - t0, 1)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"predictor on the held-out test split (g={granularity}, {k} buckets)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, val in result.items():
        table.add_row(key, f"{val:.4f}" if isinstance(val, float) else str(val))
    Console().print(table)
    if png is not None:
        typer.echo(f"confusion matrix: {png}")


@app.command()
def label(
    url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000")],
    n: Annotated[int, typer.Option(help="prompts to send")] = 200,
    out: Annotated[Path, typer.Option(help="JSONL output (appended)")] = Path("predictor_labels.jsonl"),
    model: Annotated[str, typer.Option(help="model name sent in the request")] = "default",
    max_tokens: Annotated[int, typer.Option()] = 1024,
    temperature: Annotated[float, typer.Option()] = 0.7,
    concurrency: Annotated[int, typer.Option()] = 4,
) -> None:
    """Record a deployment's own answer lengths for ShareGPT prompts (train on them with --data)."""
    from predictor.data import load_examples
    from predictor.label import label as run
    from predictor.label import pick, write_jsonl
    from predictor.progress import bar

    ex = load_examples(progress=True)
    chosen = pick([e for s in ("train", "val", "test") for e in ex[s]], n)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh, bar(f"labelling via {url}", total=len(chosen)) as advance:
        ok, errors = write_jsonl(run(url, chosen, model=model, max_tokens=max_tokens, temperature=temperature,
                                     concurrency=concurrency, on_done=advance), fh)
    typer.echo(f"wrote {ok} rows to {out}; {len(errors)} failed")
    if errors:
        typer.echo(f"first error: {errors[0]}", err=True)
        if ok == 0:
            raise typer.Exit(1)


if __name__ == "__main__":
    app()
