"""Evidence from arrays (no torch): is the representation still informative, is the label mapping permuted,
what does the training record say."""

from __future__ import annotations

import math

import numpy as np
from joblib import parallel_config
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe(features: np.ndarray, gold: np.ndarray, *, folds: int = 5, seed: int = 0,
                 threads: int = 1) -> dict | None:
    """Balanced accuracy of a class-balanced logistic regression on the model's own pooled features,
    out of fold (stratified k-fold). High while the model's own balanced accuracy is low: the head or its
    threshold collapsed and a post-hoc fix can work. Near chance too: the representation collapsed.
    ``threads``: folds fitted at once (threads in this process; each fit is deterministic, so the result is the
    same for any number)."""
    classes, counts = np.unique(gold, return_counts=True)
    usable = classes[counts >= 2]
    keep = np.isin(gold, usable)
    if len(usable) < 2:
        return None
    x, y = features[keep].astype(np.float64), gold[keep]
    n_folds = int(min(folds, np.bincount(y)[usable].min()))
    if n_folds < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, C=1.0))
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    jobs = max(1, int(threads))
    with parallel_config(backend="threading", n_jobs=jobs):
        pred = cross_val_predict(clf, x, y, cv=cv, n_jobs=jobs)
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)), "rows": int(len(y)), "folds": n_folds,
            "chance": 1.0 / len(usable)}


def representation_geometry(features: np.ndarray, *, max_rows: int = 1000) -> dict:
    """Anisotropy (mean pairwise cosine similarity) and effective rank (exp of the entropy of the normalised
    singular values of the centred features; Roy & Vetterli 2007)."""
    x = np.asarray(features[:max_rows], dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    n = len(unit)
    if n < 2:
        return {"anisotropy": None, "effective_rank": None, "dimension": int(x.shape[1]) if x.ndim == 2 else None}
    gram = unit @ unit.T
    anisotropy = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    centred = x - x.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    total = s.sum()
    if total <= 1e-12 * max(1.0, np.abs(x).max()):
        eff = 0.0
    else:
        p = s / total
        p = p[p > 0]
        eff = float(math.exp(-(p * np.log(p)).sum()))
    scale = float(np.abs(x).mean())
    feature_std = float(x.std(axis=0).mean())
    return {"anisotropy": anisotropy, "effective_rank": eff, "dimension": int(x.shape[1]),
            "feature_std": feature_std,
            # spread across rows relative to the features' size: ~0 when every input maps to one point
            "relative_spread": feature_std / scale if scale > 0 else 0.0}


def label_permutation(confusion) -> dict:
    """The assignment of predicted classes to gold classes that maximises agreement (Hungarian algorithm).

    A best assignment far from the identity means id2label does not match the data's labels."""
    cm = np.asarray(confusion, dtype=float)
    rows, cols = linear_sum_assignment(-cm)  # rows: gold, cols: predicted
    support = cm.sum(axis=1)
    present = support > 0
    identity_recall = np.divide(np.diag(cm), support, out=np.zeros_like(support), where=present)
    mapped = np.zeros_like(support)
    mapping = {}
    for g, p in zip(rows, cols):
        mapped[g] = cm[g, p] / support[g] if support[g] else 0.0
        mapping[int(p)] = int(g)
    return {
        "mapping": mapping,  # predicted id -> gold id under the best assignment
        "is_identity": all(p == g for p, g in mapping.items() if support[g] > 0),
        "identity_balanced_accuracy": float(identity_recall[present].mean()) if present.any() else 0.0,
        "mapped_balanced_accuracy": float(mapped[present].mean()) if present.any() else 0.0,
    }


def training_record(state: dict | None) -> dict | None:
    """What ``trainer_state.json``'s log_history says about the run."""
    if not state:
        return None
    history = state.get("log_history") or []
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    losses = [float(h["loss"]) for h in train]
    lrs = [float(h["learning_rate"]) for h in train if "learning_rate" in h]
    grads = [float(h["grad_norm"]) for h in train if h.get("grad_norm") is not None]
    out = {"logged_steps": len(train), "evaluations": len(evals),
           "best_model_checkpoint": state.get("best_model_checkpoint"),
           "global_step": state.get("global_step"), "max_steps": state.get("max_steps"),
           "epoch": state.get("epoch"), "num_train_epochs": state.get("num_train_epochs")}
    if losses:
        finite = [x for x in losses if math.isfinite(x)]
        first, last = losses[0], losses[-1]
        out.update({"first_loss": first, "last_loss": last, "min_loss": min(finite) if finite else None,
                    "nan_loss": len(finite) < len(losses)})
        # a spike: a logged loss more than twice the first one after the run had already improved on it
        best_so_far, spikes = math.inf, 0
        for x in losses:
            if not math.isfinite(x) or (best_so_far < first and x > 2 * first):
                spikes += 1
            best_so_far = min(best_so_far, x) if math.isfinite(x) else best_so_far
        out["loss_spikes"] = spikes
        out["diverged"] = bool(out["nan_loss"] or (finite and last > 1.5 * min(finite) and last > 0.9 * first))
    if lrs:
        out["max_learning_rate"] = max(lrs)
        # a ramp in the logged rates shows a warm-up; a first log already at the peak shows none only when it
        # is the run's first step (a warm-up shorter than the logging interval leaves no trace): else unknown
        steps = [h.get("step") for h in train if "learning_rate" in h]
        if len(lrs) > 1 and lrs[0] < 0.5 * max(lrs):
            out["warmup"] = True
        elif steps and steps[0] == 1:
            out["warmup"] = False
        else:
            out["warmup"] = None
    if grads:
        out["first_grad_norm"], out["last_grad_norm"] = grads[0], grads[-1]
        out["grad_norm_collapse"] = bool(grads[0] > 0 and grads[-1] < 1e-3 * grads[0])
    planned = state.get("max_steps")
    out["stopped_early"] = bool(planned and state.get("global_step") and state["global_step"] < planned)
    return out
