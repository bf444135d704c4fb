"""collapse_detect.diagnose(): an in-memory model and rows give the Diagnosis the CLI renders."""

from __future__ import annotations

import json

import numpy as np
import pytest

import collapse_detect
from collapse_detect.api import judge
from collapse_detect.errors import ConfigError, InputError
from collapse_detect.outputs import MANIFEST
from collapse_detect.report.render import render_compact_html

from helpers import stats_for

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def api_diagnosis(tiny_collapsed):
    model = tiny_collapsed["model"]
    model.train()  # as in the middle of a notebook's training loop
    frame = tiny_collapsed["eval_df"]
    diagnosis = collapse_detect.diagnose(model, tiny_collapsed["tokenizer"], frame["text"].tolist(),
                                         frame["label"].tolist())
    return diagnosis, model.training


def _stats_json(diagnosis):
    return json.loads(diagnosis.to_json())["stats"]


def test_diagnose_returns_the_collapse_with_exact_numbers(api_diagnosis):
    diagnosis, still_training = api_diagnosis
    assert still_training is True  # the model's mode is given back
    assert diagnosis.verdict() == "COLLAPSE" and diagnosis.exit_code() == 1
    assert diagnosis.collapsed_classes == ["politics", "business"]
    s = diagnosis.stats
    assert (s["n"], s["k"], s["class_names"]) == (100, 3, ["sports", "politics", "business"])
    assert s["confusion"] == [[60, 0, 0], [20, 0, 0], [20, 0, 0]]
    assert [c["recall"] for c in s["per_class"]] == [1.0, 0.0, 0.0]
    assert s["accuracy"] == 0.6 and s["balanced_accuracy"] == pytest.approx(1 / 3)
    meta = diagnosis.metadata
    assert meta["mode"] == "python-api" and meta["data_file"] == "(texts, 100 rows)"
    assert meta["checkpoint"] is None and meta["rows"] == 100
    frame = diagnosis.predictions
    assert list(frame.columns) == ["row_id", "gold", "predicted", "prob_sports", "prob_politics", "prob_business"]
    assert frame["row_id"].tolist() == list(range(100)) and set(frame["predicted"]) == {"sports"}
    assert np.allclose(frame[["prob_sports", "prob_politics", "prob_business"]].sum(axis=1), 1.0)


def test_a_dataframe_with_integer_labels_gives_the_same_statistics(api_diagnosis, tiny_collapsed):
    diagnosis, _ = api_diagnosis
    frame = tiny_collapsed["eval_df"].rename(columns={"label": "topic"})
    frame["topic"] = frame["topic"].map({"sports": 0, "politics": 1, "business": 2})
    by_frame = collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], frame,
                                        label_col="topic", check_params={"low-recall": {"floor": 0.9}},
                                        skip="input_ignored,constant_output", keep_predictions=False)
    for key in ("confusion", "per_class", "calibration", "mean_nll", "tokenization"):
        assert _stats_json(by_frame)[key] == _stats_json(diagnosis)[key], key
    assert by_frame.metadata["data_file"] == "(DataFrame, 100 rows)"
    assert by_frame.metadata["columns"] == {"text": "text", "text_pair": None, "label": "topic"}
    assert by_frame.predictions is None
    ran = {f.check_id for f in by_frame.findings}
    assert "input_ignored" not in ran and "constant_output" not in ran and "class_never_predicted" in ran
    assert by_frame.metadata["check_params"] == {"low_recall": {"floor": 0.9}}
    low = next(f for f in by_frame.findings if f.check_id == "low_recall")
    assert low.summary == "Recall below 0.90 for 2 class(es): politics 0.00 (n=20), business 0.00 (n=20)."


def test_the_api_diagnosis_equals_the_cli_run_on_the_saved_checkpoint(api_diagnosis, collapsed_report):
    diagnosis, _ = api_diagnosis
    cli = json.loads((collapsed_report["out"] / "summary.json").read_text())
    api = json.loads(diagnosis.to_json())
    assert api["stats"] == cli["stats"]
    assert [(f["check_id"], f["severity"], f["summary"]) for f in api["findings"]] == \
        [(f["check_id"], f["severity"], f["summary"]) for f in cli["findings"]]
    assert (api["verdict"], api["exit_code"], api["root_cause"]) == (cli["verdict"], cli["exit_code"],
                                                                     cli["root_cause"])


def test_save_writes_the_files_the_cli_writes(api_diagnosis, collapsed_report, tmp_path):
    diagnosis, _ = api_diagnosis
    folder = diagnosis.save(tmp_path / "saved")
    cli_files = sorted(p.name for p in collapsed_report["out"].iterdir())
    assert sorted(p.name for p in folder.iterdir()) == cli_files
    assert {"report.html", "summary.json", "summary.md", "predictions.csv", "reliability.png"} <= set(cli_files)
    assert (folder / "predictions.csv").read_bytes() == (collapsed_report["out"] / "predictions.csv").read_bytes()
    assert diagnosis.save(tmp_path / "json_only", formats=["json"]) == tmp_path / "json_only"
    assert sorted(p.name for p in (tmp_path / "json_only").iterdir()) == [MANIFEST, "summary.json"]
    with pytest.raises(ValueError, match="unknown format"):
        diagnosis.save(tmp_path / "x", formats=["pdf"])


def test_repr_html_is_compact_and_escapes_class_names():
    gold = np.repeat([0, 1], [50, 50])
    stats = stats_for(gold, np.zeros(100, dtype=int), 2, names=["ok", EVIL])
    diagnosis = judge(stats, {}, collapse_detect.api.RunOptions())
    html = diagnosis._repr_html_()
    assert html == render_compact_html(diagnosis)
    assert html.startswith("<div") and len(html) < 5000
    assert "collapse-detect: COLLAPSE" in html
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


@pytest.mark.parametrize("call, error, message", [
    (lambda m, t: collapse_detect.diagnose(m, t, ["a", "b"], ["sports"]), InputError,
     "2 texts but 1 labels; pass one label per text"),
    (lambda m, t: collapse_detect.diagnose(m, t, ["a", "b"]), InputError,
     "diagnose() needs the gold labels: diagnose(model, tokenizer, texts, labels)"),
    (lambda m, t: collapse_detect.diagnose(m, t, "a text", ["sports"]), InputError,
     "texts must be a list of strings or a DataFrame, got one string"),
    (lambda m, t: collapse_detect.diagnose(m, t, ["a"], ["cooking"]), InputError,
     "'texts': column 'label' has labels the model does not know: 'cooking'; the model's classes are: sports, "
     "politics, business (or ids 0..2); pass --label-names to name the model's ids in order, or --label-col"),
    (lambda m, t: collapse_detect.diagnose(m, t, ["a"], ["sports"], check_params={"low_recall": {"flor": 1}}),
     ConfigError, "check_params: low_recall has no parameter 'flor' (did you mean 'floor'?); it takes: floor "
     "(default 0.5), min_support (default 5)"),
    (lambda m, t: collapse_detect.diagnose(m, t, ["a"], ["sports"], only=["nope"]), ConfigError,
     "only: unknown check 'nope'; valid checks: "),
])
def test_bad_arguments_raise_the_cli_s_messages(tiny_collapsed, call, error, message):
    with pytest.raises(error) as err:
        call(tiny_collapsed["model"], tiny_collapsed["tokenizer"])
    assert str(err.value).startswith(message)


def test_diagnose_probes_batches_on_threads_to_the_same_numbers(tiny_trained):
    """threads=3: three batches at once, one thread each; the statistics equal one batch at a time, the
    metadata says how it ran, and torch's own thread setting is unchanged afterwards."""
    import torch

    frame = tiny_trained["eval_df"]
    before = torch.get_num_threads()
    runs = {n: collapse_detect.diagnose(tiny_trained["model"], tiny_trained["tokenizer"], frame, batch_size=8,
                                        threads=n, keep_predictions=False) for n in (1, 3)}
    assert torch.get_num_threads() == before
    one, three = _stats_json(runs[1]), _stats_json(runs[3])
    assert three["confusion"] == one["confusion"] and one["n"] == 200
    assert three["balanced_accuracy"] == one["balanced_accuracy"] > 0.5
    assert three["mean_nll"] == pytest.approx(one["mean_nll"], rel=1e-6)
    assert three["tokenization"] == one["tokenization"]
    assert (runs[1].metadata["threads"], runs[3].metadata["threads"]) == (1, 3)
    assert runs[3].metadata["threads_reason"] == "diagnose(threads=...)"


def test_a_diagnosis_keeps_the_threshold_it_was_made_with(tiny_collapsed, tmp_path):
    frame = tiny_collapsed["eval_df"]
    d = collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], frame.head(60),
                                 fail_on="warn", check_params={"low_recall": {"floor": 0.99}}, skip="constant_output,"
                                 "class_never_predicted,prediction_absorbed,no_better_than_majority,input_ignored,"
                                 "representation_collapse,untrained_head,label_mapping_mismatch")
    assert [f.check_id for f in d.gating_findings()] == ["low_recall"]  # a warning, gating under fail_on="warn"
    saved = json.loads((d.save(tmp_path / "o") / "summary.json").read_text())
    assert d.verdict() == saved["verdict"] == "COLLAPSE" and d.exit_code() == saved["exit_code"] == 1
    assert d.to_dict()["fail_on"] == "warn" and d.verdict("fail") != "COLLAPSE"
    from collapse_detect.report.junit import render_junit
    from collapse_detect.report.render import render_markdown

    assert render_markdown(d).startswith("# collapse-detect: COLLAPSE")
    assert 'name="fail_on" value="warn"' in render_junit(d)


def test_a_warning_check_alone_gates_a_diagnosis_made_with_fail_on_warn(tiny_collapsed):
    frame = tiny_collapsed["eval_df"].head(60)
    d = collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], frame, fail_on="warn",
                                 only="low_recall", check_params={"low_recall": {"floor": 0.99}})
    assert d.metadata["checks_run"] == ["low_recall"]
    assert d.verdict() == "COLLAPSE" and d.exit_code() == 1


def test_diagnose_refuses_a_selection_that_cannot_gate_before_probing(tiny_collapsed, monkeypatch):
    import collapse_detect.probe as probe

    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("the probe ran"))
    with pytest.raises(InputError, match=r"^only/skip leave no check that can fail the gate at --fail-on fail "
                                         r"\(running: low_recall\)"):
        collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], ["a"], ["sports"],
                                 only="low_recall")


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"threads": 1.5}, "threads must be an integer >= 1 or None, got 1.5"),
    ({"grad_layers": -1}, "grad_layers must be an integer >= 1 or None, got -1"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"max_length": "8"}, "max_length must be an integer >= 1 or None, got '8'"),
])
def test_diagnose_checks_its_numbers_like_the_flags(tiny_collapsed, kwargs, message):
    with pytest.raises(InputError) as err:
        collapse_detect.diagnose(tiny_collapsed["model"], tiny_collapsed["tokenizer"], ["a"], ["sports"], **kwargs)
    assert str(err.value) == message


def test_diagnose_takes_what_a_notebook_has(tiny_collapsed, tmp_path, monkeypatch):
    import torch

    model, tok = tiny_collapsed["model"], tiny_collapsed["tokenizer"]
    frame = tiny_collapsed["eval_df"].head(40)
    ids = torch.tensor([["sports", "politics", "business"].index(x) for x in frame["label"]])
    model.eval()
    model.bert.encoder.layer[0].train()  # part of the model in training mode
    monkeypatch.chdir(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"not this run's")  # the working folder's, not the model's
    from transformers import TrainerState

    state = TrainerState(global_step=20, max_steps=40, num_train_epochs=2, best_model_checkpoint="out/checkpoint-20",
                         log_history=[{"step": s, "loss": 1.0, "learning_rate": 3e-2} for s in (10, 20)])
    d = collapse_detect.diagnose(model, tok, frame["text"].tolist(), ids, label_names="sports,politics,business",
                                 trainer_state=state)
    assert d.stats["n"] == 40 and d.stats["class_names"] == ["sports", "politics", "business"]
    assert model.bert.encoder.layer[0].training and not model.bert.encoder.layer[1].training and not model.training
    assert "training_args" not in d.stats["evidence"]
    record = d.stats["evidence"]["training_record"]
    assert record["max_learning_rate"] == 3e-2 and record["best_model_checkpoint"] == "out/checkpoint-20"
    assert record["num_train_epochs"] == 2 and record["stopped_early"] is True
    with pytest.raises(InputError, match="model must be a loaded transformers model, got str"):
        collapse_detect.diagnose("models/x", tok, ["a"], ["sports"])
