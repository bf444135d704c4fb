"""Calibration: ECE with equal-width and equal-mass bins, confidence by class, a fitted temperature, the
reliability diagram and its place in the report."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from collapse_detect import calibration as cal
from collapse_detect.api import RunOptions, judge
from collapse_detect.report.plots import all_plots, reliability_diagram
from collapse_detect.report.render import render_html, render_markdown
from collapse_detect.stats import Accumulator, compute_stats


def _stats(logits, gold, names=("a", "b", "c"), chunks=1):
    acc = Accumulator(list(names))
    for idx in np.array_split(np.arange(len(gold)), chunks):
        part = Accumulator(list(names))
        part.update(idx, gold[idx], logits[idx])
        acc.merge(part)
    return compute_stats(acc)


def _sampled(n=3000, k=3, scale=1.0, seed=0):
    """Gold labels drawn from softmax(z): the true logits z are calibrated; z * scale is not (scale > 1:
    overconfident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    p = softmax(z, axis=1)
    gold = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z * scale, gold


def test_equal_width_ece_by_hand():
    # bin [0.6, 0.667): two rows at 0.65, one right -> |0.5 - 0.65| ; bin [0.933, 1]: one row at 0.95, right
    conf = np.array([0.65, 0.65, 0.95])
    logits = np.log(np.array([[0.65, 0.35], [0.65, 0.35], [0.95, 0.05]]))
    gold = np.array([0, 1, 0])
    s = _stats(logits, gold, names=("a", "b"))
    expected = 2 / 3 * abs(0.5 - 0.65) + 1 / 3 * abs(1.0 - 0.95)
    assert s["calibration"]["ece"] == pytest.approx(expected)
    assert [(b["n"], b["accuracy"]) for b in s["calibration"]["bins"]] == [(2, 0.5), (1, 1.0)]
    assert [b["confidence"] for b in s["calibration"]["bins"]] == pytest.approx([0.65, 0.95])
    assert cal.ece_equal_width([2, 1], [1, 1], [1.3, 0.95]) == pytest.approx(expected)
    assert conf.mean() == pytest.approx(0.75)


def test_equal_mass_bins_hold_equal_counts_and_ece_by_hand():
    conf = np.array([0.9, 0.5, 0.6, 0.8, 0.7, 0.95])
    correct = np.array([1, 0, 1, 1, 0, 1])
    bins = cal.equal_mass_bins(conf, correct, bins=3)
    assert [b["n"] for b in bins] == [2, 2, 2]
    assert [(b["lo"], b["hi"]) for b in bins] == [(0.5, 0.6), (0.7, 0.8), (0.9, 0.95)]
    assert [b["accuracy"] for b in bins] == [0.5, 0.5, 1.0]
    expected = (abs(0.5 - 0.55) + abs(0.5 - 0.75) + abs(1.0 - 0.925)) / 3
    assert cal.ece_from_bins(bins) == pytest.approx(expected)
    assert [b["n"] for b in cal.equal_mass_bins(np.linspace(0, 1, 10), np.ones(10), bins=4)] == [3, 3, 2, 2]
    assert cal.equal_mass_bins(np.empty(0), np.empty(0)) == []


def test_a_calibrated_model_has_small_ece_and_an_overconfident_one_a_large_ece():
    z, gold = _sampled()
    good = _stats(z, gold)["calibration"]
    bad = _stats(z * 3.0, gold)["calibration"]
    assert good["ece"] < 0.03 and good["ece_equal_mass"] < 0.04
    assert bad["ece"] > 0.1 and bad["ece_equal_mass"] > 0.1
    assert good["sample_rows"] == bad["sample_rows"] == 3000


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_the_fitted_temperature_undoes_a_known_scaling(scale):
    z, gold = _sampled(n=4000, scale=scale, seed=1)
    t = cal.fit_temperature(z, gold)
    assert t == pytest.approx(scale, rel=0.12)
    assert cal.nll(z, gold, t) <= cal.nll(z, gold, 1.0) + 1e-12
    # logits known only up to a per-row constant (log-probabilities) give the same temperature
    logp = np.log(softmax(z, axis=1))
    assert cal.fit_temperature(logp, gold) == pytest.approx(t, rel=1e-4)


def test_temperature_in_the_statistics_is_a_measured_suggestion():
    z, gold = _sampled(n=2000, scale=3.0, seed=2)
    temp = _stats(z, gold)["calibration"]["temperature"]
    assert temp["value"] == pytest.approx(3.0, rel=0.15)
    assert temp["nll_after"] < temp["nll_before"]
    assert temp["ece_equal_mass_after"] < 0.05
    assert temp["reading"] == "overconfident: soften the logits" and temp["at_bound"] is False
    assert temp["code"] == (f"probs = torch.softmax(logits / {temp['value']:.3f}, dim=-1)  "
                            "# temperature fitted on 2000 eval rows")


def test_confidence_by_class_compares_mean_confidence_with_accuracy():
    # predicted 'a': 3 rows at confidence 0.9, 2 right -> overconfident by 0.9 - 2/3;
    # predicted 'b': 2 rows at 0.6, both right -> underconfident by 0.4; 'c' never predicted
    probs = np.array([[0.9, 0.05, 0.05]] * 3 + [[0.2, 0.6, 0.2]] * 2)
    gold = np.array([0, 0, 1, 1, 1])
    s = _stats(np.log(probs), gold)
    by = {c["class"]: c for c in s["calibration"]["by_class"]}
    assert by["a"]["mean_confidence"] == pytest.approx(0.9) and by["a"]["accuracy"] == pytest.approx(2 / 3)
    assert by["a"]["gap"] == pytest.approx(0.9 - 2 / 3) and by["a"]["direction"] == "overconfident"
    assert by["b"]["gap"] == pytest.approx(-0.4) and by["b"]["direction"] == "underconfident"
    assert by["c"] == {"class": "c", "predicted": 0, "mean_confidence": None, "accuracy": None, "gap": None,
                       "direction": None}
    assert s["calibration"]["temperature"] is None  # 5 rows are too few to fit one


def test_calibration_does_not_depend_on_chunking():
    z, gold = _sampled(n=1500, scale=2.0, seed=3)
    one, many = _stats(z, gold)["calibration"], _stats(z, gold, chunks=7)["calibration"]
    assert one["bins_equal_mass"] == many["bins_equal_mass"]
    assert one["ece_equal_mass"] == many["ece_equal_mass"]
    assert one["temperature"] == many["temperature"]
    assert one["ece"] == pytest.approx(many["ece"], abs=1e-12)


def test_reliability_diagram_and_the_report_sections():
    z, gold = _sampled(n=600, scale=3.0, seed=4)
    stats = _stats(z, gold)
    stats["model"] = {}
    png = reliability_diagram(stats)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "reliability.png" in all_plots(stats)
    diagnosis = judge(stats, {"model_dir": "m", "data_file": "d"},
                      RunOptions(only=["low_recall", "class_never_predicted"]))
    html = render_html(diagnosis, {})
    c = stats["calibration"]
    assert '<section id="calibration">' in html
    assert f"Expected calibration error <strong>{c['ece']:.3f}</strong>" in html
    assert f"<strong>{c['ece_equal_mass']:.3f}</strong> with 15 equal-mass bins (600 sampled rows)" in html
    assert f"Suggested temperature: <strong>T = {c['temperature']['value']:.3f}</strong>" in html
    assert "<th>predicted class</th>" in html and "overconfident" in html
    md = render_markdown(diagnosis)
    assert (f"- Calibration: ECE {c['ece']:.3f} (equal-width bins), {c['ece_equal_mass']:.3f} (equal-mass bins); "
            f"fitted temperature {c['temperature']['value']:.2f}") in md
    stats["calibration"] = {"available": False, "reason": "labels only"}
    assert reliability_diagram(stats) is None
