#!/usr/bin/env python
"""Peak memory of a full CLI run against the number of rows: the eval file must stream.

Writes a CSV of short generated texts (3 classes), a tiny BERT (hidden 32, 2 layers) with a WordPiece tokenizer,
then runs ``collapse-detect MODEL DATA --out DIR`` in a fresh subprocess per size (all outputs, predictions.csv
included) and reads that process's peak RSS from ``os.wait4``. Prints rows, seconds, rows/s, peak RSS, the
size of predictions.csv, and the ratio of each peak RSS to the smallest size's (target at 1M vs 100k: <= 1.3).

Usage::

    python benchmarks/bench_streaming.py                      # 100k and 1M rows
    python benchmarks/bench_streaming.py --rows 10000 100000  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LABELS = ["alpha", "beta", "gamma"]
TINY = dict(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def build_model(out: Path, seed: int = 0, labels: list[str] = LABELS) -> tuple[Path, list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_probe import _lexicon, make_tokenizer
    import random

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    lexicon = _lexicon(3000, random.Random(seed))
    rng = random.Random(seed + 1)
    corpus = [" ".join(rng.choices(lexicon, k=rng.randint(3, 12))) for _ in range(5000)]
    tokenizer = make_tokenizer(corpus, vocab_size=TINY["vocab_size"], model_max_length=64)
    torch.manual_seed(seed)
    cfg = dict(TINY, vocab_size=max(TINY["vocab_size"], len(tokenizer)))
    model = BertForSequenceClassification(BertConfig(
        **cfg, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # spread the random head so predictions vary across rows and classes
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, lexicon


def write_csv(path: Path, rows: int, lexicon: list[str], seed: int = 0, block: int = 100_000,
              labels: list[str] = LABELS, prior: list[float] = (0.6, 0.2, 0.2)) -> None:
    """Short texts (4-14 words), labels drawn with ``prior`` (60/20/20), written in blocks (the writer streams
    too)."""
    rng = np.random.default_rng(seed)
    words = np.asarray(lexicon[:2000])
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for start in range(0, rows, block):
            n = min(block, rows - start)
            lengths = rng.integers(4, 15, size=n)
            picks = words[rng.integers(0, len(words), size=int(lengths.sum()))]
            cuts = np.cumsum(lengths)[:-1]
            gold = np.asarray(labels)[rng.choice(len(labels), size=n, p=prior)]
            f.writelines(f"{' '.join(t)},{lab}\n" for t, lab in zip(np.split(picks, cuts), gold))


def run_cli(model: Path, data: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "collapse_detect", str(model), str(data), "--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"collapse-detect failed ({code}): {err.strip()[-2000:]}")
    pred = out / "predictions.csv"
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "exit_code": code,
            "predictions_mb": pred.stat().st_size / 2**20 if pred.exists() else 0.0,
            "prediction_rows": _count_lines(pred) - 1 if pred.exists() else 0}


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", help="keep files here (default: a temporary folder, removed)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more collapse-detect flags")
    args = ap.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model, lexicon = build_model(root / "model")
        results = []
        for rows in sorted(args.rows):
            data = root / f"eval_{rows}.csv"
            t0 = time.perf_counter()
            write_csv(data, rows, lexicon)
            gen = time.perf_counter() - t0
            res = run_cli(model, data, root / f"out_{rows}", ["--batch-size", str(args.batch_size), *args.extra])
            res.update(rows=rows, csv_mb=data.stat().st_size / 2**20, gen_seconds=gen)
            results.append(res)
            data.unlink()
            print(f"  {rows:>9,} rows: {res['seconds']:7.1f} s, peak RSS {res['peak_rss_mb']:7.1f} MB "
                  f"(csv {res['csv_mb']:.0f} MB, predictions.csv {res['predictions_mb']:.0f} MB, "
                  f"{res['prediction_rows']:,} rows)", flush=True)
        base = results[0]
        print()
        print(f"{'rows':>10} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12} {'x smallest':>11} {'csv MB':>7}")
        for r in results:
            print(f"{r['rows']:>10,} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>8.0f} {r['peak_rss_mb']:>12.1f} "
                  f"{r['peak_rss_mb'] / base['peak_rss_mb']:>11.3f} {r['csv_mb']:>7.1f}")
        ratio = results[-1]["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"\npeak RSS at {results[-1]['rows']:,} rows / at {base['rows']:,} rows = {ratio:.3f} "
              f"(target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'})")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
