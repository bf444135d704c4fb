"""Judge predictions made elsewhere (scikit-learn, ONNX, a served model, an earlier run) without loading a model.

The file (CSV, TSV, JSONL or Parquet) holds a gold label column and either one probability column per class,
``prob_<class>`` (the layout of the predictions.csv collapse-detect writes), or a predicted-label column. The rows
feed the same ``stats.Accumulator`` a model run feeds, with logits = log(probabilities) (softmax gives the
probabilities back), so the statistics, checks and report are the same. With predicted labels only, the
"probabilities" are one-hot: the count-based statistics are exact, the score-based ones (ROC-AUC, confidence,
calibration, score spread) are marked as not available and the checks that need them are not run.

Nothing here imports torch.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import LabelMapper, check_label_names, first_frame, integer_label, iter_frames, row_id_text
from .errors import InputError
from .stats import Accumulator, compute_stats

PROB_PREFIX = "prob_"
GOLD_COLUMN_NAMES = ("gold", "label", "labels", "y_true", "true_label", "target", "class", "category", "y")
PRED_COLUMN_NAMES = ("predicted", "prediction", "pred", "predicted_label", "y_pred", "predicted_class")
PROB_FLOOR = 1e-12  # log(0) would make the logits -inf; 1e-12 is far below any probability that matters
SUM_TOLERANCE = 0.01  # a row may sum to 1 +- max(this, 0.005 per class): probabilities rounded to 2 decimals

MODEL_ONLY_PARTS = {
    "gradient_norms": "needs the model's weights",
    "tokenizer": "needs the tokenizer (truncation and unknown-token rates)",
    "null_input_probes": "needs the model (outputs on empty and shuffled inputs)",
    "representation": "needs the model's pooled features (linear probe, geometry)",
}


@dataclass
class PredictionColumns:
    gold: str
    class_names: list[str]
    probs: list[str] | None = None     # one per class, in class order
    predicted: str | None = None


def _listed(columns) -> str:
    columns = [str(c) for c in columns]
    return ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")


def _pick(columns: list[str], wanted: str | None, names, flag: str, path, exclude=()) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{str(path)!r} has no column {wanted!r} ({flag}); its columns are: {_listed(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns if c not in exclude}
    return next((lower[n] for n in names if n in lower), None)


def _label_text(value) -> str:
    """A label as text, an id in one spelling ('1', 1, 1.0 and '1.0' are all '1')."""
    number = integer_label(value)
    return str(number) if number is not None else str(value).strip()


def _natural_classes(texts: set[str]) -> list[str]:
    """Class names for labels-only files, from the labels as ``_label_text`` spells them: integer ids in numeric
    order (0..max, so a never-seen id still counts as a class), otherwise the names sorted."""
    ids = [integer_label(t) for t in texts]
    if texts and all(i is not None for i in ids):
        ids = sorted(ids)
        if ids[0] < 0:
            raise InputError(f"labels must be class names or ids >= 0, got {ids[0]}")
        return [str(i) for i in range(ids[-1] + 1)]
    return sorted(texts)


def detect_prediction_columns(path, first: pd.DataFrame, *, label_col=None, pred_col=None,
                              label_names=None) -> PredictionColumns:
    if label_names:
        label_names = check_label_names(label_names, "--label-names")
    columns = [str(c) for c in first.columns]
    probs = [c for c in columns if c.startswith(PROB_PREFIX) and len(c) > len(PROB_PREFIX)]
    pred = _pick(columns, pred_col, PRED_COLUMN_NAMES, "--pred-col", path)
    gold = _pick(columns, label_col, GOLD_COLUMN_NAMES, "--label-col", path, exclude={pred, *probs})
    if gold is None:
        raise InputError(f"{str(path)!r}: no gold label column found (looked for {', '.join(GOLD_COLUMN_NAMES[:5])}, "
                         f"...); its columns are: {_listed(columns)}; pass --label-col")
    if probs:
        names = [c[len(PROB_PREFIX):] for c in probs]
        if label_names:
            if len(label_names) != len(names):
                raise InputError(f"--label-names gives {len(label_names)} names but {str(path)!r} has "
                                 f"{len(names)} {PROB_PREFIX}<class> columns ({_listed(probs)})")
            names = list(label_names)
        if len(names) < 2:
            raise InputError(f"{str(path)!r} has one probability column ({probs[0]}); write one {PROB_PREFIX}<class> "
                             "column per class (for a binary model both, p and 1 - p)")
        return PredictionColumns(gold, names, probs=probs, predicted=pred)
    if pred is None:
        raise InputError(f"{str(path)!r} has neither {PROB_PREFIX}<class> probability columns nor a predicted-label "
                         f"column (looked for {', '.join(PRED_COLUMN_NAMES[:4])}, ...); its columns are: "
                         f"{_listed(columns)}; pass --pred-col")
    if label_names:
        return PredictionColumns(gold, list(label_names), predicted=pred)
    seen: dict[str, set] = {gold: set(), pred: set()}
    for frame in iter_frames(path, what="predictions file"):  # two small columns: a first pass finds the classes
        for column in (gold, pred):
            seen[column].update(_label_text(v) for v in frame[column].dropna().tolist())
    if seen[gold] and seen[pred] and not seen[gold] & seen[pred]:
        raise InputError(f"{str(path)!r}: the gold labels ({_listed(sorted(seen[gold]))}) and the predicted labels "
                         f"({_listed(sorted(seen[pred]))}) share no value, so no row could be right; write both "
                         "columns with the same class names, or pass --label-names to name the ids in class order")
    names = _natural_classes(seen[gold] | seen[pred])
    if len(names) < 2:
        only = names[0] if names else "none"
        raise InputError(f"{str(path)!r}: the gold and predicted labels hold one class only ({only}); "
                         "pass --label-names to name every class the model has")
    return PredictionColumns(gold, names, predicted=pred)


def _probabilities(frame: pd.DataFrame, columns: PredictionColumns, path, row_ids: np.ndarray) -> np.ndarray:
    try:
        probs = frame[columns.probs].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{str(path)!r}: the {PROB_PREFIX}<class> columns must hold numbers "
                         f"({str(exc).splitlines()[0][:120]})") from None
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise InputError(f"{str(path)!r}: missing or non-finite probability at "
                         f"{row_id_text(row_ids[bad].tolist())}")
    outside = ((probs < -1e-6) | (probs > 1 + 1e-6)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        j = int(np.flatnonzero((probs[i] < -1e-6) | (probs[i] > 1 + 1e-6))[0])
        raise InputError(f"{str(path)!r}: {columns.probs[j]} = {probs[i, j]:.6g} at {row_id_text([row_ids[i]])} "
                         "is not a probability in [0, 1]; if these are logits, apply softmax first")
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > max(SUM_TOLERANCE, 0.005 * probs.shape[1]) + 1e-9
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise InputError(f"{str(path)!r}: the probabilities at {row_id_text([row_ids[i]])} sum to "
                         f"{sums[i]:.4g}, not 1; write one {PROB_PREFIX}<class> column for every class, each row a "
                         "distribution")
    return probs


def read_predictions(path, *, label_col=None, pred_col=None, label_names=None, seed: int = 0,
                     chunk_rows: int = 8192) -> tuple[Accumulator, PredictionColumns, int]:
    """Stream the file into an accumulator; returns it, the columns used and the row count."""
    first, frames = first_frame(path, chunk_rows, "predictions file")
    columns = detect_prediction_columns(path, first, label_col=label_col, pred_col=pred_col, label_names=label_names)
    acc = Accumulator(columns.class_names, seed=seed)
    gold_map = LabelMapper(columns.class_names, path, columns.gold)
    pred_map = LabelMapper(columns.class_names, path, columns.predicted) if columns.predicted else None
    start = 0
    frame = first
    while frame is not None:
        n = len(frame)
        row_ids = np.arange(start, start + n, dtype=np.int64)
        for needed in [columns.gold, *(columns.probs or [columns.predicted])]:
            if needed not in frame.columns:
                raise InputError(f"{str(path)!r}: column {needed!r} is missing at {row_id_text([start])} "
                                 "and after")
        gold = gold_map(frame[columns.gold], row_ids)
        if columns.probs:
            probs = _probabilities(frame, columns, path, row_ids)
        else:
            probs = np.zeros((n, len(columns.class_names)))
            probs[np.arange(n), pred_map(frame[columns.predicted], row_ids)] = 1.0
        acc.update(row_ids, gold, np.log(np.clip(probs, PROB_FLOOR, None)))
        start += n
        frame = next(frames, None)
    return acc, columns, start


def _versions() -> dict:
    import scipy
    import sklearn

    from . import __version__

    return {"collapse_detect": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit_learn": sklearn.__version__, "pandas": pd.__version__, "python": platform.python_version()}


def mark_scores_unavailable(stats: dict, reason: str) -> None:
    """With predicted labels only, every score-based number would describe the one-hot stand-in: set them to
    None (shown as n/a) and say why."""
    stats["scores_available"] = False
    stats["scores_unavailable_reason"] = reason
    for key in ("macro_roc_auc", "score_spread", "mean_nll"):
        stats[key] = None
    for c in stats["per_class"]:
        for key in ("roc_auc", "mean_confidence", "mean_score", "score_std"):
            c[key] = None
    stats["confidence_histogram"] = None
    stats["calibration"] = {"available": False, "reason": reason}


def diagnose_predictions(path, options, *, pred_col=None):
    """Statistics and checks for a predictions file; ``options`` is an ``api.RunOptions`` (label_col,
    label_names, seed, chunk_rows, check_params, only, skip)."""
    from dataclasses import replace

    from .analysis import label_permutation
    from .api import judge, require_two_classes
    from .checks import REGISTRY
    from .posthoc import evaluate_posthoc

    path = Path(path)
    acc, columns, rows = read_predictions(path, label_col=options.label_col, pred_col=pred_col,
                                          label_names=options.label_names, seed=options.seed,
                                          chunk_rows=options.chunk_rows)
    stats = compute_stats(acc)
    require_two_classes(stats, path)
    stats["model"] = {"generic_label_names": False}
    # the evidence that arrays alone give; the rest needs the model (MODEL_ONLY_PARTS)
    stats["evidence"] = {"label_permutation": label_permutation(stats["confusion"])}
    not_run = dict(MODEL_ONLY_PARTS)
    # a check that needs the model (CheckSpec.requires) would only see missing evidence: it is not run
    not_run.update({c: "needs the model" for c, spec in REGISTRY.items() if spec.requires == "model"})
    notes = [f"Judged from precomputed predictions in {path.name}; no model was loaded, so the model-only parts "
             f"({', '.join(MODEL_ONLY_PARTS)}) were not run."]
    if columns.probs is None:
        reason = f"{path.name} holds predicted labels only (column {columns.predicted!r}), no probabilities"
        mark_scores_unavailable(stats, reason)
        stats["posthoc"] = None
        score_checks = [c for c, spec in REGISTRY.items() if spec.requires == "scores"]
        not_run.update({c: "needs per-class probabilities" for c in score_checks})
        notes.append(f"Only predicted labels were given: ROC-AUC, confidence, calibration and score spread are "
                     f"not available, and {', '.join(score_checks)} did not run. "
                     f"Write {PROB_PREFIX}<class> columns to get them.")
    else:
        sample = acc.sample.arrays
        stats["posthoc"] = evaluate_posthoc(sample["logits"], sample["gold"], seed=options.seed) if sample else None
        if columns.predicted:
            notes.append(f"Predictions are the argmax of the {PROB_PREFIX}<class> columns; column "
                         f"{columns.predicted!r} was not read.")
    metadata = {
        "mode": "predictions", "predictions_file": str(path), "model_dir": None, "model_name": path.stem,
        "data_file": str(path),
        "columns": {"label": columns.gold, "probabilities": columns.probs, "predicted":
                    None if columns.probs else columns.predicted},
        "scores": "probabilities" if columns.probs else "predicted labels only",
        "rows": rows, "seed": options.seed, "versions": _versions(), "not_run": not_run, "notes": notes,
    }
    skip = list(options.skip or []) + [c for c in not_run if c in REGISTRY and c not in (options.skip or [])]
    return judge(stats, metadata, replace(options, skip=skip or None))
