"""Eval files read the same in every format: CSV cells stay the strings they are, TSV quotes are taken as text
unless the file quotes like a CSV writer, empty texts are refused everywhere, and the predictions and training
files are checked like the eval file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.cli import main
from collapse_detect.data import iter_chunks, tsv_quoting
from collapse_detect.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = ROOT / "samples" / "models" / "healthy"
EVAL = ROOT / "samples" / "headlines_eval.csv"


def _rows(path, class_names, **columns):
    _, chunks = iter_chunks(path, class_names, **columns)
    chunks = list(chunks)
    return ([t for c in chunks for t in c.texts], np.concatenate([c.gold for c in chunks]).tolist(),
            np.concatenate([c.row_ids for c in chunks]).tolist())


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _run(capsys, *args):
    code = main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ CSV cells are strings


def test_zero_padded_class_names_match_as_text_in_csv_as_in_jsonl(tmp_path):
    names = ["01", "00", "02"]
    labels = ["00", "01", "02", "01"]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate(labels)))
    _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)])
    for name in ("d.csv", "d.jsonl"):
        assert _rows(tmp_path / name, names)[1] == [1, 0, 2, 0], name


def test_words_pandas_calls_missing_are_labels_and_texts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nNA,None\nnull,NA\nN/A,sports\nnan,None\n")
    texts, gold, _ = _rows(path, ["sports", "None", "NA"])
    assert texts == ["NA", "null", "N/A", "nan"] and gold == [1, 2, 0, 1]


def test_numbers_read_as_strings_keep_their_meaning(tmp_path):
    # ids written as floats (a column that once held a gap), true/false names, and an id column that is
    # not mistaken for the text
    path = tmp_path / "d.csv"
    path.write_text("id,body,label\n1,a b,2.0\n2,c d,0\n3,e f,1\n")
    texts, gold, _ = _rows(path, ["x", "y", "z"])
    assert texts == ["a b", "c d", "e f"] and gold == [2, 0, 1]
    path.write_text("id,words,label\n1,a b,TRUE\n2,c d,False\n")
    assert _rows(path, ["false", "true"])[1] == [1, 0]


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\na,sports,politics\n")
    with pytest.raises(InputError, match=r"the header names column 'label' twice; rename one of them"):
        _rows(path, ["sports", "politics"])
    path.write_text(",text,label,,\n0,a,sports,,\n1,b,politics,,\n")  # an index column, trailing commas
    assert _rows(path, ["sports", "politics"])[:2] == (["a", "b"], [0, 1])


@pytest.mark.parametrize("label, expect", [("1", 1), ("1.0", 1), (" 2.00 ", 2), ("-0", 0), ("--1", None),
                                           ("²", None), ("1.5", None), ("0x1", None), (2.0, 2), (2.5, None)])
def test_one_reading_of_integer_ids(label, expect):
    from collapse_detect.data import integer_label

    assert integer_label(label) == expect


# ------------------------------------------------------------------ TSV quotes


def test_tsv_with_raw_quotes_keeps_every_row_and_its_quotes(tmp_path):
    lines = ['"Quoted" headline\tsports', 'an "opening quote\tpolitics', '"unclosed start\tbusiness',
             'plain row\tsports', 'ends with a quote"\tpolitics', 'last row\tbusiness']
    path = tmp_path / "raw.tsv"
    path.write_text("text\tlabel\n" + "\n".join(lines) + "\n")
    assert tsv_quoting(path) == csv.QUOTE_NONE
    texts, gold, row_ids = _rows(path, ["sports", "politics", "business"])
    assert texts == [line.split("\t")[0] for line in lines]
    assert gold == [0, 1, 2, 0, 1, 2] and row_ids == list(range(6))


def test_tsv_written_by_pandas_is_read_with_its_quoting(tmp_path):
    frame = pd.DataFrame({"text": ['he said "hi"', "a\ttab", "plain"], "label": ["sports", "politics", "sports"]})
    path = tmp_path / "pandas.tsv"
    frame.to_csv(path, sep="\t", index=False)
    assert '"he said ""hi"""' in path.read_text()
    assert tsv_quoting(path) == csv.QUOTE_MINIMAL
    assert _rows(path, ["sports", "politics"])[0] == frame["text"].tolist()


def test_tsv_written_by_pandas_with_newlines_and_long_texts(tmp_path):
    frame = pd.DataFrame({"text": ["line1\nline2", 'x "q" ' * 30000, "plain"], "label": ["sports"] * 3})
    path = tmp_path / "multi.tsv"
    frame.to_csv(path, sep="\t", index=False)
    assert tsv_quoting(path) == csv.QUOTE_MINIMAL  # a 180,000-character field is no sign of raw quotes
    assert _rows(path, ["sports", "politics"])[0] == frame["text"].tolist()


# ------------------------------------------------------------------ empty texts and encodings


@pytest.mark.parametrize("name, write", [
    ("d.jsonl", lambda p: _jsonl(p, [{"text": "a", "label": "sports"}, {"text": "", "label": "sports"}])),
    ("d.csv", lambda p: p.write_text('text,label\na,sports\n"   ",sports\n')),
    ("d.parquet", lambda p: pd.DataFrame({"text": ["a", " \t"], "label": ["sports"] * 2}).to_parquet(p)),
])
def test_an_empty_or_blank_text_is_refused_in_every_format(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(InputError, match=r"column 'text' \(--text-col\) is empty at row_id 1 "):
        _rows(path, ["sports", "politics"])


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a", "label": "politics"}\n{"text": "b", "label": "sports"}\n')
    assert _rows(path, ["sports", "politics"])[1] == [1, 0]


# ------------------------------------------------------------------ flags and files, through the command line


def test_text_pair_flag_naming_the_text_column(capsys, tmp_path):
    code, err = _run(capsys, HEALTHY, EVAL, "--text-pair-col", "text", "--out", tmp_path / "o")
    assert code == 2 and err == (f"Error: {str(EVAL)!r}: column 'text' is the text pair (--text-pair-col), so the "
                                 "first text is not known; pass --text-col\n")


def test_empty_label_names_flag_is_refused(capsys, tmp_path):
    code, err = _run(capsys, HEALTHY, EVAL, "--label-names", "", "--out", tmp_path / "o")
    assert code == 2 and err == "Error: --label-names gives 1 name but the model has 3 classes\n"
    code, err = _run(capsys, HEALTHY, EVAL, "--label-names", ",,", "--out", tmp_path / "o")
    assert code == 2 and "--label-names has an empty name (name 1 of 3)" in err and err.count("\n") == 1


def test_folders_and_missing_files_are_named_for_what_they_are(capsys, tmp_path):
    code, err = _run(capsys, HEALTHY, tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "is a folder, not a file" in err
    (tmp_path / "d.csv").mkdir()
    code, err = _run(capsys, HEALTHY, tmp_path / "d.csv", "--out", tmp_path / "o")
    assert code == 2 and err == f"Error: data file {str(tmp_path / 'd.csv')!r} is a folder, not a file\n"
    code, err = _run(capsys, "--predictions", tmp_path / "p.csv", "--out", tmp_path / "o")
    assert code == 2 and err == f"Error: predictions file {str(tmp_path / 'p.csv')!r} does not exist\n"


def test_training_file_without_rows_is_refused_before_the_probe(capsys, tmp_path, monkeypatch):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n")
    import collapse_detect.probe as probe

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(probe, "run_probe", no_probe)
    code, err = _run(capsys, HEALTHY, EVAL, "--train-file", train, "--out", tmp_path / "o")
    assert code == 2 and err == f"Error: training file (--train-file) {str(train)!r} has no rows\n"
    train.write_text("text,label\na,sports\nb,weather\n")
    code, err = _run(capsys, HEALTHY, EVAL, "--train-file", train, "--out", tmp_path / "o")
    assert code == 2 and "column 'label' has labels the model does not know: 'weather'" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ predictions files


def test_labels_only_predictions_sharing_no_value_are_refused(capsys, tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"gold": ["sports", "politics", "business"] * 3, "predicted": [0, 1, 2] * 3}).to_csv(path,
                                                                                                     index=False)
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o")
    assert code == 2 and err == (
        f"Error: {str(path)!r}: the gold labels (business, politics, sports) and the predicted labels (0, 1, 2) "
        "share no value, so no row could be right; write both columns with the same class names, or pass "
        "--label-names to name the ids in class order\n")
    # named ids: the same file is read
    code, err = _run(capsys, "--predictions", path, "--label-names", "sports,politics,business",
                     "--out", tmp_path / "o")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stats"]["accuracy"] == 1.0


def test_labels_only_ids_in_two_spellings_are_one_class_each(capsys, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("gold,predicted\n" + "0,0.0\n1,1.0\n1,1.0\n0,1.0\n" * 5)
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o")
    assert code in (0, 1) and "Error" not in err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stats"]["accuracy"] == 0.75
    path.write_text("gold,predicted\n0,--1\n1,1\n--1,0\n")  # '--1' is no id: a class name, not a crash
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o2")
    assert code in (0, 1) and "Error" not in err
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["stats"]["class_names"] == ["--1", "0", "1"]


def test_probabilities_rounded_to_two_decimals_are_accepted(capsys, tmp_path):
    path = tmp_path / "p.csv"
    # 0.34 + 0.34 + 0.33 = 1.01 (1.0100000000000002 in floating point)
    pd.DataFrame({"gold": ["a", "b", "c", "a"], "prob_a": [0.34, 0.2, 0.1, 0.7], "prob_b": [0.34, 0.7, 0.2, 0.2],
                  "prob_c": [0.33, 0.1, 0.7, 0.1]}).to_csv(path, index=False)
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o")
    assert code in (0, 1) and "Error" not in err
    six = pd.DataFrame({"gold": list("abcdef")} | {f"prob_{c}": [0.17] * 6 for c in "abcdef"})  # sums to 1.02
    six.to_csv(path, index=False)
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o")
    assert "Error" not in err
    path.write_text("gold,prob_a,prob_b\na,0.5,0.52\nb,0.2,0.8\n")
    code, err = _run(capsys, "--predictions", path, "--out", tmp_path / "o")
    assert code == 2 and "sum to 1.02, not 1" in err
