"""Calibration: does a confidence of 0.9 mean right 9 times in 10?

- Expected calibration error (ECE) with equal-width bins comes from the accumulator's histograms (every row);
  with equal-mass bins (each bin the same number of rows, so sparse high-confidence bins do not dominate) from
  the seeded row sample.
- Over- and under-confidence by class: among rows predicted as a class, mean confidence minus accuracy (the
  class's precision), from the accumulator (every row). Positive: overconfident.
- A fitted temperature T (Guo et al., 2017): the T minimising the negative log-likelihood of softmax(z / T) on
  the sample, offered as a suggestion with its measured effect. Logits known only up to a per-row constant
  (log of probabilities) give the same softmax(z / T), so a probabilities-only run fits the same T.

Pure numpy/scipy: no torch.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

EQUAL_MASS_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
MIN_SAMPLE_FOR_TEMPERATURE = 20
PROB_FLOOR = 1e-30  # float32 probabilities of 0 would give -inf logits


def ece_equal_width(count: np.ndarray, correct: np.ndarray, conf_sum: np.ndarray) -> float:
    """ECE from per-bin row counts, correct counts and confidence sums (equal-width bins on [0, 1])."""
    count = np.asarray(count, float)
    n = count.sum()
    if n == 0:
        return float("nan")
    used = count > 0
    gap = np.abs(np.asarray(correct, float)[used] / count[used] - np.asarray(conf_sum, float)[used] / count[used])
    return float((count[used] / n * gap).sum())


def equal_mass_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = EQUAL_MASS_BINS) -> list[dict]:
    """Rows sorted by confidence and cut into ``bins`` groups of (nearly) equal size; ties stay in the order
    of a stable sort, so the result depends only on the rows."""
    confidence = np.asarray(confidence, float)
    correct = np.asarray(correct, float)
    if len(confidence) == 0:
        return []
    order = np.argsort(confidence, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(order))):
        conf = confidence[idx]
        out.append({"lo": float(conf.min()), "hi": float(conf.max()), "n": int(len(idx)),
                    "confidence": float(conf.mean()), "accuracy": float(correct[idx].mean())})
    return out


def ece_from_bins(bins: list[dict]) -> float:
    n = sum(b["n"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) at the gold class."""
    logp = log_softmax(np.asarray(logits, float) / temperature, axis=1)
    return float(-logp[np.arange(len(gold)), np.asarray(gold)].mean())


def fit_temperature(logits: np.ndarray, gold: np.ndarray, bounds=TEMPERATURE_BOUNDS) -> float:
    """The temperature minimising the NLL, searched over log T (the NLL is smooth and unimodal in it)."""
    logits = np.asarray(logits, float)
    gold = np.asarray(gold)
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda log_t: nll(logits, gold, float(np.exp(log_t))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def _confidence_and_correct(probs: np.ndarray, gold: np.ndarray):
    pred = probs.argmax(axis=1)
    return probs[np.arange(len(pred)), pred], (pred == gold).astype(float)


def confidence_by_class(stats: dict) -> list[dict]:
    """Among rows predicted as each class: mean confidence, accuracy (= precision) and their gap."""
    out = []
    for c in stats["per_class"]:
        conf = c.get("mean_confidence")
        if c["predicted"] == 0 or conf is None:
            out.append({"class": c["class"], "predicted": c["predicted"], "mean_confidence": None,
                        "accuracy": None, "gap": None, "direction": None})
            continue
        gap = conf - c["precision"]
        direction = "overconfident" if gap > 0.05 else "underconfident" if gap < -0.05 else "calibrated"
        out.append({"class": c["class"], "predicted": c["predicted"], "mean_confidence": float(conf),
                    "accuracy": float(c["precision"]), "gap": float(gap), "direction": direction})
    return out


def calibration_summary(sample_probs, sample_gold, stats: dict, sample_logits=None,
                        bins: int = EQUAL_MASS_BINS) -> dict:
    """Everything calibration adds to ``stats["calibration"]`` (beside the equal-width ECE and bins that
    ``compute_stats`` writes from every row)."""
    out: dict = {"by_class": confidence_by_class(stats)}
    if sample_probs is None or len(sample_probs) == 0:
        out.update(ece_equal_mass=None, bins_equal_mass=[], sample_rows=0, temperature=None)
        return out
    probs = np.asarray(sample_probs, float)
    gold = np.asarray(sample_gold)
    conf, correct = _confidence_and_correct(probs, gold)
    mass_bins = equal_mass_bins(conf, correct, bins)
    out.update(ece_equal_mass=ece_from_bins(mass_bins), bins_equal_mass=mass_bins, sample_rows=int(len(gold)))
    if len(gold) < MIN_SAMPLE_FOR_TEMPERATURE:
        out["temperature"] = None
        return out
    logits = (np.asarray(sample_logits, float) if sample_logits is not None
              else np.log(np.clip(probs, PROB_FLOOR, None)))
    t = fit_temperature(logits, gold)
    scaled = np.exp(log_softmax(logits / t, axis=1))
    conf_t, correct_t = _confidence_and_correct(scaled, gold)
    ece_t = ece_from_bins(equal_mass_bins(conf_t, correct_t, bins))
    at_bound = bool(np.isclose(t, TEMPERATURE_BOUNDS[0], rtol=1e-3) or np.isclose(t, TEMPERATURE_BOUNDS[1], rtol=1e-3))
    out["temperature"] = {
        "value": t, "nll_before": nll(logits, gold), "nll_after": nll(logits, gold, t),
        "ece_equal_mass_after": ece_t, "at_bound": at_bound,
        "reading": ("overconfident: soften the logits" if t > 1.05 else
                    "underconfident: sharpen the logits" if t < 0.95 else "already close to calibrated"),
        "code": f"probs = torch.softmax(logits / {t:.3f}, dim=-1)  # temperature fitted on {len(gold)} eval rows",
    }
    return out
