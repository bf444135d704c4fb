"""Statistics against hand-worked numbers, sklearn, and invariances (shuffle, chunk-and-merge)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from collapse_detect import stats as S
from collapse_detect.stats import Accumulator, compute_stats

from helpers import logits_for, stats_for


def _two_class_stats():
    # gold 0: 8 right, 2 called 1; gold 1: 1 called 0, 9 right (n = 20)
    gold = np.array([0] * 10 + [1] * 10)
    pred = np.array([0] * 8 + [1] * 2 + [0] * 1 + [1] * 9)
    acc = Accumulator(["neg", "pos"])
    acc.update(np.arange(20), gold, logits_for(pred, 2, noise=0.3))
    return compute_stats(acc)


def test_hand_worked_two_class_numbers():
    s = _two_class_stats()
    assert s["confusion"] == [[8, 2], [1, 9]]
    assert s["label_prior"] == [0.5, 0.5]
    assert s["prediction_share"] == pytest.approx([0.45, 0.55])
    assert s["total_variation"] == pytest.approx(0.05)
    assert s["accuracy"] == pytest.approx(0.85)
    assert s["balanced_accuracy"] == pytest.approx(0.85)
    per = {c["class"]: c for c in s["per_class"]}
    assert per["neg"]["recall"] == pytest.approx(0.8)
    assert per["pos"]["recall"] == pytest.approx(0.9)
    assert per["neg"]["precision"] == pytest.approx(8 / 9)
    assert per["pos"]["precision"] == pytest.approx(9 / 11)
    assert per["neg"]["f1"] == pytest.approx(16 / 19)  # 2TP / (2TP + FP + FN)
    assert per["pos"]["f1"] == pytest.approx(18 / 21)
    assert s["macro_f1"] == pytest.approx((16 / 19 + 18 / 21) / 2)
    assert s["mcc"] == pytest.approx(70 / math.sqrt(11 * 10 * 10 * 9))
    # chi-square of predicted [9, 11] against expected [10, 10]: (1 + 1) / 10 on 1 dof
    assert s["chi_square"]["statistic"] == pytest.approx(0.2)
    assert s["chi_square"]["p_value"] == pytest.approx(0.654721, abs=1e-6)
    h = -(0.45 * math.log(0.45) + 0.55 * math.log(0.55)) / math.log(2)
    assert s["prediction_entropy"] == pytest.approx(h)
    # Jensen-Shannon distance in bits, from its definition
    m = np.array([0.475, 0.525])
    kl = lambda p: float(np.sum(p * np.log2(p / m)))  # noqa: E731
    assert s["js_distance"] == pytest.approx(math.sqrt(0.5 * kl(np.array([0.45, 0.55])) + 0.5 * kl(np.array([0.5, 0.5]))))
    # majority baseline: ties go to the first class; accuracy 0.5, F1 2p/(1+p) = 2/3 for it
    assert s["majority_baseline"]["accuracy"] == pytest.approx(0.5)
    assert per["neg"]["baseline_f1"] == pytest.approx(2 / 3)
    assert per["neg"]["f1_gain"] == pytest.approx(16 / 19 - 2 / 3)


def test_metrics_match_sklearn_on_rows():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.6, gold, rng.integers(0, 4, 500))
    acc = Accumulator(list("abcd"))
    acc.update(np.arange(500), gold, logits_for(pred, 4, noise=0.4, seed=1))
    s = compute_stats(acc)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(gold, pred))
    assert s["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert s["mcc"] == pytest.approx(skm.matthews_corrcoef(gold, pred))


def test_roc_auc_from_histograms_matches_sklearn():
    rng = np.random.default_rng(0)
    n, k = 2000, 3
    gold = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), gold] += 1.2
    acc = Accumulator(["a", "b", "c"], sample_rows=100)  # a sample that cannot hold every row: histograms
    acc.update(np.arange(n), gold, logits)
    s = compute_stats(acc)
    assert s["roc_auc_source"].startswith("log-odds histograms")
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for c in range(k):
        exact = skm.roc_auc_score(gold == c, probs[:, c])
        assert s["per_class"][c]["roc_auc"] == pytest.approx(exact, abs=2e-3)


def test_roc_auc_is_exact_while_the_sample_holds_every_row():
    # scores that barely move (log-odds steps of 0.005): 0.02-wide histogram bins tie most of them
    rng = np.random.default_rng(4)
    n = 1000
    gold = rng.integers(0, 2, n)
    logits = np.zeros((n, 2))
    logits[:, 0] = rng.integers(0, 8, n) * 0.005 + 0.01 * gold
    exact = [skm.roc_auc_score(gold == c, logits[:, c] - logits[:, 1 - c]) for c in (0, 1)]
    full = Accumulator(["a", "b"])
    full.update(np.arange(n), gold, logits)
    s = compute_stats(full)
    assert s["roc_auc_source"] == "exact: every row"
    assert [c["roc_auc"] for c in s["per_class"]] == pytest.approx(exact, abs=1e-12)
    part = Accumulator(["a", "b"], sample_rows=400)  # the sample cannot hold every row
    part.update(np.arange(n), gold, logits)
    s = compute_stats(part)
    # scores this narrow (log-odds spread under ten 0.02 bins) take the sample's AUC at any row count: the
    # histograms tie most rows (they would give ~0.03 less here)
    assert s["roc_auc_source"] == "the seeded sample of 400 rows (scores too narrow for the histograms' bins)"
    from collapse_detect.stats import auc_from_histograms

    blurred = auc_from_histograms(part.score_hist_pos[0], part.score_hist[0] - part.score_hist_pos[0])
    assert abs(blurred - exact[0]) > 0.01
    assert abs(s["per_class"][0]["roc_auc"] - exact[0]) < abs(blurred - exact[0])


def test_many_classes_keep_the_accumulator_small_and_auc_exact():
    """300 classes, streamed in two merged halves: the accumulator's arrays stay a few MB (a score histogram
    by gold class was k x k x bins, 2 GB here) and every class's one-vs-rest AUC matches sklearn."""
    rng = np.random.default_rng(3)
    n, k = 3000, 300
    gold = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), gold] += 2.0
    names = [f"c{i}" for i in range(k)]
    acc, other = Accumulator(names, sample_rows=100), Accumulator(names, sample_rows=100)  # histograms
    acc.update(np.arange(n // 2), gold[: n // 2], logits[: n // 2])
    other.update(np.arange(n // 2, n), gold[n // 2:], logits[n // 2:])
    acc.merge(other)
    arrays = sum(v.nbytes for v in vars(acc).values() if isinstance(v, np.ndarray))
    assert arrays < 30e6
    s = compute_stats(acc)
    assert s["roc_auc_source"].startswith("log-odds histograms")
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for c in np.unique(gold)[::15]:
        exact = skm.roc_auc_score(gold == c, probs[:, c])
        assert s["per_class"][c]["roc_auc"] == pytest.approx(exact, abs=2e-3)


def test_log_odds_equals_the_definition_without_saturating():
    """log(p_c / (1 - p_c)) = z_c - logsumexp(z_j, j != c), also where p_c rounds to 1 in float64, for tied top
    classes and constant rows; 2 to 300 classes."""
    from scipy.special import logsumexp

    from collapse_detect.stats import log_odds

    rng = np.random.default_rng(0)
    for k in (2, 3, 50, 300):
        z = rng.normal(size=(200, k)) * rng.choice([0.1, 1.0, 100.0], size=(200, 1))
        z[::7, 0] += 800.0  # p_0 = 1 - 1e-348: float64 probabilities saturate here
        z[::11] = 0.0
        z[::13, :2] = 5.0
        want = np.stack([z[:, c] - logsumexp(np.delete(z, c, axis=1), axis=1) for c in range(k)], axis=1)
        got = log_odds(z)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert got[7, 0] > 400 and np.isfinite(got).all()  # log(p / (1 - p)) from rounded p: inf


def test_constant_scores_give_auc_one_half_and_zero_spread():
    acc = Accumulator(["a", "b"])
    acc.update(np.arange(50), np.array([0, 1] * 25), np.tile([[2.0, 0.0]], (50, 1)))
    s = compute_stats(acc)
    assert s["per_class"][0]["roc_auc"] == pytest.approx(0.5)
    assert s["score_spread"] == pytest.approx(0.0, abs=1e-12)
    assert s["prediction_entropy"] == 0.0
    assert s["balanced_accuracy_test"]["gain"] == pytest.approx(0.0)


def test_chi_square_ignores_predictions_of_a_class_absent_from_gold():
    res = S.prediction_chisquare(np.array([5, 5, 10]), np.array([0.5, 0.5, 0.0]))
    assert res["predicted_outside_prior"] == 10
    assert res["statistic"] == pytest.approx(0.0)


def test_class_weights_are_balanced_weights():
    from collapse_detect.fixes import class_weights

    w = class_weights([90, 5, 5])
    assert w == pytest.approx([100 / (3 * 90), 100 / 15, 100 / 15])
    assert np.sum(w * np.array([90, 5, 5])) == pytest.approx(100)


def _stats_of(row_ids, gold, logits, chunks, grad=True):
    accs = []
    for idx in np.array_split(np.arange(len(gold)), chunks):
        acc = Accumulator(["a", "b", "c"], seed=7, sample_rows=50)
        norms = {"head": np.abs(logits[idx, 0]) + gold[idx]} if grad else None
        acc.update(row_ids[idx], gold[idx], logits[idx], features=logits[idx] * 2, grad_norms=norms)
        accs.append(acc)
    total = accs[0]
    for other in accs[1:]:
        total.merge(other)
    return compute_stats(total), total


@settings(max_examples=15, deadline=None)
@given(n=st.integers(10, 300), chunks=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_shuffle_and_chunk_and_merge_give_identical_numbers(n, chunks, seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) * 2
    row_ids = np.arange(n)
    one, acc_one = _stats_of(row_ids, gold, logits, 1)
    perm = rng.permutation(n)
    many, acc_many = _stats_of(row_ids[perm], gold[perm], logits[perm], min(chunks, n))
    assert one["confusion"] == many["confusion"]
    for key in ("label_prior", "prediction_share", "balanced_accuracy", "macro_f1", "mcc",
                "total_variation", "js_distance", "prediction_entropy", "macro_roc_auc"):
        assert one[key] == pytest.approx(many[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(one["per_class"], many["per_class"]):
        for key in ("recall", "precision", "f1", "roc_auc", "score_std", "logodds_std", "mean_confidence"):
            if a[key] is None or b[key] is None:  # undefined (class absent or never predicted) in both
                assert a[key] is None and b[key] is None, key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    assert one["gradients"] == many["gradients"] or _close(one["gradients"], many["gradients"])
    # the seeded sample is the same rows whatever the order and chunking
    assert sorted(acc_one.sample.arrays["row_id"]) == sorted(acc_many.sample.arrays["row_id"])
    assert list(acc_one.sample.arrays["row_id"]) == list(acc_many.sample.arrays["row_id"])


def _close(a, b):
    for group in a:
        for x, y in zip(a[group]["per_class"], b[group]["per_class"]):
            for key, value in x.items():
                if isinstance(value, float):
                    assert value == pytest.approx(y[key], rel=1e-9)
                else:
                    assert value == y[key]
    return True


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=2, max_size=8), st.lists(st.floats(0.01, 10), min_size=2, max_size=8))
def test_distribution_distances_are_bounded_and_zero_only_for_equal_inputs(a, b):
    k = min(len(a), len(b))
    p = np.array(a[:k]) / sum(a[:k])
    q = np.array(b[:k]) / sum(b[:k])
    tv, js = S.total_variation(p, q), S.js_distance(p, q)
    assert 0 <= tv <= 1 and 0 <= js <= 1
    assert S.total_variation(p, p) == pytest.approx(0)
    assert S.js_distance(p, p) == pytest.approx(0, abs=1e-7)
    if np.abs(p - q).max() > 1e-3:
        assert tv > 0 and js > 0
    assert 0 <= S.normalized_entropy(p) <= 1 + 1e-12


def test_balanced_accuracy_test_flags_chance_and_passes_skill():
    chance = S.balanced_accuracy_test([1.0, 0.0, 0.0], [100, 50, 50])
    assert chance["gain"] == pytest.approx(0.0)
    assert chance["p_value"] == pytest.approx(0.5)
    skill = S.balanced_accuracy_test([0.9, 0.85, 0.8], [100, 50, 50])
    assert skill["gain"] == pytest.approx(0.85 - 1 / 3)
    assert skill["p_value"] < 1e-6


def test_plots_of_300_classes_draw_the_largest_and_the_collapsed_onto_class():
    """A figure per class used to grow with the classes (the 300-class confusion matrix was 18,000 pixels a
    side, 9 GB of RSS): now at most 30 classes are drawn, the largest by gold or predicted rows, so a rare class
    the model collapses onto is among them, and the rest are summed into one row and column."""
    import io

    import matplotlib.pyplot as plt

    from collapse_detect.report.plots import _shown, all_plots

    rng = np.random.default_rng(5)
    k = 300
    gold = np.minimum(rng.zipf(1.3, 3000) - 1, k - 1)
    pred = np.full(3000, 241)  # a class with almost no gold rows takes every prediction
    assert (gold == 241).sum() < 5
    stats = stats_for(gold, pred, k)
    ids, note = _shown(stats)
    assert len(ids) == 30 and 241 in ids and 0 in ids
    assert note == "\n30 of 300 classes, largest by gold or predicted rows"
    assert 241 in _shown(stats, limit=12, by="predicted")[0]
    plots = all_plots(stats)
    assert {"prior_vs_predicted.png", "recall_by_class.png", "confusion_matrix.png"} <= set(plots)
    for name, png in plots.items():
        h, w = plt.imread(io.BytesIO(png)).shape[:2]
        assert h <= 2600 and w <= 2600, (name, h, w)
    ids, note = _shown(stats_for(gold % 3, pred % 3, 3))
    assert ids.tolist() == [0, 1, 2] and note == ""


def test_bias_tuning_scores_each_candidate_as_the_full_argmax_would():
    """fit_bias_tuning scores a candidate offset for class c by moving rows only between c and their best
    other class; the offsets equal those of re-running argmax over every class for every candidate (ties
    included: rounded logits, duplicated columns)."""
    from collapse_detect.posthoc import _balanced_accuracy, fit_bias_tuning

    def by_full_argmax(logits, gold, labels, rounds=3, candidates=64):
        k = logits.shape[1]
        offsets = np.zeros(k)
        best = _balanced_accuracy(gold, logits.argmax(1), labels)
        for _ in range(rounds):
            improved = False
            for c in range(k):
                others = np.delete(logits + offsets, c, axis=1).max(axis=1)
                grid = np.unique(np.quantile(others - logits[:, c], np.linspace(0, 1, candidates))) + 1e-6
                for value in grid:
                    trial = offsets.copy()
                    trial[c] = value
                    score = _balanced_accuracy(gold, (logits + trial).argmax(1), labels)
                    if score > best + 1e-12:
                        best, offsets, improved = score, trial, True
            if not improved:
                break
        return offsets - offsets.mean()

    rng = np.random.default_rng(0)
    moved = 0
    for case in range(12):
        k, n = int(rng.integers(2, 9)), int(rng.integers(30, 300))
        gold = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k)) + 2 * rng.normal(size=k)
        if case % 3 == 0:
            logits = np.round(logits, 1)
        if case % 4 == 0:
            logits[:, 1] = logits[:, 0]
        labels = sorted(set(gold.tolist()))
        got = fit_bias_tuning(logits, gold, labels)
        np.testing.assert_array_equal(got, by_full_argmax(logits, gold, labels))
        moved += bool(np.abs(got).max() > 0)
    assert moved >= 10  # the offsets do move in most cases
