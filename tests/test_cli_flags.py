"""Command-line flags whose effect is only visible in the numbers: each run through main() on real checkpoints,
with the expected figures computed here from the files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.cli import main

ROOT = Path(__file__).resolve().parents[1]
COLLAPSED = ROOT / "samples" / "models" / "collapsed"
EVAL = ROOT / "samples" / "headlines_eval.csv"
TRAIN = ROOT / "samples" / "headlines_train.csv"


def _summary(tmp_path, *argv, name="r") -> dict:
    out = tmp_path / name
    code = main([*map(str, argv), "--out", str(out), "--quiet", "--format", "json"])
    assert code in (0, 1)
    return json.loads((out / "summary.json").read_text())


def test_train_file_sets_the_class_weights_and_the_prior(tmp_path):
    """--train-file: the class weights of the fix are n / (k * count) of the training labels (90/5/5 here), not
    of the eval set's (60/20/20), and the post-hoc prior is the training one."""
    counts = pd.read_csv(TRAIN)["label"].value_counts()
    names = ["sports", "politics", "business"]
    expected = {c: len(pd.read_csv(TRAIN)) / (3 * counts[c]) for c in names}
    with_train = _summary(tmp_path, COLLAPSED, EVAL, "--train-file", TRAIN, name="with")
    [never] = [f for f in with_train["findings"] if f["check_id"] == "class_never_predicted"]
    assert never["fix"]["values"]["class_weights"] == pytest.approx(expected)
    assert never["fix"]["values"]["weights_from"] == "the training labels (--train-file)"
    posthoc = with_train["stats"]["posthoc"]
    assert posthoc["train_prior"] == pytest.approx([counts[c] / counts.sum() for c in names])
    assert with_train["metadata"]["train_file"] == str(TRAIN)
    eval_counts = pd.read_csv(EVAL)["label"].value_counts()
    without = _summary(tmp_path, COLLAPSED, EVAL, name="without")
    [never] = [f for f in without["findings"] if f["check_id"] == "class_never_predicted"]
    assert never["fix"]["values"]["class_weights"] == pytest.approx(
        {c: eval_counts.sum() / (3 * eval_counts[c]) for c in names})


def test_text_pair_col_feeds_the_second_text_to_the_model(tiny_trained, tmp_path):
    """--text-pair-col: every row is tokenized as a pair (both texts, truncated together to the model's 64
    positions), which the token count shows, and the predictions move."""
    df = pd.read_csv(tiny_trained["eval"])
    df["other"] = df["text"].iloc[::-1].to_numpy()  # another headline; a name not detected as a pair column
    data = tmp_path / "pairs.csv"
    df.to_csv(data, index=False)
    tok = tiny_trained["tokenizer"]
    pair = _summary(tmp_path, tiny_trained["dir"], data, "--text-pair-col", "other", name="pair")
    single = _summary(tmp_path, tiny_trained["dir"], data, name="single")
    limit = pair["stats"]["tokenization"]["max_length"]
    pair_lengths = [len(ids) for ids in tok(df["text"].tolist(), df["other"].tolist())["input_ids"]]
    single_lengths = [len(ids) for ids in tok(df["text"].tolist())["input_ids"]]
    assert pair["stats"]["tokenization"]["tokens"] == sum(min(n, limit) for n in pair_lengths)
    assert single["stats"]["tokenization"]["tokens"] == sum(min(n, limit) for n in single_lengths)
    assert pair["metadata"]["columns"]["text_pair"] == "other" and single["metadata"]["columns"]["text_pair"] is None
    assert pair["stats"]["confusion"] != single["stats"]["confusion"]


def test_pred_col_chooses_which_column_is_judged(tmp_path):
    """--pred-col: of two label columns beside the gold one, the one named is judged (one always 'sports')."""
    gold = pd.read_csv(EVAL)["label"]
    frame = pd.DataFrame({"gold": gold, "pred_right": gold, "pred_sports": "sports"})
    path = tmp_path / "preds.csv"
    frame.to_csv(path, index=False)
    right = _summary(tmp_path, "--predictions", path, "--label-col", "gold", "--pred-col", "pred_right", name="a")
    sports = _summary(tmp_path, "--predictions", path, "--label-col", "gold", "--pred-col", "pred_sports",
                      name="b")
    assert right["verdict"] == "HEALTHY" and right["stats"]["accuracy"] == 1.0
    assert sports["verdict"] == "COLLAPSE"
    assert sports["stats"]["accuracy"] == pytest.approx((gold == "sports").mean())
    confusion = np.asarray(sports["stats"]["confusion"])  # rows gold, columns predicted
    column = sports["stats"]["class_names"].index("sports")
    assert confusion[:, column].sum() == confusion.sum() == len(gold)


def test_label_col_seed_and_threads_reach_the_run(tmp_path):
    """--label-col, --seed and --threads as the run used them (metadata), with the same verdict as the defaults."""
    df = pd.read_csv(EVAL).rename(columns={"label": "topic"})
    data = tmp_path / "topic.csv"
    df.to_csv(data, index=False)
    run = _summary(tmp_path, COLLAPSED, data, "--label-col", "topic", "--seed", "7", "--threads", "1")
    assert run["metadata"]["columns"] == {"text": "text", "text_pair": None, "label": "topic"}
    assert run["metadata"]["seed"] == 7
    assert (run["metadata"]["threads"], run["metadata"]["threads_reason"]) == (1, "--threads")
    assert run["verdict"] == "COLLAPSE" and run["stats"]["n"] == len(df)


def test_the_run_table_shows_values_not_python_reprs(tmp_path):
    """The report's Run table: None as 'none', a table as key: value pairs, a list as its items (it showed
    Python's repr: "None", "{'text': 'text', 'text_pair': None, ...}")."""
    import re

    out = tmp_path / "r"
    assert main([str(COLLAPSED), str(EVAL), "--out", str(out), "--quiet", "--format", "html"]) == 1
    html = (out / "report.html").read_text()
    run = dict(re.findall(r"<tr><th>([a-z_]+)</th><td>(.*?)</td></tr>", html[html.index('<section id="run">'):]))
    assert run["train_file"] == "none" and run["config"] == "none"
    assert run["columns"] == "text: text; label: label"
    assert run["checks_run"].startswith("class_never_predicted, prediction_absorbed, ")
    assert not any(v.startswith(("{", "[")) or v == "None" for v in run.values()), run
