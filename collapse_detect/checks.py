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
    # what the check reads beyond predictions and gold labels: "scores" (per-class probabilities) or "model"
    # (the model itself, its checkpoint folder or its gradients); a run without it marks the check as not run
    requires: str | None = None

    @property
    def defaults(self) -> dict:
        sig = inspect.signature(self.func)
        return {name: p.default for name, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}

    def settings(self, params: dict | None = None) -> dict:
        """The check's thresholds as a run uses them: its defaults, overridden by ``params`` (check id -> values,
        as ``--set`` and the config file give them)."""
        return {**self.defaults, **(params or {}).get(self.check_id, {})}

    @property
    def strongest(self) -> Severity:
        """The most severe finding the check can report ("warn/fail": fail)."""
        return max((Severity(x) for x in self.severity.split("/")), key=lambda s: s.rank)


REGISTRY: dict[str, CheckSpec] = {}


def register(check_id: str, *, title: str, measures: str, severity: str, collapse: bool = True,
             requires: str | None = None):
    def wrap(func):
        REGISTRY[check_id] = CheckSpec(check_id, func, title, measures, severity, collapse, requires)
        return func
    return wrap


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


LISTED = 10  # items a finding's summary names; the evidence holds them all


def listed(items: list[str], sep: str, limit: int = LISTED) -> str:
    """``items`` joined, the first ``limit`` of them and then how many more there are."""
    items = list(items)
    more = len(items) - limit
    return sep.join(items[:limit]) + (f"{sep}and {more} more" if more > 0 else "")


def _largest_first(hit: list[dict], key: str = "support") -> list[dict]:
    """Classes in id order, or by ``key`` (largest first) when the summary cannot name them all."""
    return hit if len(hit) <= LISTED else sorted(hit, key=lambda c: -c[key])


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
    top = stats["per_class"][stats["top_class_id"]]
    onto = (", the eval set's majority class)" if top["class"] == stats["majority_baseline"]["class"] else
            f", though only {_pct(top['prior'])} of the gold labels: more than imbalance is at work)")
    detail = listed([f"{c['class']}: {c['predicted']} predicted for {c['support']} gold rows "
                     f"(recall {c['recall']:.2f})" for c in _largest_first(hit)], "; ")
    return [Finding(
        "class_never_predicted", Severity.FAIL,
        f"{len(hit)} of {stats['k']} classes are (almost) never predicted: {detail}.",
        evidence={c["class"]: {"support": c["support"], "predicted": c["predicted"], "prior": c["prior"],
                               "prediction_share": c["prediction_share"], "recall": c["recall"]} for c in hit},
        classes=names,
        cause=f"The model maps these classes onto others, most of all onto '{top['class']}' "
              f"({_pct(stats['top_share'])} of predictions{onto}.",
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
                  "dominates, without class weights or resampling"
                  + ("." if c["class"] == stats["majority_baseline"]["class"] else
                     "; it is not the eval set's majority, so see the root cause for what else fits."),
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
    test_text = f"z = {test['z']:.1f}, p = {test['p_value']:.2g}"
    if test["gain"] < min_gain:
        why = f" ({test_text}; needs at least +{min_gain:g})"
    else:  # the gain is large enough but the eval set too small to show it is not chance
        why = f", but not significantly on {stats['n']} rows ({test_text}; needs p < {alpha:g})"
    return [Finding(
        "no_better_than_majority", Severity.FAIL,
        f"Balanced accuracy {stats['balanced_accuracy']:.3f} is {test['gain']:+.3f} from the "
        f"{test['chance']:.3f} of always predicting '{base['class']}'{why}; accuracy {stats['accuracy']:.3f} "
        f"vs the baseline's {base['accuracy']:.3f}.",
        evidence={"balanced_accuracy": stats["balanced_accuracy"], "test": test, "accuracy": stats["accuracy"],
                  "macro_f1": stats["macro_f1"], "mcc": stats["mcc"], "majority_baseline": base,
                  "min_gain": min_gain, "alpha": alpha, "underpowered": bool(test["gain"] >= min_gain)},
        classes=[base["class"]],
        cause="The model's decisions carry (almost) no information beyond the label prior.",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


def output_is_constant(stats, *, max_spread: float = 0.1, max_auc: float = 0.75) -> bool:
    """No class's log-odds moves by more than ``max_spread`` (standard deviation) across rows, and the little
    they move does not rank the classes (macro ROC-AUC under ``max_auc``). constant_output and the root cause
    share this reading."""
    spread, auc = stats.get("score_spread"), stats.get("macro_roc_auc")
    return spread is not None and spread <= max_spread and (auc is None or auc < max_auc)


@register("constant_output", requires="scores", title="Output nearly constant across inputs",
          measures="largest per-class standard deviation of the log-odds across rows; macro ROC-AUC",
          severity="fail")
def constant_output(stats, *, max_spread: float = 0.1, max_auc: float = 0.75):
    """Fail when no class's log-odds log(p / (1 - p)) varies by more than ``max_spread`` (standard deviation)
    across the eval rows and what little varies does not rank the classes (macro ROC-AUC under ``max_auc``):
    the output does not depend on the input. Log-odds, not probabilities, so that a saturated but
    input-dependent model (a threshold collapse) is not called constant; the AUC, so that an under-confident
    model whose small moves still sort the rows is not either."""
    if not output_is_constant(stats, max_spread=max_spread, max_auc=max_auc):
        return []
    mean_scores = listed([f"{c['class']}={c['mean_score']:.3f}"
                          for c in _largest_first(stats["per_class"], "mean_score")], ", ")
    return [Finding(
        "constant_output", Severity.FAIL,
        f"The output barely moves across {stats['n']} rows (largest log-odds standard deviation "
        f"{stats['score_spread']:.4f}); mean probabilities: {mean_scores}.",
        evidence={"score_spread": stats["score_spread"],
                  "logodds_std": {c["class"]: c["logodds_std"] for c in stats["per_class"]},
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
    detail = listed([f"{c['class']} {c['recall']:.2f} (n={c['support']})" for c in _largest_first(hit)], ", ")
    return [Finding(
        "low_recall", Severity.WARN, f"Recall below {floor:.2f} for {len(hit)} class(es): {detail}.",
        evidence={c["class"]: {"recall": c["recall"], "support": c["support"], "f1": c["f1"]} for c in hit},
        classes=[c["class"] for c in hit],
        cause="These classes are under-served by the decision rule or under-represented in training.",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


@register("generic_label_names", requires="model",
          title="id2label holds only generic names", measures="config id2label",
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


def _evidence(stats, *keys):
    value = stats.get("evidence") or {}
    for key in keys:
        value = (value or {}).get(key)
    return value


def posthoc_repairs(post: dict | None, min_gain: float) -> bool:
    """A post-hoc shift of the logits raises held-out balanced accuracy by at least ``min_gain``, with the
    lower end of its 95% interval above the balanced accuracy before: the decision rule, not the scores, failed."""
    if not post or post.get("gain") is None or post["gain"] < min_gain:
        return False
    ci = post["methods"][post["best"]].get("balanced_accuracy_ci")
    return bool(ci) and ci[0] > post["before"]["balanced_accuracy"]


@register("threshold_collapse", requires="scores",
          title="Only the decision threshold collapsed: a post-hoc shift repairs it",
          measures="macro ROC-AUC and the cross-validated gain of a post-hoc logit adjustment", severity="info",
          collapse=False)
def threshold_collapse(stats, *, min_auc: float = 0.8, min_gain: float = 0.05, min_measured_gain: float = 0.2):
    """Info when a post-hoc adjustment, measured on held-out folds, raises balanced accuracy by at least
    ``min_gain`` and the macro one-vs-rest ROC-AUC is at least ``min_auc``, or raises it by at least
    ``min_measured_gain`` whatever the AUC (one class's score alone can rank poorly while the shifted argmax
    over all classes works): a fix without retraining exists."""
    post = stats.get("posthoc")
    auc = stats.get("macro_roc_auc")
    ranked = auc is not None and auc >= min_auc and post is not None and post["gain"] >= min_gain
    if not (ranked or posthoc_repairs(post, min_measured_gain)):
        return []
    best = post["methods"][post["best"]]
    before = post["before"]
    lo, hi = best["balanced_accuracy_ci"] or (None, None)
    names = stats["class_names"]
    offsets = post["offsets"]
    recall_change = ", ".join(f"{names[c]} {before['recall'][i]:.2f}->{best['recall'][i]:.2f}"
                              for i, c in enumerate(post["labels"]))
    return [Finding(
        "threshold_collapse", Severity.INFO,
        (f"The scores still rank the classes (macro ROC-AUC {auc:.3f}); " if auc is not None and auc >= min_auc else
         f"Each class's score alone ranks poorly (macro ROC-AUC {'n/a' if auc is None else f'{auc:.3f}'}), yet ")
        + f"{post['best'].replace('_', ' ')} "
        f"raises held-out balanced accuracy from {before['balanced_accuracy']:.3f} to "
        f"{best['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {post['folds']} folds of "
        f"{post['rows']} rows.",
        evidence={"macro_roc_auc": auc, "posthoc": post},
        classes=[names[c] for c in post["labels"]],
        cause="The decision threshold moved toward the dominant class while the representation kept the "
              "class information.",
        fix=Fix(
            title="Shift the classifier bias (post-hoc logit adjustment, no retraining)",
            steps=[f"Per-class recall on held-out folds: {recall_change}.",
                   "Offsets to add to the logits: " + ", ".join(f"{n}={o:+.3f}" for n, o in zip(names, offsets))
                   + (f" (prior from {post['prior_source']})." if post["best"] == "logit_adjustment" else
                      " (tuned for balanced accuracy on the eval rows; held-out folds measured the gain)."),
                   "collapse-detect MODEL DATA --write-fixed DIR writes a checkpoint with these offsets in the "
                   "classifier bias and re-probes it.",
                   post["caveat"]],
            code=fixes.logit_adjustment_code(names, offsets, post["best"]),
            values={"offsets": dict(zip(names, offsets)), "method": post["best"]},
        ),
    )]


@register("input_ignored", requires="model", title="The model ignores its input",
          measures="agreement with, and log-odds distance to, the empty input's output", severity="fail")
def input_ignored(stats, *, min_agreement: float = 0.95, max_distance: float = 0.25):
    """Fail when at least ``min_agreement`` of rows get the empty input's prediction and their log-odds are
    within ``max_distance`` of the empty input's (mean over rows of the largest per-class difference)."""
    null = _evidence(stats, "null_input")
    if not null or null["agreement"] < min_agreement or null["distance"] > max_distance:
        return []
    empty = null["inputs"]["empty"]
    return [Finding(
        "input_ignored", Severity.FAIL,
        f"{null['agreement']:.0%} of rows get the same prediction as an empty input ('{empty['predicted']}'), "
        f"with log-odds {null['distance']:.3f} away from it on average.",
        evidence=null, classes=[empty["predicted"]],
        cause="The output does not depend on the text: a diverged run, an untrained head or unreadable input.",
        fix=fixes.optimization_fix(),
    )]


def head_is_fresh(head: dict, *, max_bias: float = 1e-6, init_ratio: tuple = (0.5, 2.0)) -> bool:
    """The head as initialised: a bias still at zero and a weight std at the initializer's scale. A head without
    a bias cannot be told from a lightly trained one by its weights alone, so it is never called fresh."""
    return bool(head.get("has_bias", True) and head["bias_abs_max"] <= max_bias
                and init_ratio[0] <= head["weight_std_ratio"] <= init_ratio[1])


@register("untrained_head", requires="model", title="Classification head untrained or missing from the checkpoint",
          measures="missing head weights; head bias and weight scale vs initialisation", severity="fail")
def untrained_head(stats, *, max_bias: float = 1e-6, init_ratio: tuple = (0.5, 2.0)):
    """Fail when the head's weights were missing from the checkpoint, or its bias is at most ``max_bias`` and
    its weight std within ``init_ratio`` times the initializer_range."""
    head = _evidence(stats, "head")
    if not head:
        return []
    missing = head["missing_head_keys"]
    fresh = head_is_fresh(head, max_bias=max_bias, init_ratio=init_ratio)
    if not missing and not fresh:
        return []
    why = (f"the checkpoint holds no {', '.join(missing)}: the head was initialised at random on load" if missing
           else f"its bias is zero and its weight std {head['weight_std']:.4f} is the initializer_range "
                f"{head['initializer_range']}")
    return [Finding(
        "untrained_head", Severity.FAIL, f"The classification head was never trained: {why}.",
        evidence=head,
        cause="The model was saved before fine-tuning, or only the encoder was saved.",
        fix=Fix("Save the fine-tuned model, head included",
                ["Call trainer.save_model() / model.save_pretrained() after training, and check that "
                 "from_pretrained() reports no newly initialised classifier weights."]),
    )]


@register("label_mapping_mismatch", title="id2label does not match the data's labels",
          measures="optimal assignment of predicted to gold classes (Hungarian)", severity="fail")
def label_mapping_mismatch(stats, *, min_mapped: float = 0.6, min_gain: float = 0.3, min_support: int = 5):
    """Fail when re-mapping predicted classes (the best assignment, not the identity) reaches balanced
    accuracy of at least ``min_mapped`` and at least ``min_gain`` above the identity mapping, and every gold
    class the re-mapping moves has at least ``min_support`` rows (on a handful of rows some permutation
    always fits)."""
    perm = _evidence(stats, "label_permutation")
    if not perm or perm["is_identity"]:
        return []
    gain = perm["mapped_balanced_accuracy"] - perm["identity_balanced_accuracy"]
    if perm["mapped_balanced_accuracy"] < min_mapped or gain < min_gain:
        return []
    names = stats["class_names"]
    moved = [(int(p), int(g)) for p, g in perm["mapping"].items() if int(p) != int(g)]
    if any(stats["per_class"][g]["support"] < min_support for _, g in moved):
        return []
    mapping = {names[p]: names[g] for p, g in moved}
    shown = ", ".join(f"predicted '{p}' is gold '{g}'" for p, g in mapping.items())
    return [Finding(
        "label_mapping_mismatch", Severity.FAIL,
        f"The predictions match the labels under a permutation ({shown}): balanced accuracy "
        f"{perm['identity_balanced_accuracy']:.3f} as named, {perm['mapped_balanced_accuracy']:.3f} re-mapped.",
        evidence=perm, classes=sorted(mapping),
        cause="id2label/label2id in config.json were built in a different order than the training labels.",
        fix=Fix("Fix id2label / label2id", [
            "Set config.id2label so each id names the class the model learnt for it: "
            + ", ".join(f"id {stats['class_names'].index(p)} -> '{g}'" for p, g in mapping.items()) + ".",
            "Build the mapping once (e.g. sorted label names) and pass the same one to training and export."]),
    )]


@register("tokenizer_mismatch", requires="model", title="The tokenizer does not fit the model or the data",
          measures="unknown-token rate, tokenizer vocabulary vs embedding rows", severity="warn/fail")
def tokenizer_mismatch(stats, *, warn_unknown: float = 0.05, fail_unknown: float = 0.3):
    """Warn at an unknown-token rate of ``warn_unknown``; fail at ``fail_unknown`` unknown tokens or a tokenizer
    vocabulary larger than the embedding matrix (or under half of it)."""
    tok = stats.get("tokenization") or {}
    fit = _evidence(stats, "tokenizer_fit") or {}
    unk = tok.get("unknown_token_rate", 0.0)
    problems, severity = [], None
    if unk >= fail_unknown or fit.get("vocab_mismatch"):
        severity = Severity.FAIL
    elif unk >= warn_unknown:
        severity = Severity.WARN
    if severity is None:
        return []
    if unk >= warn_unknown:
        problems.append(f"{unk:.1%} of tokens are the unknown token")
    if fit.get("vocab_mismatch"):
        problems.append(f"the tokenizer has {fit['tokenizer_vocab']} tokens for {fit['embedding_rows']} "
                        "embedding rows")
    return [Finding(
        "tokenizer_mismatch", severity, "Tokenization problem: " + "; ".join(problems) + ".",
        evidence={**tok, **fit},
        cause="The tokenizer saved with the model is not the one it was trained with, or the eval text is "
              "in another language/format than training.",
        fix=Fix("Use the training tokenizer", [
            "Save the tokenizer next to the model (tokenizer.save_pretrained(output_dir)) and load both from the "
            "same folder."]),
    )]


@register("long_inputs_truncated", requires="model", title="Eval texts are longer than the model reads",
          measures="share of rows truncated at the model's maximum input length", severity="warn", collapse=False)
def long_inputs_truncated(stats, *, warn_truncated: float = 0.2):
    """Warn when ``warn_truncated`` of rows or more are cut at the input limit: the model decides from their
    first tokens only. Not a collapse, so it never fails the gate."""
    tok = stats.get("tokenization") or {}
    trunc = tok.get("truncation_rate", 0.0)
    if trunc < warn_truncated or not tok.get("truncated_rows"):
        return []
    limit = tok.get("max_length")
    model_limit = tok.get("model_max_length", limit)
    raise_it = (f"--max-length can raise the cut up to the model's {model_limit} tokens."
                if model_limit and limit and model_limit > limit else
                f"{limit} tokens is the model's own limit (its position embeddings or its tokenizer's), so "
                "--max-length cannot raise it.")
    return [Finding(
        "long_inputs_truncated", Severity.WARN,
        f"{trunc:.0%} of rows ({tok.get('truncated_rows')} of {stats['n']}) are truncated at {limit} tokens: the "
        "model sees only their beginning.",
        evidence={k: tok.get(k) for k in ("truncated_rows", "truncation_rate", "max_length", "model_max_length")},
        cause="The eval texts are longer than the model's input. Where the deciding words come late, every "
              "truncated row is judged on its opening alone.",
        fix=Fix("Read the whole text, as in training", [
            raise_it,
            "For long documents, classify overlapping windows (the tokenizer's stride and "
            "return_overflowing_tokens) and average their probabilities, or keep the head and the tail of each "
            "text; evaluate with the same truncation the model was trained and is served with."]),
    )]


@register("representation_collapse", requires="model", title="The features carry no class information",
          measures="linear probe on the pooled features (class-balanced, stratified k-fold)", severity="fail")
def representation_collapse(stats, *, min_probe_gain: float = 0.1, min_relative_spread: float = 1e-3):
    """Fail when a class-balanced logistic regression on the model's own features stays within
    ``min_probe_gain`` of chance balanced accuracy, or the features' spread across rows is under
    ``min_relative_spread`` of their size: only retraining can help."""
    probe = _evidence(stats, "linear_probe")
    geo = _evidence(stats, "geometry") or {}
    frozen = geo.get("relative_spread") is not None and geo["relative_spread"] < min_relative_spread
    if not probe or (probe["balanced_accuracy"] - probe["chance"] >= min_probe_gain and not frozen):
        return []
    return [Finding(
        "representation_collapse", Severity.FAIL,
        f"A linear probe on the model's features reaches balanced accuracy {probe['balanced_accuracy']:.3f} "
        f"(chance {probe['chance']:.3f}); mean cosine between features {geo.get('anisotropy', float('nan')):.3f}, "
        f"effective rank {geo.get('effective_rank', float('nan')):.1f}, spread across rows "
        f"{geo.get('relative_spread', float('nan')):.1e} of their size.",
        evidence={"linear_probe": probe, "geometry": geo},
        cause="The encoder maps every input to (nearly) the same point: typically a too-high learning rate.",
        fix=fixes.optimization_fix(),
    )]


@register("training_record", requires="model", title="The training record shows a problem",
          measures="trainer_state.json log_history: divergence, spikes, learning rate, evaluation",
          severity="warn", collapse=False)
def training_record(stats, *, max_learning_rate: float = 1e-4):
    """Warn when trainer_state.json shows a diverged or spiking loss, collapsing gradient norms, or a run
    with no evaluation; a peak learning rate of at least ``max_learning_rate`` is named alongside (a high
    rate alone is no problem for a small model trained from scratch)."""
    rec = _evidence(stats, "training_record")
    if not rec:
        return []
    problems = []
    if rec.get("diverged") or rec.get("nan_loss"):
        problems.append(f"the loss diverged (first {rec.get('first_loss')}, last {rec.get('last_loss')}, "
                        f"minimum {rec.get('min_loss')})")
    if rec.get("loss_spikes"):
        problems.append(f"{rec['loss_spikes']} loss spike(s)")
    if rec.get("grad_norm_collapse"):
        problems.append("gradient norms collapsed toward zero")
    if rec.get("evaluations", 0) == 0:
        problems.append("no evaluation during training (no early stopping possible)")
    if not problems:
        return []
    unstable = rec.get("diverged") or rec.get("nan_loss") or rec.get("loss_spikes") or rec.get("grad_norm_collapse")
    if rec.get("max_learning_rate") is not None and rec["max_learning_rate"] >= max_learning_rate:
        problems.append(f"peak learning rate {rec['max_learning_rate']:.2g}")
        unstable = True
    return [Finding("training_record", Severity.WARN, "Training record: " + "; ".join(problems) + ".",
                    evidence=rec,
                    cause="The training arguments: learning rate, warm-up, evaluation and early stopping.",
                    # an unevaluated but stable run needs evaluation, not a lower learning rate
                    fix=fixes.optimization_fix(rec.get("max_learning_rate")) if unstable else fixes.evaluation_fix())]


def checks_selected(only=None, skip=None) -> list[str]:
    """The registered check ids that ``only`` and ``skip`` leave, in registry order."""
    return [c for c in REGISTRY if not (only and c not in only) and not (skip and c in skip)]


GRAD_GROUP_MIN_ROWS = 5  # a sampled group speaks for a class only with this many of its rows measured


def _grad_group(stats, prefer=("ghost:total", "head")):
    """The gradient group the checks read: ghost norms over the whole model when every class with rows has at
    least GRAD_GROUP_MIN_ROWS of them measured (a small --grad-sample falls back), else the head's (every row)."""
    grads = stats.get("gradients") or {}
    support = {c["class"]: c["support"] for c in stats["per_class"]}
    for group in prefer:
        g = grads.get(group)
        if not g or g["n"] == 0:
            continue
        if group == "head" or all(c["n"] >= min(GRAD_GROUP_MIN_ROWS, support.get(c["class"], 0))
                                  for c in g["per_class"]):
            return group, g
    return None, None


@register("gradient_dominated", requires="model", title="Training signal dominated by one class",
          measures="share of per-example gradient-norm mass by class vs share of rows", severity="warn",
          collapse=False)
def gradient_dominated(stats, *, min_mass_share: float = 0.5, min_ratio: float = 2.0):
    """Warn when one class holds at least ``min_mass_share`` of the gradient-norm mass and at least
    ``min_ratio`` times its share of the rows (ghost norms over the encoder when sampled, else the head)."""
    group, g = _grad_group(stats)
    if g is None:
        return []
    hit = [c for c in g["per_class"] if c["mass_share"] is not None and c["example_share"]
           and c["mass_share"] >= min_mass_share and c["mass_share"] >= min_ratio * c["example_share"]]
    estimated = (f", estimated from {min(x['n'] for x in g['per_class'] if x['n'])} or more measured rows per "
                 "class" if g.get("sampled") else "")
    return [Finding(
        "gradient_dominated", Severity.WARN,
        f"'{c['class']}' carries {c['mass_share']:.0%} of the gradient mass ({group}{estimated}) with "
        f"{c['example_share']:.0%} of the rows: training on this data would be driven by it.",
        evidence={"group": group, **c}, classes=[c["class"]],
        cause="The model fits the other classes and gets this one wrong with confidence: its examples produce "
              "the large gradients.",
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    ) for c in hit]


@register("minority_gradient_ratio", requires="model",
          title="Minority classes carry many times the gradient of the majority",
          measures="mean per-example gradient norm of each class / the majority class's", severity="warn",
          collapse=False)
def minority_gradient_ratio(stats, *, max_ratio: float = 5.0, min_support: int = 5):
    """Warn for each class with at least ``min_support`` rows whose mean gradient norm is at least
    ``max_ratio`` times the majority class's: the majority is fitted, the minorities are not."""
    group, g = _grad_group(stats)
    if g is None:
        return []
    hit = [c for c in g["per_class"] if c["ratio_to_majority"] is not None and c["n"] >= min_support
           and c["ratio_to_majority"] >= max_ratio]
    if not hit:
        return []
    majority = stats["majority_baseline"]["class"]
    major = next(c for c in g["per_class"] if c["class"] == majority)
    # the typical row too, or a few rows? medians tell a class that is not fitted from a handful of hard rows
    broad = [c for c in hit if c["median"] is not None and major["median"]
             and c["median"] >= max_ratio * major["median"]]
    detail = listed([f"{c['class']} {c['ratio_to_majority']:.1f}x" for c in _largest_first(hit, "n")], ", ")
    if len(broad) == len(hit):
        cause = ("The majority class's examples are already easy (tiny gradients) while the minority classes' "
                 "are not fitted: the signature of imbalance-driven collapse.")
    else:
        few = listed([c["class"] for c in hit if c not in broad], ", ")
        cause = (f"For {few} the median row's gradient is not large: a few rows (confidently wrong, or "
                 "mislabeled) carry the mean. Look at those rows in predictions.csv before reweighting.")
    return [Finding(
        "minority_gradient_ratio", Severity.WARN,
        f"Mean gradient norm ({group}) relative to the majority class '{majority}': {detail}.",
        evidence={"group": group, "per_class": g["per_class"],
                  "median_ratio": {c["class"]: (c["median"] / major["median"] if c["median"] is not None
                                                and major["median"] else None) for c in hit}},
        classes=[c["class"] for c in hit],
        cause=cause,
        fix=fixes.imbalance_fix(stats, stats.get("model", {}).get("train_counts")),
    )]


@register("vanishing_gradients", requires="model", title="Near-zero gradients everywhere (diverged or saturated run)",
          measures="encoder vs head gradient norm; head gradient norm on misclassified rows", severity="warn",
          collapse=False)
def vanishing_gradients(stats, *, max_encoder_to_head: float = 1e-3, max_head_norm: float = 1e-4,
                        min_error_rate: float = 0.1):
    """Warn when the encoder's mean gradient norm is under ``max_encoder_to_head`` of the head's (the encoder
    no longer learns), or the head's mean norm is under ``max_head_norm`` while at least ``min_error_rate``
    of rows are wrong."""
    grads = stats.get("gradients") or {}
    head = grads.get("head")
    encoder = grads.get("ghost:encoder")
    problems = []
    if head and encoder and head["mean"] and encoder["mean"] is not None \
            and encoder["mean"] < max_encoder_to_head * head["mean"]:
        problems.append(f"the encoder's mean gradient norm {encoder['mean']:.2e} is "
                        f"{encoder['mean'] / head['mean']:.1e} of the head's ({head['mean']:.2e})")
    if head and head["mean"] is not None and head["mean"] < max_head_norm and 1 - stats["accuracy"] >= min_error_rate:
        problems.append(f"the head's mean gradient norm is {head['mean']:.2e} while "
                        f"{1 - stats['accuracy']:.0%} of rows are wrong")
    if not problems:
        return []
    return [Finding(
        "vanishing_gradients", Severity.WARN, "Near-zero gradients: " + "; ".join(problems) + ".",
        evidence={"head": head, "encoder": encoder},
        cause="Saturated activations or a diverged run: further training on this data cannot move the model.",
        fix=fixes.optimization_fix(),
    )]


def run_checks(stats: dict, *, only=None, skip=None, params: dict | None = None) -> list[Finding]:
    """Run the registered checks; ``params`` maps check id to keyword overrides."""
    params = params or {}
    findings: list[Finding] = []
    for check_id in checks_selected(only, skip):
        spec = REGISTRY[check_id]
        try:
            findings.extend(spec.func(stats, **spec.settings(params)))
        except Exception as exc:  # a broken check must not hide the others
            findings.append(Finding(check_id, Severity.ERROR, f"The check crashed: {type(exc).__name__}: {exc}",
                                    evidence={"traceback": traceback.format_exc(limit=3)}))
    order = {s: i for i, s in enumerate([Severity.ERROR, Severity.FAIL, Severity.WARN, Severity.INFO])}
    findings.sort(key=lambda f: order[f.severity])
    return findings
