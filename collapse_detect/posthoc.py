"""Post-hoc fixes that need no retraining, measured before they are suggested.

Each method learns additive offsets to the logits on the training folds of a stratified k-fold split of the
eval rows and is scored on the held-out fold; the pooled out-of-fold predictions give before/after recall,
balanced accuracy and macro F1 with bootstrap confidence intervals.

- logit adjustment (Menon et al., ICLR 2021): offsets = -tau * log(prior), tau chosen on the training folds;
- per-class bias tuning: coordinate ascent on balanced accuracy over the decision boundaries;
- EM prior correction (Saerens et al., 2002): re-estimate the class prior from the model's posteriors.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .stats import top_two

TAU_GRID = np.round(np.arange(0.0, 5.01, 0.1), 2)


def _balanced_accuracy(gold, pred, labels) -> float:
    """Mean recall over ``labels`` (what _scores gives, without the confusion matrix: it runs per candidate)."""
    k = max(labels) + 1
    tp = np.bincount(gold[gold == pred], minlength=k)[labels].astype(float)
    support = np.bincount(gold, minlength=k)[labels].astype(float)
    return float(np.divide(tp, support, out=np.zeros_like(tp), where=support > 0).mean())


def fit_logit_adjustment(logits, gold, log_prior, labels) -> np.ndarray:
    best_tau, best = 0.0, -1.0
    for tau in TAU_GRID:
        score = _balanced_accuracy(gold, (logits - tau * log_prior).argmax(1), labels)
        if score > best + 1e-12:
            best_tau, best = tau, score
    return -best_tau * log_prior


def fit_bias_tuning(logits, gold, labels, *, rounds: int = 3, candidates: int = 64) -> np.ndarray:
    """Coordinate ascent on balanced accuracy: per class, the best of ``candidates`` offsets (quantiles of the
    margins at which rows flip), taken in order and kept when it improves by more than 1e-12.

    Moving class c's offset only moves rows between c and their best other class, so every candidate's
    balanced accuracy comes from one matrix product: rows x candidates decisions (argmax's tie order kept)
    against each row's gain (gold c, now right) or loss (gold = its other class, now wrong)."""
    k = logits.shape[1]
    support = np.bincount(gold, minlength=k).astype(float)
    weight = np.zeros(len(support))
    weight[labels] = np.divide(1.0, support[labels], out=np.zeros(len(labels)), where=support[labels] > 0)
    row_weight = weight[gold] / len(labels)  # a row's share of the balanced accuracy when it is right
    offsets = np.zeros(k)
    adjusted = logits.copy()  # logits + offsets
    top = None  # each row's best and second-best class under ``adjusted`` (first index on ties, as argmax)
    best = _balanced_accuracy(gold, logits.argmax(1), labels)
    for _ in range(rounds):
        improved = False
        for c in range(k):
            if top is None:
                top = top_two(adjusted)[:4]
            first, first_value, second, second_value = top
            is_c = first == c
            rival = np.where(is_c, second, first)  # the best other class of each row
            others = np.where(is_c, second_value, first_value)
            # the offsets at which a row's decision flips to or from class c
            gap = others - logits[:, c]
            grid = np.unique(np.quantile(gap, np.linspace(0, 1, candidates))) + 1e-6
            score_c = logits[:, c][:, None] + grid[None, :]  # rows x candidates, as logits + trial
            to_c = (score_c > others[:, None]) | ((score_c == others[:, None]) & (c < rival)[:, None])
            gain = np.where(gold == c, row_weight, 0.0)
            loss = np.where(gold == rival, row_weight, 0.0)
            scores = loss.sum() + (gain - loss) @ to_c
            moved = False
            for value, score in zip(grid, scores):
                if score > best + 1e-12:
                    best, moved, improved = float(score), True, True
                    offsets[c] = value
            if moved:
                adjusted[:, c] = logits[:, c] + offsets[c]
                top = None
        if not improved:
            break
    return offsets - offsets.mean()


def em_prior(probs, train_prior, *, iterations: int = 200, tol: float = 1e-8) -> np.ndarray:
    """Saerens et al.: the eval prior that makes the re-weighted posteriors self-consistent."""
    train_prior = np.clip(np.asarray(train_prior, float), 1e-12, None)
    prior = train_prior.copy()
    for _ in range(iterations):
        w = probs * (prior / train_prior)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            prior = new
            break
        prior = new
    return prior


def fit_em(logits, train_prior) -> np.ndarray:
    probs = _softmax(logits)
    prior = em_prior(probs, train_prior)
    return np.log(np.clip(prior, 1e-12, None)) - np.log(np.clip(train_prior, 1e-12, None))


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _scores(gold, pred, labels) -> tuple[np.ndarray, float, float]:
    """Recall per label, balanced accuracy and macro F1 from a confusion matrix (fast enough to bootstrap)."""
    k = max(max(labels), int(pred.max()) if len(pred) else 0) + 1
    cm = np.bincount(gold * k + pred, minlength=k * k).reshape(k, k)[np.ix_(labels, range(k))]
    tp = cm[np.arange(len(labels)), labels].astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = np.bincount(pred, minlength=k)[labels].astype(float)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    return recall, float(recall.mean()), float(f1.mean())


def _summary(gold, pred, labels, rng, n_boot) -> dict:
    recall, ba, mf1 = _scores(gold, pred, labels)
    n = len(gold)
    boots = np.array([_scores(gold[idx], pred[idx], labels)[1:] for idx in
                      (rng.integers(0, n, n) for _ in range(n_boot))]) if n_boot else np.empty((0, 2))
    return {"recall": recall.tolist(), "balanced_accuracy": ba, "macro_f1": mf1,
            "balanced_accuracy_ci": np.percentile(boots[:, 0], [2.5, 97.5]).tolist() if n_boot else None,
            "macro_f1_ci": np.percentile(boots[:, 1], [2.5, 97.5]).tolist() if n_boot else None}


def evaluate_posthoc(logits, gold, *, train_prior=None, prior_source: str = "", folds: int = 5,
                     seed: int = 0, n_boot: int = 500) -> dict | None:
    """Cross-validated comparison of the post-hoc methods on the eval rows."""
    logits = np.asarray(logits, dtype=np.float64)
    gold = np.asarray(gold)
    k = logits.shape[1]
    labels = sorted(set(gold.tolist()))
    counts = np.bincount(gold, minlength=k)
    n_folds = int(min(folds, counts[labels].min()))
    if len(labels) < 2 or n_folds < 2:
        return None
    known_prior = train_prior is not None
    if train_prior is None:
        # the model's own average posterior: what it learnt the prior to be
        train_prior = _softmax(logits).mean(axis=0)
        prior_source = prior_source or "the model's mean predicted probability on the eval rows"
    train_prior = np.clip(np.asarray(train_prior, float), 1e-6, None)
    train_prior /= train_prior.sum()
    log_prior = np.log(train_prior)
    methods = {
        "logit_adjustment": lambda z, y: fit_logit_adjustment(z, y, log_prior, labels),
        "bias_tuning": lambda z, y: fit_bias_tuning(z, y, labels),
    }
    if known_prior:
        # with the model's own mean posterior as the training prior, EM stops where it starts: it needs the
        # real training prior
        methods["em_prior"] = lambda z, y: fit_em(z, train_prior)
    oof = {name: np.empty(len(gold), dtype=np.int64) for name in methods}
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    present = np.isin(gold, labels)
    for train_idx, test_idx in cv.split(logits, gold):
        for name, fit in methods.items():
            offsets = fit(logits[train_idx], gold[train_idx])
            oof[name][test_idx] = (logits[test_idx] + offsets).argmax(1)
    before = _summary(gold[present], logits[present].argmax(1), labels, np.random.default_rng(seed), n_boot)
    results = {name: _summary(gold[present], pred[present], labels, np.random.default_rng(seed), n_boot)
               for name, pred in oof.items()}
    best = max(results, key=lambda m: (results[m]["balanced_accuracy"], results[m]["macro_f1"]))
    final_offsets = methods[best](logits, gold)
    return {
        "rows": int(len(gold)), "folds": n_folds, "labels": labels, "prior_source": prior_source,
        "train_prior": train_prior.tolist(), "before": before, "methods": results, "best": best,
        "offsets": final_offsets.tolist(),
        "gain": results[best]["balanced_accuracy"] - before["balanced_accuracy"],
        "caveat": "Offsets were chosen and scored on folds of the eval set; confirm them on a separate "
                  "validation set before shipping.",
    }
