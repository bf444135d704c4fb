"""Checks turn statistics into findings. One function per check, registered by id; thresholds are keyword
arguments with documented defaults, so a user can change them by name.

A check receives the statistics dict from ``stats.compute_stats`` (plus ``stats["model"]`` metadata) and
returns a list of findings; a check that raises becomes an ``error`` finding and the others still run.
"""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from . import fixes
from .fixes import Fix


class Severity(str, Enum):
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warn": 1, "fail": 2, "error": 3}[self.value]


@dataclass
class Finding:
    check_id: str
    severity: Severity
    summary: str
    evidence: dict = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    cause: str = ""
    fix: Fix | None = None

    def to_dict(self) -> dict:
        return {"check_id": self.check_id, "severity": self.severity.value, "summary": self.summary,
                "classes": list(self.classes), "cause": self.cause, "evidence": self.evidence,
                "fix": self.fix.to_dict() if self.fix else None}


@dataclass
class CheckSpec:
    check_id: str
    func: Callable
    title: str
    measures: str
    severity: str
    collapse: bool  # a finding of this check counts toward the exit code

    @property
    def defaults(self) -> dict:
        sig = inspect.signature(self.func)
        return {name: p.default for name, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


REGISTRY: dict[str, CheckSpec] = {}


def register(check_id: str, *, title: str, measures: str, severity: str, collapse: bool = True):
    def wrap(func):
        REGISTRY[check_id] = CheckSpec(check_id, func, title, measures, severity, collapse)
        return func
    return wrap


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _present(stats, min_support):
    return [c for c in stats["per_class"] if c["support"] >= min_support]


@register("class_never_predicted", title="A class with real support is (almost) never predicted",
          measures="prediction share / label prior per class", severity="fail")
def class_never_predicted(stats, *, min_support: int = 5, max_share_ratio: float = 0.1):
    """Fail for each class with at least ``min_support`` gold rows whose prediction share is at most
    ``max_share_ratio`` times its prior."""
    hit = [c for c in _present(stats, min_support) if c["share_ratio"] is not None
           and c["share_ratio"] <= max_share_ratio]
    if not hit:
        return []
    names = [c["class"] for c in hit]
    detail = "; ".join(f"{c['class']}: {c['predicted']} predicted for {c['support']} gold rows "
                       f"(recall {c['recall']:.2f})" for c in hit)
    return [Finding(
        "class_never_predicted", Severity.FAIL,
        f"{len(hit)} of {stats['k']} classes are (almost) never predicted: {detail}.",
        evidence={c["class"]: {"support": c["support"], "predicted": c["predicted"], "prior": c["prior"],
                               "prediction_share": c["prediction_share"], "recall": c["recall"]} for c in hit},
        classes=names,
        cause=f"The model maps these classes onto others, typically onto the majority class "
              f"'{stats['top_class']}' ({_pct(stats['top_share'])} of predictions).",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


@register("prediction_absorbed", title="One class absorbs far more predictions than its prior",
          measures="prediction share vs label prior, chi-square goodness of fit", severity="warn/fail")
def prediction_absorbed(stats, *, warn_ratio: float = 1.25, warn_excess: float = 0.1, fail_ratio: float = 1.5,
                        fail_excess: float = 0.2, alpha: float = 0.01):
    """Warn when a class's prediction share is >= ``warn_ratio`` x its prior and >= ``warn_excess`` above it,
    fail at ``fail_ratio`` and ``fail_excess``; either only when the chi-square test of predicted counts
    against the prior has p < ``alpha``."""
    chi = stats["chi_square"]
    if chi["p_value"] is None or chi["p_value"] >= alpha:
        return []
    out = []
    for c in stats["per_class"]:
        ratio, excess = c["share_ratio"], c["prediction_share"] - c["prior"]
        if ratio is None:
            continue
        if ratio >= fail_ratio and excess >= fail_excess:
            sev = Severity.FAIL
        elif ratio >= warn_ratio and excess >= warn_excess:
            sev = Severity.WARN
        else:
            continue
        out.append(Finding(
            "prediction_absorbed", sev,
            f"'{c['class']}' gets {_pct(c['prediction_share'])} of predictions against a prior of "
            f"{_pct(c['prior'])} ({ratio:.2f}x; chi-square p = {chi['p_value']:.2g}, total variation "
            f"{stats['total_variation']:.2f}).",
            evidence={"prediction_share": c["prediction_share"], "prior": c["prior"], "share_ratio": ratio,
                      "chi_square": chi, "total_variation": stats["total_variation"],
                      "js_distance": stats["js_distance"], "precision": c["precision"]},
            classes=[c["class"]],
            cause="The decision rule favours this class: the usual result of training on data where it "
                  "dominates, without class weights or resampling.",
            fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
        ))
    return out


@register("no_better_than_majority", title="Predictions no better than the majority-class baseline",
          measures="balanced accuracy vs 1/k (normal test)", severity="fail")
def no_better_than_majority(stats, *, min_gain: float = 0.1, alpha: float = 0.01):
    """Fail when balanced accuracy is less than ``min_gain`` above 1/k (what any constant predictor gets),
    or not significantly above it (one-sided p >= ``alpha``)."""
    test = stats["balanced_accuracy_test"]
    if test["gain"] is None:
        return []
    if test["gain"] >= min_gain and test["p_value"] < alpha:
        return []
    base = stats["majority_baseline"]
    return [Finding(
        "no_better_than_majority", Severity.FAIL,
        f"Balanced accuracy {stats['balanced_accuracy']:.3f} is {test['gain']:+.3f} from the "
        f"{test['chance']:.3f} of always predicting '{base['class']}' (z = {test['z']:.1f}, "
        f"p = {test['p_value']:.2g}); accuracy {stats['accuracy']:.3f} vs the baseline's {base['accuracy']:.3f}.",
        evidence={"balanced_accuracy": stats["balanced_accuracy"], "test": test, "accuracy": stats["accuracy"],
                  "macro_f1": stats["macro_f1"], "mcc": stats["mcc"], "majority_baseline": base},
        classes=[base["class"]],
        cause="The model's decisions carry (almost) no information beyond the label prior.",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


@register("constant_output", title="Output nearly constant across inputs",
          measures="largest per-class standard deviation of the predicted probability", severity="fail")
def constant_output(stats, *, max_spread: float = 0.02):
    """Fail when no class's predicted probability varies by more than ``max_spread`` (standard deviation)
    across the eval rows: the model ignores its input."""
    if stats["score_spread"] > max_spread:
        return []
    mean_scores = ", ".join(f"{c['class']}={c['mean_score']:.3f}" for c in stats["per_class"])
    return [Finding(
        "constant_output", Severity.FAIL,
        f"The predicted probabilities barely move across {stats['n']} rows (largest standard deviation "
        f"{stats['score_spread']:.4f}); mean output: {mean_scores}.",
        evidence={"score_spread": stats["score_spread"],
                  "score_std": {c["class"]: c["score_std"] for c in stats["per_class"]},
                  "macro_roc_auc": stats["macro_roc_auc"]},
        classes=[stats["top_class"]],
        cause="The output no longer depends on the input: a diverged run (learning rate too high), "
              "an untrained head, or inputs the model cannot read (tokenizer mismatch).",
        fix=fixes.optimization_fix(),
    )]


@register("low_recall", title="Per-class recall under a floor", measures="recall per class",
          severity="warn")
def low_recall(stats, *, floor: float = 0.5, min_support: int = 5):
    """Warn for each class with at least ``min_support`` gold rows and recall below ``floor``."""
    hit = [c for c in _present(stats, min_support) if c["recall"] < floor]
    if not hit:
        return []
    detail = ", ".join(f"{c['class']} {c['recall']:.2f} (n={c['support']})" for c in hit)
    return [Finding(
        "low_recall", Severity.WARN, f"Recall below {floor:.2f} for {len(hit)} class(es): {detail}.",
        evidence={c["class"]: {"recall": c["recall"], "support": c["support"], "f1": c["f1"]} for c in hit},
        classes=[c["class"] for c in hit],
        cause="These classes are under-served by the decision rule or under-represented in training.",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


@register("generic_label_names", title="id2label holds only generic names", measures="config id2label",
          severity="info", collapse=False)
def generic_label_names(stats):
    """Info when the checkpoint's id2label is LABEL_0, LABEL_1, ...: a permuted mapping cannot be seen."""
    if not stats.get("model", {}).get("generic_label_names"):
        return []
    return [Finding(
        "generic_label_names", Severity.INFO,
        f"The checkpoint names its classes {', '.join(stats['class_names'][:5])}: meaningless names hide a "
        "label mapping that does not match the data.",
        cause="id2label/label2id were not set when the model was created.",
        fix=Fix("Name the classes", ["Pass id2label and label2id to from_pretrained() when fine-tuning, or set "
                                     "them in config.json."]),
    )]


def run_checks(stats: dict, *, only=None, skip=None, params: dict | None = None) -> list[Finding]:
    """Run the registered checks; ``params`` maps check id to keyword overrides."""
    params = params or {}
    findings: list[Finding] = []
    for check_id, spec in REGISTRY.items():
        if (only and check_id not in only) or (skip and check_id in skip):
            continue
        try:
            findings.extend(spec.func(stats, **params.get(check_id, {})))
        except Exception as exc:  # a broken check must not hide the others
            findings.append(Finding(check_id, Severity.ERROR, f"The check crashed: {type(exc).__name__}: {exc}",
                                    evidence={"traceback": traceback.format_exc(limit=3)}))
    order = {s: i for i, s in enumerate([Severity.ERROR, Severity.FAIL, Severity.WARN, Severity.INFO])}
    findings.sort(key=lambda f: order[f.severity])
    return findings
