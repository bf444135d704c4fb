"""--predictions: judge precomputed predictions (any framework) without a model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from collapse_detect.checks import REGISTRY
from collapse_detect.cli import main
from collapse_detect.outputs import MANIFEST
from collapse_detect.predictions import MODEL_ONLY_PARTS
from collapse_detect.stats import Accumulator, compute_stats

NAMES = ["sports", "politics", "business"]


def _probs_frame(seed=0, n=300, signal=2.0):
    rng = np.random.default_rng(seed)
    gold = rng.choice(3, n, p=[0.6, 0.2, 0.2])
    logits = rng.normal(0.0, 1.0, (n, 3))
    logits[np.arange(n), gold] += signal
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"row_id": np.arange(n), "gold": [NAMES[g] for g in gold],
                          "predicted": [NAMES[p] for p in probs.argmax(1)]})
    for c, name in enumerate(NAMES):
        frame[f"prob_{name}"] = probs[:, c]
    return frame, gold, probs


def _judge(tmp_path, path, *extra, fmt="json"):
    out = tmp_path / "out"
    code = main(["--predictions", str(path), "--out", str(out), "--quiet", "--format", fmt, *extra])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return code, summary


def _error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.fixture(autouse=True)
def _away_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_probabilities_give_the_statistics_of_the_same_logits(tmp_path):
    frame, gold, probs = _probs_frame()
    frame.to_csv(tmp_path / "preds.csv", index=False)
    code, summary = _judge(tmp_path, tmp_path / "preds.csv")
    acc = Accumulator(NAMES)
    acc.update(np.arange(len(gold)), gold, np.log(probs))
    expected = compute_stats(acc)
    stats = summary["stats"]
    assert code == 0 and summary["verdict"] == "HEALTHY"
    assert stats["confusion"] == expected["confusion"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "mean_nll"):
        assert stats[key] == pytest.approx(expected[key], abs=1e-6), key
    assert stats["calibration"]["ece"] == pytest.approx(expected["calibration"]["ece"], abs=1e-6)
    assert stats["calibration"]["temperature"]["value"] > 0
    meta = summary["metadata"]
    assert meta["mode"] == "predictions" and meta["scores"] == "probabilities"
    assert meta["columns"] == {"label": "gold", "probabilities": [f"prob_{n}" for n in NAMES], "predicted": None}
    assert set(MODEL_ONLY_PARTS) <= set(meta["not_run"])
    assert meta["not_run"]["gradient_norms"] == "needs the model's weights"
    model_only = [c for c, spec in REGISTRY.items() if spec.requires == "model"]
    assert {"input_ignored", "untrained_head", "tokenizer_mismatch", "representation_collapse",
            "generic_label_names"} <= set(model_only)
    for check_id in model_only:
        assert check_id not in meta["checks_run"]
        assert meta["not_run"][check_id] == "needs the model"
    assert {"class_never_predicted", "prediction_absorbed", "no_better_than_majority", "constant_output",
            "low_recall", "label_mapping_mismatch"} <= set(meta["checks_run"])
    assert "gradients" not in stats and "tokenization" not in stats
    assert "Predictions are the argmax of the prob_<class> columns; column 'predicted' was not read." in meta["notes"]


def test_labels_only_marks_the_score_statistics_unavailable(tmp_path):
    gold = np.repeat([0, 1, 2], [60, 20, 20])
    pred = gold.copy()
    pred[60:80] = 0  # politics always predicted as sports
    pd.DataFrame({"label": gold, "prediction": pred}).to_json(tmp_path / "preds.jsonl", orient="records",
                                                              lines=True)
    code, summary = _judge(tmp_path, tmp_path / "preds.jsonl")
    stats, meta = summary["stats"], summary["metadata"]
    assert code == 1 and summary["collapsed_classes"] == ["1"]  # integer labels: classes named by id
    assert stats["class_names"] == ["0", "1", "2"]
    assert [c["recall"] for c in stats["per_class"]] == [1.0, 0.0, 1.0]
    assert stats["scores_available"] is False
    assert stats["macro_roc_auc"] is None and stats["score_spread"] is None
    assert [c["roc_auc"] for c in stats["per_class"]] == [None, None, None]
    assert stats["calibration"] == {"available": False, "reason":
                                    "preds.jsonl holds predicted labels only (column 'prediction'), no probabilities"}
    assert "constant_output" not in meta["checks_run"] and "threshold_collapse" not in meta["checks_run"]
    assert meta["not_run"]["constant_output"] == "needs per-class probabilities"
    assert meta["scores"] == "predicted labels only"


def test_labels_only_html_and_markdown_say_what_was_not_run(tmp_path):
    pd.DataFrame({"gold": ["a", "b", "a", "b"] * 10, "predicted": ["a"] * 40}).to_csv(tmp_path / "p.csv",
                                                                                     index=False)
    code, _ = _judge(tmp_path, tmp_path / "p.csv", fmt="html,md,json,png")
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "summary.md").read_text()
    assert code == 1
    assert "Predictions <code>" in html and "no model was run" in html
    assert "Not run: gradient_norms (needs the model&#39;s weights)" in html
    assert "<h2>Calibration</h2><p class=\"muted\">Not available: p.csv holds predicted labels only" in html
    assert "- Predictions: `" in md and "predicted labels only; no model was run" in md
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "confusion_matrix.png", "prior_vs_predicted.png", "recall_by_class.png"]


def test_parquet_and_label_names_rename_the_probability_columns(tmp_path):
    frame, gold, probs = _probs_frame(seed=1)
    frame = frame.rename(columns={f"prob_{n}": f"prob_{i}" for i, n in enumerate(NAMES)})
    frame["gold"] = gold  # ids
    frame.drop(columns=["predicted", "row_id"]).to_parquet(tmp_path / "p.parquet")
    code, summary = _judge(tmp_path, tmp_path / "p.parquet", "--label-names", "sports,politics,business")
    assert summary["stats"]["class_names"] == NAMES
    assert summary["stats"]["confusion"] == np.histogram2d(gold, probs.argmax(1), bins=[3, 3])[0].astype(int).tolist()


def test_a_model_runs_predictions_csv_rejudged_gives_the_same_verdict_and_numbers(collapsed_report, tmp_path):
    out = collapsed_report["out"]
    first = json.loads((out / "summary.json").read_text())
    code, again = _judge(tmp_path, out / "predictions.csv")
    assert code == collapsed_report["code"] == 1
    assert again["verdict"] == first["verdict"] == "COLLAPSE"
    assert again["collapsed_classes"] == first["collapsed_classes"] == ["politics", "business"]
    assert again["stats"]["confusion"] == first["stats"]["confusion"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "top_share"):
        assert again["stats"][key] == first["stats"][key]
    # float32 probabilities written to their full precision: the score statistics agree closely
    assert again["stats"]["mean_nll"] == pytest.approx(first["stats"]["mean_nll"], rel=1e-7)
    assert again["stats"]["calibration"]["ece"] == pytest.approx(first["stats"]["calibration"]["ece"], abs=1e-7)
    # and the post-hoc fix ranks the methods as the model's logits did
    assert again["stats"]["posthoc"]["best"] == first["stats"]["posthoc"]["best"]
    assert again["stats"]["posthoc"]["train_prior"] == pytest.approx(first["stats"]["posthoc"]["train_prior"],
                                                                      rel=1e-7)
    same_checks = set(again["metadata"]["checks_run"])
    assert {f["check_id"] for f in again["findings"]} == {f["check_id"] for f in first["findings"]} & same_checks


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"gold": ["a", "b"], "score": [0.1, 0.2]}),
     "'{p}' has neither prob_<class> probability columns nor a predicted-label column (looked for predicted, "
     "prediction, pred, predicted_label, ...); its columns are: gold, score; pass --pred-col"),
    (pd.DataFrame({"text": ["x", "y"], "predicted": ["a", "b"]}),
     "'{p}': no gold label column found (looked for gold, label, labels, y_true, true_label, ...); its columns "
     "are: text, predicted; pass --label-col"),
    (pd.DataFrame({"gold": ["a", "b"], "prob_a": [2.5, -1.0], "prob_b": [0.1, 0.2]}),
     "'{p}': prob_a = 2.5 at row_id 0 (a 0-based data row, as in predictions.csv) is not a probability in [0, 1]; "
     "if these are logits, apply softmax first"),
    (pd.DataFrame({"gold": ["a", "b"], "prob_a": [0.5, 0.2], "prob_b": [0.5, 0.3]}),
     "'{p}': the probabilities at row_id 1 (a 0-based data row, as in predictions.csv) sum to 0.5, not 1; write "
     "one prob_<class> column for every class, each row a distribution"),
    (pd.DataFrame({"gold": ["a", "c"], "prob_a": [0.5, 0.2], "prob_b": [0.5, 0.8]}),
     "'{p}': column 'gold' has labels the model does not know: 'c'; the model's classes are: a, b (or ids 0..1); "
     "pass --label-names to name the model's ids in order, or --label-col"),
    (pd.DataFrame({"gold": ["a", "a"], "predicted": ["a", "a"]}),
     "'{p}': the gold and predicted labels hold one class only (a); pass --label-names to name every class "
     "the model has"),
])
def test_bad_prediction_files_are_one_line_errors(tmp_path, capsys, frame, message):
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    code, _ = _judge(tmp_path, path)
    assert code == 2
    assert _error_line(capsys) == "Error: " + message.format(p=path)


def test_model_dir_and_data_are_optional_only_with_predictions(tmp_path, capsys):
    assert main([]) == 2
    assert _error_line(capsys) == ("Error: MODEL_DIR and DATA are required (or pass --predictions FILE to judge "
                                   "saved predictions without a model) (see collapse-detect --help)")
    assert main(["model_dir"]) == 2
    capsys.readouterr()
    assert main(["model_dir", "eval.csv", "--predictions", "p.csv"]) == 2
    assert _error_line(capsys) == ("Error: --predictions judges saved predictions without a model; drop MODEL_DIR "
                                   "and DATA (got 'model_dir eval.csv') (see collapse-detect --help)")
    pd.DataFrame({"gold": ["a", "b"], "predicted": ["a", "b"]}).to_csv(tmp_path / "p.csv", index=False)
    assert main(["--predictions", str(tmp_path / "p.csv"), "--write-fixed", str(tmp_path / "fixed")]) == 2
    assert _error_line(capsys) == "Error: --write-fixed needs a model; it cannot be used with --predictions"


def test_predictions_mode_does_not_import_torch(tmp_path):
    frame, _, _ = _probs_frame(n=60)
    frame.to_csv(tmp_path / "p.csv", index=False)
    code = ("import sys; from collapse_detect.cli import main; "
            f"rc = main(['--predictions', {str(tmp_path / 'p.csv')!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--quiet', '--format', 'json,md,html']); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.split() == ["0", "False", "False"], done.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [MANIFEST, "report.html", "summary.json",
                                                                  "summary.md"]
