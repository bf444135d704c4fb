"""Test helpers: statistics from synthetic logits, without a model."""

from __future__ import annotations

import numpy as np

from collapse_detect.stats import Accumulator, compute_stats


def logits_for(pred: np.ndarray, k: int, margin: float = 4.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Logits whose argmax is always ``pred``; ``noise`` adds input-dependent variation of the scores."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, noise, size=(len(pred), k)) if noise else np.zeros((len(pred), k))
    rows = np.arange(len(pred))
    z[rows, pred] = z.max(axis=1) + margin * (1.0 + (rng.random(len(pred)) if noise else 0.0))
    return z


def stats_for(gold, pred, k: int, names=None, margin: float = 4.0, noise: float = 0.5, seed: int = 0, **extra):
    gold = np.asarray(gold)
    pred = np.asarray(pred)
    names = names or [f"c{i}" for i in range(k)]
    acc = Accumulator(names)
    acc.update(np.arange(len(gold)), gold, logits_for(pred, k, margin, noise, seed))
    stats = compute_stats(acc)
    stats["model"] = extra.get("model", {})
    return stats
