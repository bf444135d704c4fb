"""Statistics as accumulators that merge, and pure functions that turn them into numbers.

Nothing here imports torch. A probe feeds ``Accumulator.update`` chunk by chunk; several accumulators (chunks,
processes) ``merge`` into one; ``compute_stats`` reads the merged accumulator. Because every field is a sum, a
histogram or a hash-ordered sample, a chunked run, a multi-process run and a one-shot run give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon
from scipy.special import logsumexp
from sklearn import metrics as skm

from .calibration import calibration_summary

SCORE_RANGE = (-30.0, 30.0)
SCORE_BINS = 3000
# log-odds bins of 0.02: ROC-AUC from these histograms is within ~1e-3 of sklearn for spread-out scores, and off
# by several hundredths for scores that barely move (_roc_auc uses the sample there)
LOGODDS_BIN = (SCORE_RANGE[1] - SCORE_RANGE[0]) / SCORE_BINS
CONF_BINS = 20
CALIBRATION_BINS = 15
DEFAULT_SAMPLE_ROWS = 4000
DEFAULT_GRAD_VALUES = 20000
DEFAULT_TOKEN_ROWS = 256  # rows whose token ids are kept for the input-dependence probes


def row_priority(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded hash of each row id (splitmix64): the sample is "the rows with the smallest priority",
    which does not depend on chunking, order or the number of processes."""
    with np.errstate(over="ignore"):
        z = row_ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class Reservoir:
    """Keep the ``capacity`` rows with the smallest priority, with any per-row arrays alongside."""

    capacity: int
    priority: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    arrays: dict = field(default_factory=dict)

    def add(self, priority: np.ndarray, **arrays: np.ndarray) -> None:
        if len(priority) == 0:
            return
        if not self.arrays:
            self.priority = priority.copy()
            self.arrays = {k: np.asarray(v).copy() for k, v in arrays.items()}
        else:
            self.priority = np.concatenate([self.priority, priority])
            self.arrays = {k: np.concatenate([self.arrays[k], np.asarray(arrays[k])]) for k in self.arrays}
        self._trim()

    def _trim(self) -> None:
        # Sort always (not only when over capacity) so the stored order is the same however rows arrived.
        order = np.argsort(self.priority, kind="stable")[: self.capacity]
        self.priority = self.priority[order]
        self.arrays = {k: v[order] for k, v in self.arrays.items()}

    def merge(self, other: "Reservoir") -> None:
        if other.arrays:
            self.add(other.priority, **other.arrays)

    def __len__(self) -> int:
        return len(self.priority)


@dataclass
class GradAccumulator:
    """Per-class sums and a hash-ordered sample of one group's per-example gradient norms."""

    k: int
    capacity: int = DEFAULT_GRAD_VALUES
    total: np.ndarray = None
    total_sq: np.ndarray = None
    count: np.ndarray = None
    values: list = None

    def __post_init__(self):
        self.total = np.zeros(self.k) if self.total is None else self.total
        self.total_sq = np.zeros(self.k) if self.total_sq is None else self.total_sq
        self.count = np.zeros(self.k, dtype=np.int64) if self.count is None else self.count
        self.values = [Reservoir(self.capacity) for _ in range(self.k)] if self.values is None else self.values

    def update(self, gold: np.ndarray, norms: np.ndarray, priority: np.ndarray) -> None:
        ok = np.isfinite(norms)  # NaN marks rows that were not sampled for this group
        g, v, p = gold[ok], norms[ok].astype(np.float64), priority[ok]
        np.add.at(self.total, g, v)
        np.add.at(self.total_sq, g, v * v)
        np.add.at(self.count, g, 1)
        for c in np.unique(g):
            sel = g == c
            self.values[c].add(p[sel], value=v[sel])

    def merge(self, other: "GradAccumulator") -> None:
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count
        for mine, theirs in zip(self.values, other.values):
            mine.merge(theirs)


class Accumulator:
    """Everything the statistics need, as mergeable sums, histograms and samples."""

    def __init__(self, class_names: list[str], *, seed: int = 0, sample_rows: int = DEFAULT_SAMPLE_ROWS):
        self.class_names = list(class_names)
        self.seed = seed
        k = self.k = len(class_names)
        self.n = 0
        self.confusion = np.zeros((k, k), dtype=np.int64)  # rows: gold, columns: predicted
        self.prob_sum_by_pred = np.zeros((k, k))
        # sums and sums of squared deviations (Chan et al.'s parallel update) of each class's probability and
        # log-odds: saturated probabilities can hide log-odds that still vary with the input
        self.prob_sum = np.zeros(k)
        self.prob_m2 = np.zeros(k)
        self.logodds_sum = np.zeros(k)
        self.logodds_m2 = np.zeros(k)
        self.nll_sum = 0.0
        self.conf_hist = np.zeros((k, CONF_BINS), dtype=np.int64)
        # one-vs-rest score histograms: [score class, bin] over every row, and over the rows of that gold class
        # (2 x k x bins: a k x k x bins table by gold class was 2 GB at 300 classes)
        self.score_hist = np.zeros((k, SCORE_BINS), dtype=np.int64)
        self.score_hist_pos = np.zeros((k, SCORE_BINS), dtype=np.int64)
        self.calib_count = np.zeros(CALIBRATION_BINS, dtype=np.int64)
        self.calib_correct = np.zeros(CALIBRATION_BINS, dtype=np.int64)
        self.calib_conf_sum = np.zeros(CALIBRATION_BINS)
        self.sample = Reservoir(sample_rows)
        self.token_sample = Reservoir(DEFAULT_TOKEN_ROWS)
        self.grad: dict[str, GradAccumulator] = {}

    def update(self, row_ids: np.ndarray, gold: np.ndarray, logits: np.ndarray, *, features=None,
               grad_norms: dict | None = None, token_ids: list | None = None) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        gold = np.asarray(gold, dtype=np.int64)
        n, k = logits.shape
        if k != self.k:
            raise ValueError(f"logits have {k} columns but the model has {self.k} classes")
        log_probs = logits - logsumexp(logits, axis=1, keepdims=True)
        probs = np.exp(log_probs)
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(n), pred]
        scores = np.clip(log_odds(logits), *SCORE_RANGE)
        self._merge_moments("prob", n, probs.sum(axis=0), ((probs - probs.mean(axis=0)) ** 2).sum(axis=0))
        self._merge_moments("logodds", n, scores.sum(axis=0), ((scores - scores.mean(axis=0)) ** 2).sum(axis=0))
        self.n += n
        np.add.at(self.confusion, (gold, pred), 1)
        np.add.at(self.prob_sum_by_pred, pred, probs)
        self.nll_sum += float(-log_probs[np.arange(n), gold].sum())
        np.add.at(self.conf_hist, (pred, _bin(conf, 0.0, 1.0, CONF_BINS)), 1)
        cal = _bin(conf, 0.0, 1.0, CALIBRATION_BINS)
        np.add.at(self.calib_count, cal, 1)
        np.add.at(self.calib_correct, cal, (pred == gold).astype(np.int64))
        np.add.at(self.calib_conf_sum, cal, conf)
        bins = _bin(scores, *SCORE_RANGE, SCORE_BINS)
        self.score_hist += np.bincount((np.arange(k) * SCORE_BINS + bins).ravel(),
                                       minlength=k * SCORE_BINS).reshape(k, SCORE_BINS)
        self.score_hist_pos += np.bincount(gold * SCORE_BINS + bins[np.arange(n), gold],
                                           minlength=k * SCORE_BINS).reshape(k, SCORE_BINS)
        priority = row_priority(row_ids, self.seed)
        arrays = dict(row_id=np.asarray(row_ids, dtype=np.int64), gold=gold, probs=probs.astype(np.float32),
                      logits=logits.astype(np.float32))
        if features is not None:
            arrays["features"] = np.asarray(features, dtype=np.float32)
        self.sample.add(priority, **arrays)
        if token_ids is not None:
            ids = np.empty(len(token_ids), dtype=object)
            for i, row in enumerate(token_ids):
                ids[i] = np.asarray(row, dtype=np.int64)
            self.token_sample.add(priority, row_id=np.asarray(row_ids, dtype=np.int64), gold=gold, ids=ids)
        for group, norms in (grad_norms or {}).items():
            self.grad_group(group).update(gold, np.asarray(norms, dtype=np.float64), priority)

    def grad_group(self, group: str) -> GradAccumulator:
        """The accumulator of one gradient-norm group, created on first use (not on every call)."""
        if group not in self.grad:
            self.grad[group] = GradAccumulator(self.k)
        return self.grad[group]

    def _merge_moments(self, name: str, n_b: int, sum_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Combine sums of squared deviations without the cancellation of sum(x^2) - n mean^2
        (call before ``self.n`` is increased)."""
        n_a, total, m2 = self.n, getattr(self, f"{name}_sum"), getattr(self, f"{name}_m2")
        if n_a and n_b:
            delta = sum_b / n_b - total / n_a
            m2 += m2_b + delta**2 * n_a * n_b / (n_a + n_b)
        else:
            m2 += m2_b
        total += sum_b

    def merge(self, other: "Accumulator") -> "Accumulator":
        if other.class_names != self.class_names:
            raise ValueError("cannot merge statistics of models with different classes")
        self._merge_moments("prob", other.n, other.prob_sum, other.prob_m2)
        self._merge_moments("logodds", other.n, other.logodds_sum, other.logodds_m2)
        self.n += other.n
        for name in ("confusion", "prob_sum_by_pred", "conf_hist", "score_hist", "score_hist_pos",
                     "calib_count", "calib_correct", "calib_conf_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.nll_sum += other.nll_sum
        self.sample.merge(other.sample)
        self.token_sample.merge(other.token_sample)
        for group, acc in other.grad.items():
            if group in self.grad:
                self.grad[group].merge(acc)
            else:
                self.grad[group] = acc
        return self


def _bin(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    idx = np.floor((np.clip(x, lo, hi) - lo) / (hi - lo) * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


MAX_CLASSES = 30  # classes a plot or the terminal table shows; with more, the largest (stats stay complete)


def classes_to_show(stats: dict, limit: int = MAX_CLASSES, by: str = "gold or predicted") -> np.ndarray:
    """Class ids to show, in id order: all of them, or the ``limit`` with the most rows ``by`` "gold or
    predicted" (the larger of the two counts, so a class the model collapses onto is always shown) or
    "predicted"; ties: the lower id."""
    support = np.asarray([c["support"] for c in stats["per_class"]])
    predicted = np.asarray([c["predicted"] for c in stats["per_class"]])
    k = len(support)
    if k <= limit:
        return np.arange(k)
    size = predicted if by == "predicted" else np.maximum(support, predicted)
    return np.sort(np.lexsort((np.arange(k), -size))[:limit])


def top_two(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best class and its value, its runner-up class and value (first index on ties, as argmax),
    and ``z`` with every row's best entry set to -inf."""
    rows = np.arange(len(z))
    first = z.argmax(axis=1)
    rest = z.copy()
    rest[rows, first] = -np.inf
    second = rest.argmax(axis=1)
    return first, z[rows, first], second, rest[rows, second], rest


def log_odds(logits: np.ndarray) -> np.ndarray:
    """log(p_c / (1 - p_c)) for every class, computed from logits so it does not saturate at p -> 1.

    z_c - log(sum over j != c of exp(z_j)) in O(rows x classes): for a class below the row's top logit m the
    sum is S - exp(z_c - m) with S = sum_j exp(z_j - m), which keeps the top class's exp(0) = 1, so nothing
    cancels; the top class's own sum is taken over the other classes directly, shifted by the runner-up."""
    z = np.asarray(logits, dtype=np.float64)
    n, k = z.shape
    if k == 1:
        return np.full_like(z, np.inf)
    rows = np.arange(n)
    top, m1, _, m2, others = top_two(z)
    e1 = np.exp(z - m1[:, None])
    with np.errstate(divide="ignore"):
        out = z - m1[:, None] - np.log(e1.sum(axis=1, keepdims=True) - e1)
        out[rows, top] = m1 - m2 - np.log(np.exp(others - m2[:, None]).sum(axis=1))
    return out


# ---------------------------------------------------------------- pure functions on arrays


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two distributions: the share of mass that has to move."""
    return float(0.5 * np.abs(np.asarray(p, float) - np.asarray(q, float)).sum())


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1])."""
    return float(jensenshannon(np.asarray(p, float), np.asarray(q, float), base=2))


def normalized_entropy(p: np.ndarray) -> float:
    """Shannon entropy of ``p`` divided by log(k): 1 for uniform, 0 for a single class."""
    p = np.asarray(p, float)
    if len(p) < 2:
        return 0.0
    return float(sps.entropy(p) / math.log(len(p))) if p.sum() > 0 else 0.0


def prediction_chisquare(predicted_counts: np.ndarray, label_prior: np.ndarray) -> dict:
    """Chi-square goodness of fit of the predicted counts against the label prior.

    Classes absent from the gold labels have no expected count; predictions of them are reported apart
    (``predicted_outside_prior``) and the test runs on the classes that occur.
    """
    counts = np.asarray(predicted_counts, float)
    prior = np.asarray(label_prior, float)
    present = prior > 0
    n = counts.sum()
    inside = counts[present]
    expected = prior[present] / prior[present].sum() * inside.sum()
    outside = int(counts[~present].sum())
    if present.sum() < 2 or inside.sum() == 0:
        return {"statistic": None, "p_value": None, "dof": int(max(present.sum() - 1, 0)),
                "predicted_outside_prior": outside}
    res = sps.chisquare(inside, expected)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "dof": int(present.sum() - 1),
            "predicted_outside_prior": outside, "n": int(n)}


def _pairs_from_confusion(confusion: np.ndarray):
    """(y_true, y_pred, weight) with one entry per confusion cell: sklearn metrics with sample_weight
    on these give exactly the numbers they would give on the expanded rows."""
    k = confusion.shape[0]
    gold, pred = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    w = confusion.ravel().astype(float)
    keep = w > 0
    return gold.ravel()[keep], pred.ravel()[keep], w[keep]


def classification_metrics(confusion: np.ndarray) -> dict:
    """Per-class precision/recall/F1/support and the summary scores, via sklearn."""
    k = confusion.shape[0]
    yt, yp, w = _pairs_from_confusion(confusion)
    labels = list(range(k))
    p, r, f, s = skm.precision_recall_fscore_support(yt, yp, labels=labels, sample_weight=w, zero_division=0.0)
    support = confusion.sum(axis=1)
    present = support > 0
    # balanced accuracy and macro F1 over the classes present in the gold labels: a class the eval set does
    # not contain can be neither recalled nor missed.
    bal = float(r[present].mean()) if present.any() else 0.0
    macro_f1 = float(f[present].mean()) if present.any() else 0.0
    mcc = float(skm.matthews_corrcoef(yt, yp, sample_weight=w)) if len(set(yt) | set(yp)) > 1 else 0.0
    return {
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.astype(int).tolist(),
        "accuracy": float(skm.accuracy_score(yt, yp, sample_weight=w)),
        "balanced_accuracy": bal, "macro_f1": macro_f1, "mcc": mcc,
    }


def balanced_accuracy_test(recall: np.ndarray, support: np.ndarray) -> dict:
    """Is balanced accuracy above the 1/k of any constant predictor? Normal approximation with
    var(BA) = sum_c r_c (1 - r_c) / n_c / k^2 (classes independent, binomial recall per class)."""
    recall = np.asarray(recall, float)
    support = np.asarray(support, float)
    present = support > 0
    k = int(present.sum())
    if k < 2:
        return {"chance": None, "gain": None, "se": None, "z": None, "p_value": None}
    r, n = recall[present], support[present]
    ba = r.mean()
    # shrink r toward 1/2 by half a count so a recall of exactly 0 or 1 does not give a zero variance
    r_adj = (r * n + 0.5) / (n + 1.0)
    se = float(np.sqrt((r_adj * (1 - r_adj) / n).sum()) / k)
    chance = 1.0 / k
    z = float((ba - chance) / se)
    return {"chance": chance, "gain": float(ba - chance), "se": se, "z": z, "p_value": float(sps.norm.sf(z))}


def _roc_auc(acc, spread: float) -> tuple[list[float | None], str]:
    """One-vs-rest ROC-AUC per class: exact (sklearn, on every row's log-odds) while the seeded sample still
    holds every row, else from the log-odds histograms over every row. Histograms are close for spread-out
    scores but blur a model whose scores barely move (the case the AUC thresholds decide on): where no class's
    log-odds spread (``spread``, the largest standard deviation) reaches ten bins, the seeded sample's AUC is
    used at any row count."""
    sample = acc.sample.arrays
    k = acc.k
    if sample and (len(sample["gold"]) == acc.n or spread < 10 * LOGODDS_BIN):
        scores, gold = log_odds(sample["logits"]), sample["gold"]
        auc = []
        for c in range(k):
            positive = gold == c
            auc.append(float(skm.roc_auc_score(positive, scores[:, c])) if 0 < positive.sum() < len(gold)
                       else None)
        return auc, ("exact: every row" if len(gold) == acc.n else
                     f"the seeded sample of {len(gold)} rows (scores too narrow for the histograms' bins)")
    auc = []
    for c in range(k):
        pos = acc.score_hist_pos[c]
        neg = acc.score_hist[c] - pos
        auc.append(auc_from_histograms(pos, neg))
    return auc, f"log-odds histograms ({SCORE_BINS} bins over {SCORE_RANGE[0]:g} to {SCORE_RANGE[1]:g})"


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """ROC-AUC from score histograms of positives and negatives; ties within a bin count one half,
    as sklearn counts tied scores."""
    pos = np.asarray(pos, float)
    neg = np.asarray(neg, float)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def majority_baseline(confusion: np.ndarray) -> dict:
    """What always predicting the most frequent gold class would score."""
    support = confusion.sum(axis=1)
    n = support.sum()
    k = len(support)
    majority = int(support.argmax())
    prior = support[majority] / n
    f1 = np.zeros(k)
    f1[majority] = 2 * prior / (1 + prior)
    present = support > 0
    recall = np.zeros(k)
    recall[majority] = 1.0
    return {
        "class_id": majority, "accuracy": float(prior),
        "balanced_accuracy": float(1.0 / present.sum()),
        "macro_f1": float(f1[present].mean()), "f1": f1.tolist(), "recall": recall.tolist(),
    }


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if len(values) else None


def gradient_stats(grad: dict[str, GradAccumulator], class_names: list[str], majority: int,
                   support: np.ndarray) -> dict:
    """Per group and class: mean, median, 90th percentile, share of gradient mass vs share of the eval rows,
    and the ratio of each class's mean norm to the majority class's.

    A group measured on a stratified sample (ghost norms: the same number of rows per class) estimates each
    class's mass as its mean norm times its rows in the eval set, so the shares describe the data, not the
    sample; a group over every row (the head) gives the same numbers exactly."""
    support = np.asarray(support, dtype=float)
    rows = support.sum()
    out = {}
    for group, acc in sorted(grad.items()):
        count = acc.count.astype(float)
        mean = np.divide(acc.total, count, out=np.full(len(count), np.nan), where=count > 0)
        sampled = bool((count < support).any())
        # a class with rows but none measured leaves the mass unknown
        mass = np.where(support > 0, support * np.nan_to_num(mean), 0.0)
        known = not ((support > 0) & (count == 0)).any() and mass.sum() > 0
        per_class = []
        for c, name in enumerate(class_names):
            values = acc.values[c].arrays.get("value", np.empty(0)) if len(acc.values[c]) else np.empty(0)
            per_class.append({
                "class": name, "n": int(count[c]),
                "mean": None if count[c] == 0 else float(mean[c]),
                "median": _quantile(values, 0.5), "p90": _quantile(values, 0.9),
                "mass_share": float(mass[c] / mass.sum()) if known else None,
                "example_share": float(support[c] / rows) if rows > 0 else None,
                "ratio_to_majority": (float(mean[c] / mean[majority])
                                      if count[c] > 0 and count[majority] > 0 and mean[majority] > 0 else None),
            })
        total = acc.total.sum()
        out[group] = {"n": int(count.sum()), "mean": float(total / count.sum()) if count.sum() else None,
                      "sampled": sampled, "per_class": per_class}
    return out


def compute_stats(acc: Accumulator) -> dict:
    """Turn a merged accumulator into the statistics every check and renderer reads (a JSON-able dict)."""
    k, n = acc.k, acc.n
    if n == 0:
        raise ValueError("no rows to compute statistics on")
    confusion = acc.confusion
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    prior = support / n
    share = predicted / n
    metrics = classification_metrics(confusion)
    baseline = majority_baseline(confusion)
    mean_prob = acc.prob_sum / n
    score_std = np.sqrt(acc.prob_m2 / n)
    logodds_std = np.sqrt(acc.logodds_m2 / n)
    mean_conf = np.divide(np.diag(acc.prob_sum_by_pred), predicted, out=np.full(k, np.nan), where=predicted > 0)
    auc, auc_source = _roc_auc(acc, float(logodds_std.max()))
    present_auc = [a for a in auc if a is not None]
    top = int(share.argmax())
    per_class = []
    for c, name in enumerate(acc.class_names):
        per_class.append({
            "class": name, "id": c, "support": int(support[c]), "prior": float(prior[c]),
            "predicted": int(predicted[c]), "prediction_share": float(share[c]),
            "share_ratio": float(share[c] / prior[c]) if prior[c] > 0 else None,
            "precision": metrics["precision"][c], "recall": metrics["recall"][c], "f1": metrics["f1"][c],
            "baseline_f1": baseline["f1"][c], "f1_gain": metrics["f1"][c] - baseline["f1"][c],
            "recall_gain": metrics["recall"][c] - baseline["recall"][c],
            "mean_confidence": None if np.isnan(mean_conf[c]) else float(mean_conf[c]),
            "mean_score": float(mean_prob[c]), "score_std": float(score_std[c]),
            "logodds_std": float(logodds_std[c]), "roc_auc": auc[c],
        })
    calib_bins = []
    ece = 0.0
    for b in range(CALIBRATION_BINS):
        cnt = int(acc.calib_count[b])
        if cnt:
            conf = acc.calib_conf_sum[b] / cnt
            accb = acc.calib_correct[b] / cnt
            ece += cnt / n * abs(accb - conf)
            calib_bins.append({"lo": b / CALIBRATION_BINS, "hi": (b + 1) / CALIBRATION_BINS, "n": cnt,
                               "confidence": float(conf), "accuracy": float(accb)})
    stats = {
        "n": int(n), "k": k, "class_names": acc.class_names,
        "label_prior": prior.tolist(), "prediction_share": share.tolist(),
        "total_variation": total_variation(share, prior), "js_distance": js_distance(share, prior),
        "chi_square": prediction_chisquare(predicted, prior),
        "prediction_entropy": normalized_entropy(share), "label_entropy": normalized_entropy(prior),
        "top_class": acc.class_names[top], "top_class_id": top, "top_share": float(share[top]),
        "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"], "mcc": metrics["mcc"],
        "balanced_accuracy_test": balanced_accuracy_test(metrics["recall"], support),
        "majority_baseline": {**{k_: v for k_, v in baseline.items() if k_ not in ("f1", "recall")},
                              "class": acc.class_names[baseline["class_id"]]},
        "mean_nll": acc.nll_sum / n,
        # how much the output moves with the input, in log-odds (saturated probabilities hide it)
        "score_spread": float(logodds_std.max()),
        "probability_spread": float(score_std.max()),
        "macro_roc_auc": float(np.mean(present_auc)) if present_auc else None, "roc_auc_source": auc_source,
        "per_class": per_class, "confusion": confusion.astype(int).tolist(),
        "confidence_histogram": {"bins": CONF_BINS, "counts": acc.conf_hist.astype(int).tolist()},
        "calibration": {"ece": float(ece), "bins": calib_bins},
    }
    sample = acc.sample.arrays
    stats["calibration"].update(calibration_summary(sample.get("probs"), sample.get("gold"), stats,
                                                    sample.get("logits")))
    if acc.grad:
        stats["gradients"] = gradient_stats(acc.grad, acc.class_names, baseline["class_id"], support)
        # private (not written to JSON): a hash-ordered sample of norms per class for the box plots
        stats["_grad_samples"] = {
            group: [res.arrays.get("value", np.empty(0))[:2000].tolist() if len(res) else [] for res in g.values]
            for group, g in acc.grad.items()}
    return stats
