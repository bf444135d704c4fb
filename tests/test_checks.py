"""Every check fires on the case it is for and stays silent on a healthy model."""

import numpy as np
import pytest

from collapse_detect.checks import REGISTRY, Severity, run_checks

from helpers import stats_for


def _healthy(seed=0):
    rng = np.random.default_rng(seed)
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    pred = np.where(rng.random(200) < 0.9, gold, rng.integers(0, 3, 200))
    return stats_for(gold, pred, 3, names=["sports", "politics", "business"], noise=1.0)


def _collapsed():
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    pred = np.zeros(200, dtype=int)
    pred[120:122] = 1  # two stray correct politics predictions
    return stats_for(gold, pred, 3, names=["sports", "politics", "business"], noise=1.0)


def _ids(findings, severity=None):
    return {f.check_id for f in findings if severity is None or f.severity is severity}


def test_healthy_model_gets_no_finding():
    assert run_checks(_healthy()) == []


def test_collapsed_model_fires_the_collapse_checks():
    findings = run_checks(_collapsed())
    assert _ids(findings, Severity.FAIL) == {"class_never_predicted", "prediction_absorbed",
                                             "no_better_than_majority"}
    never = next(f for f in findings if f.check_id == "class_never_predicted")
    assert never.classes == ["politics", "business"]
    assert "politics: 2 predicted for 40 gold rows (recall 0.05)" in never.summary
    assert "business: 0 predicted for 40 gold rows (recall 0.00)" in never.summary
    absorbed = next(f for f in findings if f.check_id == "prediction_absorbed")
    assert absorbed.classes == ["sports"]
    assert absorbed.summary.startswith("'sports' gets 99.0% of predictions against a prior of 60.0% (1.65x;")
    assert _ids(findings, Severity.WARN) == {"low_recall"}


def test_class_never_predicted_respects_min_support_and_ratio():
    gold = np.repeat([0, 1, 2], [190, 6, 4])
    pred = np.where(gold == 0, 0, gold)
    pred[190:196] = 0  # class 1: 6 rows, never predicted; class 2: 4 rows (under min_support), all right
    s = stats_for(gold, pred, 3)
    [f] = REGISTRY["class_never_predicted"].func(s)
    assert f.classes == ["c1"]
    assert REGISTRY["class_never_predicted"].func(s, min_support=7) == []


def test_prediction_absorbed_warns_before_it_fails():
    gold = np.repeat([0, 1], [500, 500])
    pred = gold.copy()
    pred[500:680] = 0  # class 0 gets 68% of predictions against a prior of 50%
    s = stats_for(gold, pred, 2)
    [f] = REGISTRY["prediction_absorbed"].func(s)
    assert f.severity is Severity.WARN and f.classes == ["c0"]
    pred[500:760] = 0  # 76%: ratio 1.52, excess 0.26
    [f] = REGISTRY["prediction_absorbed"].func(stats_for(gold, pred, 2))
    assert f.severity is Severity.FAIL


def test_no_better_than_majority_fires_on_a_coin_flip_and_not_on_skill():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 400)
    coin = rng.integers(0, 2, 400)
    [f] = REGISTRY["no_better_than_majority"].func(stats_for(gold, coin, 2))
    assert f.severity is Severity.FAIL
    assert f.evidence["test"]["gain"] < 0.1
    good = np.where(rng.random(400) < 0.8, gold, 1 - gold)
    assert REGISTRY["no_better_than_majority"].func(stats_for(gold, good, 2)) == []


def test_no_better_than_majority_names_the_criterion_it_failed():
    # 2 of 3 classes right on 2 rows each: +0.333 over 1/3, but p = 0.014 on 6 rows (alpha 0.01)
    gold = np.repeat([0, 1, 2], 2)
    pred = np.array([0, 0, 1, 1, 1, 1])
    [f] = REGISTRY["no_better_than_majority"].func(stats_for(gold, pred, 3))
    assert f.evidence["test"]["gain"] == pytest.approx(1 / 3) and 0.01 < f.evidence["test"]["p_value"] < 0.02
    assert f.evidence["underpowered"] is True
    assert "but not significantly on 6 rows (z = 2.2, p = 0.014; needs p < 0.01)" in f.summary
    assert REGISTRY["no_better_than_majority"].func(stats_for(gold, pred, 3), alpha=0.05) == []
    # a gain under min_gain is named as such
    [f] = REGISTRY["no_better_than_majority"].func(stats_for(gold, pred, 3), min_gain=0.4)
    assert f.evidence["underpowered"] is False and "; needs at least +0.4)" in f.summary


def test_constant_output_separates_constant_from_ranked_scores():
    gold = np.repeat([0, 1, 2], [60, 20, 20])
    pred = np.zeros(100, dtype=int)
    constant = stats_for(gold, pred, 3, noise=0.0)
    [f] = REGISTRY["constant_output"].func(constant)
    assert f.evidence["score_spread"] == pytest.approx(0.0, abs=1e-9)
    # same argmax everywhere, but scores that vary with the input: a threshold collapse, not constant output
    varying = stats_for(gold, pred, 3, noise=1.5, margin=1.0)
    assert REGISTRY["constant_output"].func(varying) == []


def test_an_under_confident_model_whose_small_moves_rank_the_classes_is_not_constant():
    # log-odds that move by ~0.03 but in the direction of the gold class: macro ROC-AUC near 1
    from collapse_detect.stats import Accumulator, compute_stats

    rng = np.random.default_rng(0)
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    logits = np.tile([1.0, 0.0, -0.5], (200, 1)) + rng.normal(0, 0.01, (200, 3))
    logits[np.arange(200), gold] += 0.05
    acc = Accumulator(["a", "b", "c"])
    acc.update(np.arange(200), gold, logits)
    s = compute_stats(acc)
    assert s["score_spread"] < 0.1 and s["macro_roc_auc"] > 0.95 and s["roc_auc_source"] == "exact: every row"
    assert REGISTRY["constant_output"].func(s) == []
    assert REGISTRY["constant_output"].func(s, max_auc=1.01)  # the spread alone would have called it constant


def test_low_recall_floor_is_a_threshold():
    gold = np.repeat([0, 1], [50, 50])
    pred = gold.copy()
    pred[50:80] = 0  # class 1 recall 0.4
    s = stats_for(gold, pred, 2)
    [f] = REGISTRY["low_recall"].func(s)
    assert f.classes == ["c1"] and f.evidence["c1"]["recall"] == pytest.approx(0.4)
    assert REGISTRY["low_recall"].func(s, floor=0.4) == []


def test_generic_label_names_is_info_and_does_not_gate():
    s = _healthy()
    s["model"] = {"generic_label_names": True}
    [f] = run_checks(s)
    assert f.check_id == "generic_label_names" and f.severity is Severity.INFO
    assert REGISTRY["generic_label_names"].collapse is False


def test_a_crashing_check_becomes_an_error_finding_and_others_still_run(monkeypatch):
    def boom(stats):
        raise RuntimeError("bad state")

    monkeypatch.setitem(REGISTRY, "boom", REGISTRY["low_recall"].__class__("boom", boom, "t", "m", "fail", True))
    findings = run_checks(_collapsed())
    err = [f for f in findings if f.severity is Severity.ERROR]
    assert [f.check_id for f in err] == ["boom"]
    assert err[0].summary == "The check crashed: RuntimeError: bad state"
    assert "class_never_predicted" in _ids(findings)


def test_a_crashed_check_fails_the_gate_of_a_healthy_model(monkeypatch):
    """A gate that could not look must not pass: a crashed non-collapse check alone makes the verdict COLLAPSE
    and the exit code 1, under --fail-on fail and warn alike."""
    from collapse_detect.api import RunOptions, judge

    def boom(stats):
        raise KeyError("per_class")

    healthy = judge(_healthy(), {}, RunOptions())
    assert healthy.verdict() == "HEALTHY" and healthy.exit_code() == 0
    monkeypatch.setitem(REGISTRY, "boom", REGISTRY["low_recall"].__class__("boom", boom, "t", "m", "warn", False))
    crashed = judge(_healthy(), {}, RunOptions())
    assert [f.check_id for f in crashed.findings if f.severity is Severity.ERROR] == ["boom"]
    assert crashed.verdict() == "COLLAPSE" and crashed.exit_code() == 1
    assert crashed.exit_code("warn") == 1


def test_thresholds_are_documented_keyword_defaults():
    assert REGISTRY["low_recall"].defaults == {"floor": 0.5, "min_support": 5}
    assert REGISTRY["class_never_predicted"].defaults == {"min_support": 5, "max_share_ratio": 0.1}
    for spec in REGISTRY.values():
        assert spec.func.__doc__, spec.check_id


def test_fix_for_collapse_names_computed_class_weights():
    never = next(f for f in run_checks(_collapsed()) if f.check_id == "class_never_predicted")
    weights = never.fix.values["class_weights"]
    assert weights == pytest.approx({"sports": 200 / (3 * 120), "politics": 200 / 120, "business": 200 / 120})
    assert "CLASS_WEIGHTS = [0.5556, 1.667, 1.667]" in never.fix.code


def test_many_classes_keep_summaries_and_the_terminal_short():
    """300 classes, all rows predicted as one rare class: each summary names at most 10 classes (the largest
    first) and says how many more; the evidence keeps all of them; the terminal shows 30 classes and says so."""
    from collapse_detect.api import RunOptions, judge
    from collapse_detect.checks import listed
    from collapse_detect.report.render import render_terminal

    assert listed(["a", "b", "c"], ", ", limit=2) == "a, b, and 1 more"
    assert listed(["a", "b"], "; ", limit=2) == "a; b"
    rng = np.random.default_rng(5)
    gold = np.minimum(rng.zipf(1.3, 3000) - 1, 299)
    stats = stats_for(gold, np.full(3000, 241), 300)
    never = next(f for f in run_checks(stats) if f.check_id == "class_never_predicted")
    hit = len(never.evidence)
    assert hit > 10 and never.summary.endswith(f"and {hit - 10} more.")
    named = [part.split(":")[0] for part in never.summary.split(": ", 1)[1].split("; ")[:10]]
    support = {c["class"]: c["support"] for c in stats["per_class"]}
    assert [support[n] for n in named] == sorted((support[n] for n in never.evidence), reverse=True)[:10]
    text = render_terminal(judge(stats, {}, RunOptions()), None)
    table = [line for line in text.splitlines() if line.startswith("  c") and not line.startswith("  class")]
    assert len(table) == 30 and any(line.split()[0] == "c241" for line in table)
    assert "(30 of 300 classes, the largest by gold or predicted rows;" in text


def test_truncation_is_its_own_warning_and_never_gates():
    from collapse_detect.diagnosis import Diagnosis

    s = _healthy()
    s["tokenization"] = {"max_length": 512, "model_max_length": 512, "truncated_rows": 72, "truncation_rate": 0.36,
                         "unknown_token_rate": 0.0}
    [f] = REGISTRY["long_inputs_truncated"].func(s)
    assert f.severity is Severity.WARN
    assert f.summary == "36% of rows (72 of 200) are truncated at 512 tokens: the model sees only their beginning."
    assert f.fix.steps[0].startswith("512 tokens is the model's own limit")
    assert REGISTRY["tokenizer_mismatch"].func(s) == []  # long texts say nothing about the tokenizer
    d = Diagnosis(run_checks(s), s, {})
    assert d.verdict("warn") == "WARNINGS" and d.exit_code("warn") == 0  # a warning, even with --fail-on warn
    s["tokenization"].update(max_length=128, truncation_rate=0.1)
    assert REGISTRY["long_inputs_truncated"].func(s) == []
    zero = {**s, "tokenization": {**s["tokenization"], "truncated_rows": 0, "truncation_rate": 0.0}}
    assert REGISTRY["long_inputs_truncated"].func(zero, warn_truncated=0.0) == []  # nothing cut, nothing to say
    [f] = REGISTRY["long_inputs_truncated"].func(s, warn_truncated=0.1)
    assert f.fix.steps[0] == "--max-length can raise the cut up to the model's 512 tokens."


def test_a_stable_run_without_evaluation_is_told_to_evaluate_not_to_lower_its_rate():
    s = _healthy()
    s["evidence"] = {"training_record": {"evaluations": 0, "max_learning_rate": 4.6e-5, "diverged": False}}
    [f] = REGISTRY["training_record"].func(s)
    assert f.summary == "Training record: no evaluation during training (no early stopping possible)."
    assert f.fix.title == "Evaluate during training and keep the best checkpoint"
    assert "learning rate" not in " ".join(f.fix.steps)
    s["evidence"]["training_record"].update(loss_spikes=3)
    [f] = REGISTRY["training_record"].func(s)
    assert f.fix.steps[0].startswith("The run peaked at a learning rate of 4.6e-05, within the usual 1e-5 to 5e-5")


def test_an_uncertain_root_cause_still_shows_its_best_scored_candidates():
    from collapse_detect.diagnosis import Diagnosis
    from collapse_detect.report.render import render_html, render_terminal

    s = _collapsed()
    d = Diagnosis(run_checks(s), s, {})
    scored = [{"cause": c, "label": label, "score": score} for c, label, score in
              [("class_imbalance", "class imbalance", 0.3), ("input_ignored", "input ignored", 0.2),
               ("untrained_head", "untrained head", 0.1), ("tokenizer_mismatch", "tokenizer", 0.0)]]
    d.root_cause = {"cause": "uncertain", "label": "no single cause stands out: the evidence is weak",
                    "confidence": "low", "score": 0.3, "evidence_for": [], "evidence_against": [],
                    "candidates": scored}
    terminal = render_terminal(d, None)
    assert ("likely cause: no single cause stands out: the evidence is weak (confidence low; best scored: class "
            "imbalance (0.30))") in terminal
    html = render_html(d, {})
    assert "Best scored candidates: class imbalance (0.30); input ignored (0.20); untrained head (0.10)" in html
    d.root_cause = {**scored[0], "confidence": "medium", "evidence_for": [], "evidence_against": [],
                    "candidates": scored}
    assert "Other candidates: input ignored (0.20); untrained head (0.10); tokenizer (0.00)" in render_html(d, {})


def _posthoc(before, after, ci, best="bias_tuning"):
    return {"rows": 200, "folds": 5, "labels": [0, 1, 2], "prior_source": "the eval labels", "best": best,
            "before": {"recall": [1.0, 0.0, 0.0], "balanced_accuracy": before},
            "methods": {best: {"recall": [0.9, 0.9, 0.9], "balanced_accuracy": after, "balanced_accuracy_ci": ci}},
            "offsets": [-2.0, 1.0, 1.0], "gain": after - before, "caveat": "measured on held-out folds"}


def test_a_large_measured_post_hoc_gain_counts_whatever_the_auc():
    from collapse_detect.rootcause import infer_root_cause

    s = _collapsed()
    s["macro_roc_auc"] = 0.72  # one class's score alone ranks poorly ...
    s["posthoc"] = _posthoc(0.33, 0.90, [0.87, 0.93])  # ... yet shifting the logits fixes the argmax
    [f] = REGISTRY["threshold_collapse"].func(s)
    assert f.summary.startswith("Each class's score alone ranks poorly (macro ROC-AUC 0.720), yet bias tuning "
                                "raises held-out balanced accuracy from 0.330 to 0.900 (95% CI 0.870-0.930)")
    cause = infer_root_cause(s, collapsed=True)
    assert cause["cause"] == "class_imbalance"
    assert any("a post-hoc shift of the logits alone (bias tuning) raises held-out balanced accuracy from 0.33 "
               "to 0.90" in e for e in cause["evidence_for"])
    assert not any("ranking is damaged" in e for e in cause["evidence_against"])
    # a gain the interval does not separate from the start, or under min_measured_gain, is not enough
    s["macro_roc_auc"] = 0.92  # a good AUC, though the gain is read under the measured-gain rule: said as good
    [f] = REGISTRY["threshold_collapse"].func(s, min_gain=0.7)
    assert f.summary.startswith("The scores still rank the classes (macro ROC-AUC 0.920); bias tuning raises")
    s["macro_roc_auc"] = 0.72
    s["posthoc"] = _posthoc(0.33, 0.60, [0.30, 0.80])
    assert REGISTRY["threshold_collapse"].func(s) == []
    s["posthoc"] = _posthoc(0.33, 0.50, [0.45, 0.55])
    assert REGISTRY["threshold_collapse"].func(s) == []
    assert REGISTRY["threshold_collapse"].func(s, min_measured_gain=0.1)
    cause = infer_root_cause(s, collapsed=True)
    assert any("ranking is damaged" in e for e in cause["evidence_against"])


def test_a_confident_other_cause_leaves_class_weights_out_of_the_fixes():
    from collapse_detect import fixes
    from collapse_detect.diagnosis import Diagnosis
    from collapse_detect.report.render import ordered_fixes, render_markdown

    s = _collapsed()
    d = Diagnosis(run_checks(s), s, {})
    assert {f.fix.title for f in d.findings if f.fix} == {fixes.IMBALANCE_FIX_TITLE}
    rc = {"cause": "diverged_optimization", "label": "too high a learning rate", "score": 0.9, "confidence": "high",
          "evidence_for": [], "evidence_against": [], "fix": fixes.optimization_fix(5e-3).to_dict()}
    d.root_cause = rc
    assert [f.title for f in ordered_fixes(d)] == ["Retrain with a smaller learning rate and warm-up"]
    md = render_markdown(d)
    assert "## Fix: Retrain with a smaller learning rate and warm-up" in md
    assert f"## Fix: {fixes.IMBALANCE_FIX_TITLE}" not in md
    assert f"  - Fix: {fixes.IMBALANCE_FIX_TITLE}" in md  # each finding still names its own fix
    for confidence in ("medium", "low"):  # not sure of the other cause: class weights stay, second
        d.root_cause = {**rc, "confidence": confidence}
        assert [f.title for f in ordered_fixes(d)] == ["Retrain with a smaller learning rate and warm-up",
                                                       fixes.IMBALANCE_FIX_TITLE]
        assert f"## Fix: {fixes.IMBALANCE_FIX_TITLE}" in render_markdown(d)


def test_the_root_cause_fix_is_shown_in_its_own_words():
    # constant_output carries the generic learning-rate fix; the root cause's names the run's peak rate
    from collapse_detect import fixes
    from collapse_detect.diagnosis import Diagnosis
    from collapse_detect.report.render import ordered_fixes

    s = _collapsed()
    findings = run_checks(s)
    findings[0].fix = fixes.optimization_fix()
    d = Diagnosis(findings, s, {})
    d.root_cause = {"cause": "diverged_optimization", "label": "diverged", "score": 0.9, "confidence": "high",
                    "evidence_for": [], "evidence_against": [], "fix": fixes.optimization_fix(8.9e-3).to_dict()}
    [shown] = ordered_fixes(d)
    assert shown.steps[0].startswith("The run peaked at a learning rate of 0.0089, above the 1e-5 to 5e-5")


def test_warm_up_is_read_from_the_log_only_where_it_can_be():
    from collapse_detect.analysis import training_record

    def log(steps_and_rates):
        return {"log_history": [{"step": s, "loss": 1.0, "learning_rate": lr} for s, lr in steps_and_rates]}

    assert training_record(log([(10, 1e-6), (20, 2e-5), (30, 1.5e-5)]))["warmup"] is True
    assert training_record(log([(1, 2e-5), (20, 1.8e-5)]))["warmup"] is False
    # first logged at step 500, already at the peak: a warm-up over the first 100 steps would look the same
    record = training_record(log([(500, 2e-5), (1000, 1e-5)]))
    assert record["warmup"] is None and record["max_learning_rate"] == 2e-5
