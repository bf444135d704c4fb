"""The command line: exit codes, whole error lines for bad input, nothing written on error, safe loading."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pandas as pd
import pytest

from collapse_detect.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def out_dir(tmp_path):
    return tmp_path / "report"


def test_healthy_model_exits_0_and_writes_every_output(tiny_trained, out_dir, capsys):
    code, out, err = run(capsys, tiny_trained["dir"], tiny_trained["eval"], "--out", out_dir)
    assert code == 0, out + err
    assert out.startswith("collapse-detect: HEALTHY")
    assert f"report: {out_dir / 'report.html'}" in out
    names = {p.name for p in out_dir.iterdir()}
    assert {"report.html", "summary.json", "summary.md", "predictions.csv", "prior_vs_predicted.png",
            "recall_by_class.png", "confusion_matrix.png", "confidence_by_class.png"} <= names
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["schema_version"] == "1.0" and summary["exit_code"] == 0
    assert list(summary)[:4] == ["schema_version", "verdict", "exit_code", "fail_on"]
    preds = pd.read_csv(out_dir / "predictions.csv")
    assert list(preds.columns) == ["row_id", "gold", "predicted", "prob_sports", "prob_politics", "prob_business"]
    assert preds["row_id"].tolist() == list(range(200))
    assert preds[["prob_sports", "prob_politics", "prob_business"]].sum(axis=1).round(4).eq(1).all()
    assert (preds["gold"] == preds["predicted"]).mean() == pytest.approx(summary["stats"]["accuracy"])
    html = (out_dir / "report.html").read_text()
    assert len(html.encode()) < 2_000_000
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_module_entry_point_matches(tiny_trained, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collapse_detect", str(tiny_trained["dir"]),
                           str(tiny_trained["eval"]), "--out", str(tmp_path / "r"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["verdict"] == "HEALTHY" and summary["metadata"]["rows"] == 200


def _bad(capsys, tiny_trained, data, *extra, out_dir=None):
    code, out, err = run(capsys, tiny_trained["dir"], data, "--out", out_dir, *extra)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("Error: ")
    assert not out_dir.exists()
    return err.strip()


def test_unknown_labels_name_file_column_values_and_flag(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["sports", "weather", "culture"]}).to_csv(path, index=False)
    assert _bad(capsys, tiny_trained, path, out_dir=out_dir) == (
        f"Error: {str(path)!r}: column 'label' has labels the model does not know: 'weather', 'culture'; the "
        "model's classes are: sports, politics, business (or ids 0..2); pass --label-names to name the model's "
        "ids in order, or --label-col")


def test_missing_column_lists_the_columns(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"body": ["x"], "label": ["sports"]}).to_csv(path, index=False)
    assert _bad(capsys, tiny_trained, path, "--text-col", "headline", out_dir=out_dir) == (
        f"Error: {str(path)!r} has no column 'headline' (--text-col); its columns are: body, label")


def test_no_label_column(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "nolabel.csv"
    pd.DataFrame({"text": ["x"], "kind": ["sports"]}).to_csv(path, index=False)
    err = _bad(capsys, tiny_trained, path, out_dir=out_dir)
    assert err.startswith(f"Error: {str(path)!r}: no label column found") and err.endswith("pass --label-col")


def test_empty_file(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert _bad(capsys, tiny_trained, path, out_dir=out_dir) == f"Error: data file {str(path)!r} is empty"


def test_header_only_file(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    assert _bad(capsys, tiny_trained, path, out_dir=out_dir) == f"Error: data file {str(path)!r} has no rows"


def test_nan_texts_name_the_rows(tiny_trained, tmp_path, out_dir, capsys):
    path = tmp_path / "nan.csv"
    path.write_text("text,label\nhello,sports\n,politics\nworld,business\n")
    assert _bad(capsys, tiny_trained, path, out_dir=out_dir) == (
        f"Error: {str(path)!r}: column 'text' (--text-col) is empty at row_id 1 (a 0-based data row, as in "
        "predictions.csv); drop or fill those rows")


def test_error_in_a_late_chunk_leaves_nothing_written(tiny_trained, tmp_path, out_dir, capsys, monkeypatch):
    import collapse_detect.api as api

    rows = [("fine headline", "sports")] * 50 + [("late", "weather")]
    path = tmp_path / "late.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    monkeypatch.setattr(api.RunOptions, "chunk_rows", 10)
    err = _bad(capsys, tiny_trained, path, out_dir=out_dir)
    assert "'weather'" in err


def test_unknown_extension_and_missing_file(tiny_trained, tmp_path, out_dir, capsys):
    assert _bad(capsys, tiny_trained, tmp_path / "data.xlsx", out_dir=out_dir) == (
        f"Error: {str(tmp_path / 'data.xlsx')!r}: unknown file type '.xlsx'; expected one of .csv, .jsonl, "
        ".ndjson, .parquet, .pq, .tsv")
    assert _bad(capsys, tiny_trained, tmp_path / "nope.csv", out_dir=out_dir) == (
        f"Error: data file {str(tmp_path / 'nope.csv')!r} does not exist")


def test_bad_flag_value_is_one_line_exit_2(tiny_trained, out_dir, capsys):
    code, out, err = run(capsys, tiny_trained["dir"], tiny_trained["eval"], "--batch-size", "0")
    assert code == 2
    assert err.strip() == ("Error: argument --batch-size: --batch-size expects a positive integer, got '0' "
                           "(see collapse-detect --help)")


def test_bad_flag_exits_2(tiny_trained, capsys):
    code, out, err = run(capsys, tiny_trained["dir"], tiny_trained["eval"], "--format", "pdf")
    assert code == 2
    assert err.strip() == ("Error: argument --format: --format got pdf; choose from html,json,md,png,csv "
                           "(see collapse-detect --help)")


def test_missing_model_path_is_clear_and_makes_no_network_attempt(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data = tmp_path / "d.csv"
    data.write_text("text,label\nx,0\n")
    code, out, err = run(capsys, "bert-base-uncased", data, "--out", tmp_path / "o")
    assert code == 2
    assert err.strip() == ("Error: model directory 'bert-base-uncased' does not exist (collapse-detect loads "
                           "local folders only; it never downloads from a model hub)")


def test_pickle_only_checkpoint_is_refused_unless_allowed(tiny_trained, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_trained["dir"], ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    code, out, err = run(capsys, ckpt, tiny_trained["eval"], "--out", tmp_path / "o")
    assert code == 2
    assert err.strip() == (
        f"Error: {str(ckpt)!r} holds only pickle weights (pytorch_model.bin); loading a pickle can run code. "
        "Re-save the model with save_pretrained(safe_serialization=True), or pass --allow-pickle to load it "
        "with torch.load(weights_only=True)")
    assert not (tmp_path / "o").exists()
    code, out, err = run(capsys, ckpt, tiny_trained["eval"], "--out", tmp_path / "o", "--allow-pickle", "--quiet")
    assert code == 0, err


def test_remote_code_checkpoint_is_refused(tiny_trained, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "remote"
    shutil.copytree(tiny_trained["dir"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, ckpt, tiny_trained["eval"], "--out", tmp_path / "o")
    assert code == 2 and "asks for custom code (auto_map)" in err


def test_trainer_output_dir_picks_the_best_checkpoint(tiny_trained, tiny_collapsed, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"  # the best checkpoint is the healthy one; the last one has collapsed
    shutil.copytree(tiny_trained["dir"], run_dir / "checkpoint-10")
    shutil.copytree(tiny_collapsed["dir"], run_dir / "checkpoint-20")
    state = {"best_model_checkpoint": str(run_dir / "checkpoint-10"), "log_history": [], "global_step": 20}
    (run_dir / "checkpoint-20" / "trainer_state.json").write_text(json.dumps(state))
    code, out, err = run(capsys, run_dir, tiny_trained["eval"], "--out", tmp_path / "o", "--quiet")
    assert code == 0
    meta = json.loads((tmp_path / "o" / "summary.json").read_text())["metadata"]
    assert meta["checkpoint"].endswith("checkpoint-10")
    assert meta["checkpoint_reason"] == "best checkpoint per trainer_state.json (checkpoint-10)"


def test_labels_as_integer_ids_and_jsonl_and_parquet(tiny_trained, tmp_path, capsys):
    df = tiny_trained["eval_df"].copy()
    df["label"] = df["label"].map({"sports": 0, "politics": 1, "business": 2})
    df = df.rename(columns={"text": "sentence"})
    results = []
    for name, write in (("d.jsonl", lambda p: df.to_json(p, orient="records", lines=True)),
                        ("d.parquet", lambda p: df.to_parquet(p)), ("d.tsv", lambda p: df.to_csv(p, sep="\t", index=False))):
        path = tmp_path / name
        write(path)
        code, out, err = run(capsys, tiny_trained["dir"], path, "--out", tmp_path / name.replace(".", "_"),
                             "--quiet")
        assert code == 0, err
        results.append(json.loads((tmp_path / name.replace(".", "_") / "summary.json").read_text())["stats"])
    assert results[0]["confusion"] == results[1]["confusion"] == results[2]["confusion"]
    code, out, err = run(capsys, tiny_trained["dir"], tiny_trained["eval"], "--out", tmp_path / "csv", "--quiet")
    assert code == 0, err  # the CSV with class names, as the other tests read it
    assert json.loads((tmp_path / "csv" / "summary.json").read_text())["stats"]["confusion"] == results[0]["confusion"]


def test_html_escapes_a_script_label(tiny_trained, tmp_path, capsys):
    import copy

    model = copy.deepcopy(tiny_trained["model"])
    evil = ["<script>alert(1)</script>", "politics", "business"]
    model.config.id2label = dict(enumerate(evil))
    model.config.label2id = {n: i for i, n in enumerate(evil)}
    ckpt = tmp_path / "evil"
    model.save_pretrained(ckpt)
    tiny_trained["tokenizer"].save_pretrained(ckpt)
    df = tiny_trained["eval_df"].replace({"label": {"sports": evil[0]}})
    data = tmp_path / "evil.csv"
    df.to_csv(data, index=False)
    code, out, err = run(capsys, ckpt, data, "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    html = (tmp_path / "o" / "report.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "<script>" not in md
