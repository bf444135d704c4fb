#!/usr/bin/env python
"""Time and peak memory of a full CLI run against the number of classes, on the same rows.

For each class count a tiny BERT (hidden 32, 2 layers) with that many labels and a CSV of short generated
texts whose labels follow a Zipf-like prior (a few large classes, a long tail) are written; then
``collapse-detect MODEL DATA --out DIR`` runs in a fresh subprocess (every output file) and its peak RSS is read
from ``os.wait4``. Prints seconds, peak RSS, the size of summary.json and the largest plot in pixels, and the
ratio of each to the smallest class count's.

Usage::

    python benchmarks/bench_classes.py                       # 3, 30 and 300 classes, 3,000 rows
    python benchmarks/bench_classes.py --classes 3 100 --rows 1000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import build_model, run_cli, write_csv  # noqa: E402


def zipf_prior(k: int, a: float = 1.1) -> list[float]:
    w = 1.0 / np.arange(1, k + 1) ** a
    return (w / w.sum()).tolist()


def _largest_png(folder: Path) -> str:
    import matplotlib.pyplot as plt

    best = (0, 0, "")
    for png in folder.glob("*.png"):
        h, w = plt.imread(png).shape[:2]
        best = max(best, (h * w, f"{w}x{h}", png.name))
    return f"{best[1]} ({best[2]})" if best[2] else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 30, 300])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--workdir", help="keep files here (default: a temporary folder, removed)")
    args = ap.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-classes-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = []
        for k in sorted(args.classes):
            labels = [f"class_{i:03d}" for i in range(k)]
            model, lexicon = build_model(root / f"model_{k}", labels=labels)
            data = root / f"eval_{k}.csv"
            write_csv(data, args.rows, lexicon, labels=labels, prior=zipf_prior(k))
            out = root / f"out_{k}"
            res = run_cli(model, data, out, [])
            res.update(classes=k, summary_mb=(out / "summary.json").stat().st_size / 2**20,
                       largest_png=_largest_png(out))
            results.append(res)
            print(f"  {k:>5} classes: {res['seconds']:6.1f} s, peak RSS {res['peak_rss_mb']:7.1f} MB", flush=True)
        base = results[0]
        print(f"\n{args.rows:,} rows each")
        print(f"{'classes':>8} {'seconds':>8} {'x fewest':>9} {'peak RSS MB':>12} {'x fewest':>9} "
              f"{'summary.json MB':>16}  largest plot")
        for r in results:
            print(f"{r['classes']:>8} {r['seconds']:>8.1f} {r['seconds'] / base['seconds']:>9.2f} "
                  f"{r['peak_rss_mb']:>12.1f} {r['peak_rss_mb'] / base['peak_rss_mb']:>9.2f} "
                  f"{r['summary_mb']:>16.2f}  {r['largest_png']}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
