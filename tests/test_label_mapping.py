"""Gold labels onto class ids: numeric class names, true/false labels, distinct columns, --label-names, row ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.cli import main
from collapse_detect.data import LabelMapper, check_label_names, detect_columns, iter_chunks
from collapse_detect.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = ROOT / "samples" / "models" / "healthy"
EVAL = ROOT / "samples" / "headlines_eval.csv"
NAMES = ["sports", "politics", "business"]


def _map(class_names, values):
    return LabelMapper(class_names, "d.csv", "label")(pd.Series(values), np.arange(len(values))).tolist()


def _gold(path, class_names, **columns):
    _, chunks = iter_chunks(path, class_names, **columns)
    return np.concatenate([chunk.gold for chunk in chunks]).tolist()


# ------------------------------------------------------------------ class names that are numbers


def test_integer_labels_are_numeric_class_names_not_ids():
    stars = ["1", "2", "3"]
    assert _map(stars, [1, 2, 3]) == [0, 1, 2]
    assert _map(stars, [1, 2, 1]) == [0, 1, 0]  # without a 3 in the column: still names, not shifted ids
    assert _map(stars, [3.0, "2", " 1 ", np.int64(3)]) == [2, 1, 0, 2]
    assert _map(["-1", "0", "1"], [-1, 0, 1, 1]) == [0, 1, 2, 2]
    assert _map(["2", "0", "1"], [0, 1, 2]) == [1, 2, 0]


def test_numeric_class_names_from_a_csv_column(tmp_path):
    path = tmp_path / "stars.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [5, 1, 3, 5]}).to_csv(path, index=False)
    assert _gold(path, ["1", "2", "3", "4", "5"]) == [4, 0, 2, 4]


def test_an_id_is_not_a_numeric_class_name():
    with pytest.raises(InputError) as err:
        _map(["1", "2", "3"], [1, 2, 0])
    assert str(err.value) == (
        "'d.csv': column 'label' has labels the model does not know: 0; the model's classes are: 1, 2, 3 (its "
        "class names include numbers, so integer labels are matched by name, not as ids); pass --label-names to "
        "rename the model's ids in order (e.g. --label-names 0,1,2 when the data holds ids), or --label-col")
    assert "(or ids" not in str(err.value)


def test_partly_numeric_class_names_match_integers_by_name_only():
    # "1" is class 0 here: reading the label 1 as id 1 ("2") would shift it, so integers go by name only
    assert _map(["1", "2", "neutral"], [1, 2, "neutral", "1"]) == [0, 1, 2, 0]
    with pytest.raises(InputError, match="does not know: 0; .*include numbers"):
        _map(["1", "2", "neutral"], [0, 1])


def test_names_that_are_not_integers_keep_names_then_ids():
    assert _map(NAMES, [0, 2, "1", "business", 1.0]) == [0, 2, 1, 2, 1]
    assert _map(["01", "02"], [0, 1, "1"]) == [0, 1, 1]  # "01" is not written canonically: ids as before
    with pytest.raises(InputError, match=r"does not know: 3; the model's classes are: sports, politics, "
                                         r"business \(or ids 0\.\.2\)"):
        _map(NAMES, [0, 3])


# ------------------------------------------------------------------ true/false labels


def test_true_false_labels_match_class_names_never_ids(tmp_path):
    assert _map(["True", "False"], [True, False, np.bool_(True)]) == [0, 1, 0]
    path = tmp_path / "bool.csv"
    path.write_text("text,label\na,true\nb,false\nc,TRUE\n")
    assert _gold(path, ["false", "true"]) == [1, 0, 1]
    assert _gold(path, ["TRUE", "FALSE"]) == [0, 1, 0]


def test_true_false_labels_without_such_class_names_are_unknown(tmp_path):
    path = tmp_path / "bool.csv"
    path.write_text("text,label\na,true\nb,false\n")
    with pytest.raises(InputError) as err:
        _gold(path, NAMES)
    assert str(err.value) == (
        f"{str(path)!r}: column 'label' has labels the model does not know: 'true', 'false'; true/false labels are "
        "matched to class names, never taken as ids; the model's classes are: sports, politics, business (or ids "
        "0..2); pass --label-names to name the model's ids in order, or --label-col")
    with pytest.raises(InputError, match="does not know: True"):
        _map(["0", "1"], [True])


def test_true_false_labels_through_the_cli_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "bool.csv"
    frame = pd.read_csv(EVAL)
    frame.assign(label=frame["label"].eq("sports")).to_csv(data, index=False)
    code = main([str(HEALTHY), str(data), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "labels the model does not know: 'False', 'True'" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ columns


@pytest.mark.parametrize("flags, message", [
    ({"text_col": "label"}, "column 'label' cannot be both the text column (--text-col) and the label column "
                            "(--label-col); pass a different --text-col or --label-col"),
    ({"text_col": "body", "label_col": "body"}, "column 'body' cannot be both the text column (--text-col) and "
                                                "the label column (--label-col); pass a different --text-col or "
                                                "--label-col"),
    ({"text_col": "body", "text_pair_col": "body"}, "column 'body' cannot be both the text column (--text-col) "
                                                    "and the text pair column (--text-pair-col); pass a different "
                                                    "--text-col or --text-pair-col"),
    ({"text_pair_col": "label"}, "column 'label' cannot be both the text pair column (--text-pair-col) and the "
                                 "label column (--label-col); pass a different --text-pair-col or --label-col"),
])
def test_text_pair_and_label_columns_must_differ(flags, message):
    frame = pd.DataFrame({"body": ["a b"], "other": ["c d"], "label": ["sports"]})
    with pytest.raises(InputError) as err:
        detect_columns(frame, "d.csv", **flags)
    assert str(err.value) == f"'d.csv': {message}"


def test_distinct_columns_are_still_accepted():
    frame = pd.DataFrame({"body": ["a b"], "other": ["c d"], "label": ["sports"]})
    columns = detect_columns(frame, "d.csv", text_col="body", text_pair_col="other")
    assert (columns.text, columns.text_pair, columns.label) == ("body", "other", "label")


# ------------------------------------------------------------------ --label-names


@pytest.mark.parametrize("names, message", [
    (["sports", "sports", "business"], "--label-names gives the name 'sports' more than once; each of the "
                                       "model's classes needs its own name"),
    (["sports", " business", "business "], "--label-names gives the name 'business' more than once; each of "
                                           "the model's classes needs its own name"),
    (["a", "", "b"], "--label-names has an empty name (name 2 of 3); give one name per class, in the order of "
                     "the model's ids, separated by commas"),
])
def test_label_names_refuse_repeated_and_empty_names(names, message):
    with pytest.raises(InputError) as err:
        check_label_names(names)
    assert str(err.value) == message


def test_label_names_are_stripped():
    assert check_label_names([" a", "b ", 3]) == ["a", "b", "3"]


@pytest.mark.parametrize("value, message", [
    ("sports,sports,business", "Error: --label-names gives the name 'sports' more than once; each of the model's "
                               "classes needs its own name"),
    ("a,,b", "Error: --label-names has an empty name (name 2 of 3); give one name per class, in the order of the "
             "model's ids, separated by commas"),
])
def test_label_names_flag_with_a_repeated_or_empty_name_exits_2(tmp_path, capsys, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    code = main([str(HEALTHY), str(EVAL), "--label-names", value, "--out", str(tmp_path / "o"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip() == message and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_predictions_mode_refuses_repeated_label_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.csv"
    pd.DataFrame({"gold": ["a", "b"], "prob_x": [0.9, 0.2], "prob_y": [0.1, 0.8]}).to_csv(path, index=False)
    code = main(["--predictions", str(path), "--label-names", "a,a", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("Error: --label-names gives the name 'a' more than once; each of "
                                               "the model's classes needs its own name")


def test_diagnose_refuses_repeated_label_names(tiny_collapsed):
    import collapse_detect

    with pytest.raises(InputError, match="^label_names gives the name 'b' more than once"):
        collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], ["x"], ["a"],
                                 label_names=["a", "b", "b"])


# ------------------------------------------------------------------ row ids in messages


def test_rows_are_named_as_0_based_row_ids(tmp_path):
    path = tmp_path / "gaps.csv"
    # file line 1 is the header: data row 0 is line 2, so the empty text of line 3 is row_id 1
    path.write_text("text,label\nhello,sports\n,politics\nworld,\n")
    with pytest.raises(InputError) as err:
        _gold(path, NAMES)
    assert str(err.value) == (f"{str(path)!r}: column 'text' (--text-col) is empty at row_id 1 (a 0-based data "
                              "row, as in predictions.csv); drop or fill those rows")
    with pytest.raises(InputError) as err:
        _map(NAMES, ["sports", None, "business", np.nan])
    assert str(err.value) == ("'d.csv': column 'label' is empty at row_ids 1, 3 (0-based data rows, as in "
                              "predictions.csv); every row needs a label")


# ------------------------------------------------------------------ a star-rating model through the CLI


@pytest.fixture()
def numeric_model(tmp_path):
    """samples/models/healthy with its classes named 1, 2, 3 (sports, politics, business), and the eval CSV with
    its labels renamed to match."""
    model = tmp_path / "numeric"
    shutil.copytree(HEALTHY, model)
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {"0": "1", "1": "2", "2": "3"}
    config["label2id"] = {"1": 0, "2": 1, "3": 2}
    (model / "config.json").write_text(json.dumps(config))
    frame = pd.read_csv(EVAL)
    frame["label"] = frame["label"].map({"sports": 1, "politics": 2, "business": 3})
    return model, frame


@pytest.mark.parametrize("classes", [(1, 2, 3), (1, 2)])
def test_cli_reads_integer_labels_as_numeric_class_names(numeric_model, tmp_path, capsys, monkeypatch, classes):
    monkeypatch.chdir(tmp_path)
    model, frame = numeric_model
    frame = frame[frame["label"].isin(classes)].reset_index(drop=True)
    data = tmp_path / "stars.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "o"
    code = main([str(model), str(data), "--out", str(out), "--quiet", "--format", "csv,json"])
    assert code in (0, 1), capsys.readouterr().err
    preds = pd.read_csv(out / "predictions.csv")
    assert preds["row_id"].tolist() == list(range(len(frame)))
    assert preds["gold"].tolist() == frame["label"].tolist()
    # the healthy model knows these headlines: with the labels read right, it mostly agrees with them
    assert (preds["gold"] == preds["predicted"]).mean() > 0.8
    summary = json.loads((out / "summary.json").read_text())
    assert [c["class"] for c in summary["stats"]["per_class"]] == ["1", "2", "3"]
