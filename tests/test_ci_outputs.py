"""CI outputs: the JUnit file, the GitHub step summary, and the example CI jobs run against a fake runner."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.api import RunOptions, judge
from collapse_detect.checks import REGISTRY, Finding, Severity
from collapse_detect.cli import main
from collapse_detect.report.junit import render_junit
from collapse_detect.report.write import append_step_summary

from helpers import stats_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _collapsed_stats(names=("sports", "politics", "business")):
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    pred = np.zeros(200, dtype=int)
    pred[120:122] = 1
    return stats_for(gold, pred, 3, names=list(names), noise=1.0)


def _cases(xml_text):
    root = ET.fromstring(xml_text)
    suite = root.find("testsuite")
    return root, suite, {c.get("name"): c for c in suite.findall("testcase")}


# ---------------------------------------------------------------- JUnit


def test_junit_has_one_case_per_check_that_ran_and_failures_carry_the_summary():
    diagnosis = judge(_collapsed_stats(), {"model_name": "clf", "data_file": "eval.csv"},
                      RunOptions(skip=["training_record"]))
    root, suite, cases = _cases(render_junit(diagnosis, "fail"))
    ran = [c for c in REGISTRY if c != "training_record"]
    assert list(cases) == ran
    failing = {"class_never_predicted", "prediction_absorbed", "no_better_than_majority"}
    assert {n for n, c in cases.items() if c.find("failure") is not None} == failing
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == (str(len(ran)), "3", "0")
    never = next(f for f in diagnosis.findings if f.check_id == "class_never_predicted")
    failure = cases["class_never_predicted"].find("failure")
    assert failure.get("message") == never.summary and failure.get("type") == "fail"
    assert failure.text.startswith(f"[fail] {never.summary}\nLikely cause: {never.cause}")
    low = cases["low_recall"]  # a warning does not fail under --fail-on fail: it is kept as output
    assert low.find("failure") is None
    assert low.find("system-out").text.startswith("[warn] Recall below 0.50 for 2 class(es)")
    assert cases["constant_output"].find("system-out").text == f"no finding ({REGISTRY['constant_output'].measures})"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props == {"verdict": "COLLAPSE", "fail_on": "fail", "exit_code": "1", "model": "clf",
                     "data": "eval.csv", "rows": "200"}
    assert cases["low_recall"].get("classname") == "collapse-detect.clf"
    # with --fail-on warn the warning fails its case too
    _, _, cases = _cases(render_junit(diagnosis, "warn"))
    assert cases["low_recall"].find("failure").get("type") == "warn"


def test_junit_reports_a_crashed_check_as_an_error_and_survives_hostile_names():
    evil = "<img src=x onerror=alert(1)>\x07&\"'"
    stats = _collapsed_stats(names=("sports", evil, "business"))
    diagnosis = judge(stats, {"model_name": evil}, RunOptions(only=["class_never_predicted", "low_recall"]))
    diagnosis.findings.append(Finding("low_recall", Severity.ERROR, "The check crashed: KeyError: 'x'",
                                      evidence={"traceback": "Traceback ...\nKeyError: 'x'"}))
    text = render_junit(diagnosis)
    root, suite, cases = _cases(text)  # well-formed despite the control character
    assert list(cases) == ["class_never_predicted", "low_recall"]
    error = cases["low_recall"].find("error")
    assert error.get("message") == "The check crashed: KeyError: 'x'" and error.get("type") == "CheckCrashed"
    assert error.text == "Traceback ...\nKeyError: 'x'"
    assert root.get("errors") == "1" and root.get("failures") == "1"
    assert "\x07" not in text and "<img" not in text
    assert "<img src=x onerror=alert(1)>\ufffd&\"'" in cases["class_never_predicted"].find("failure").get("message")


def test_cli_writes_junit_and_appends_the_step_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["sports", "politics"]
    gold = np.repeat([0, 1], [80, 20])
    probs = np.tile([0.9, 0.1], (100, 1))  # always 'sports'
    frame = pd.DataFrame({"gold": [names[g] for g in gold], "prob_sports": probs[:, 0], "prob_politics": probs[:, 1]})
    frame.to_csv("preds.csv", index=False)
    summary = tmp_path / "step_summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    argv = ["--predictions", "preds.csv", "--out", "out", "--junit", "ci/junit.xml", "--quiet", "--format", "json"]
    assert main(argv) == 1
    assert main(argv) == 1
    text = summary.read_text()
    assert text.startswith("# earlier step\n# collapse-detect: COLLAPSE\n")
    assert text.count("# collapse-detect: COLLAPSE") == 2  # appended, never overwritten
    assert "- Predictions: `preds.csv` (100 rows, 2 classes; probabilities; no model was run)" in text
    _, _, cases = _cases((tmp_path / "ci" / "junit.xml").read_text())
    assert cases["class_never_predicted"].find("failure") is not None


def test_an_unwritable_step_summary_warns_and_does_not_change_the_verdict(tmp_path, capsys):
    diagnosis = judge(_collapsed_stats(), {}, RunOptions())
    target = tmp_path / "missing" / "summary.md"
    assert append_step_summary(diagnosis, environ={"GITHUB_STEP_SUMMARY": str(target)}) is None
    assert capsys.readouterr().err.startswith(f"Warning: cannot append to GITHUB_STEP_SUMMARY {str(target)!r}: ")
    assert append_step_summary(diagnosis, environ={}) is None


# ---------------------------------------------------------------- the example CI jobs


def github_run_commands(text: str) -> list[str]:
    """The shell lines of every `run:` of a workflow, without a YAML parser: `run: cmd` or a `run: |` block
    (the lines indented deeper than the `run:` key)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:- )?run:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest and rest not in ("|", ">", "|-", ">-"):
            out.append(rest)
            continue
        for body in lines[i + 1:]:
            if body.strip() and len(body) - len(body.lstrip()) <= indent:
                break
            if body.strip():
                out.append(body.strip())
    return out


def gitlab_script_commands(text: str, job: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"{job}:")
    out, in_script = [], False
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        if re.match(r"^  script:\s*$", line):
            in_script = True
            continue
        if in_script:
            m = re.match(r"^    - (.*)$", line)
            if not m:
                break
            out.append(m.group(1).strip())
    return out


def _value_after(text: str, key: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^\s*{re.escape(key)}:\s*(\S.*)$", text, re.M)]


@pytest.fixture(scope="module")
def github_run(tiny_collapsed, tmp_path_factory):
    """The example workflow's collapse-detect step, run by bash in a checkout as the job sees it (the model, the
    eval file, the example pyproject.toml) with the variables a GitHub runner sets."""
    text = (EXAMPLES / "github-actions.yml").read_text()
    commands = [c for c in github_run_commands(text) if c.startswith("collapse-detect")]
    root = tmp_path_factory.mktemp("runner")
    repo = root / "repo"
    shutil.copytree(tiny_collapsed["dir"], repo / "models" / "classifier")
    (repo / "data").mkdir()
    shutil.copy(tiny_collapsed["eval"], repo / "data" / "eval.csv")
    shutil.copy(EXAMPLES / "pyproject.toml", repo / "pyproject.toml")
    summary = root / "step_summary.md"
    summary.touch()
    env = {**os.environ, "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
           "GITHUB_WORKSPACE": str(repo), "HF_HUB_OFFLINE": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", "-e", "-c", "\n".join(commands)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    return {"text": text, "commands": commands, "repo": repo, "summary": summary, "done": done}


def test_the_github_actions_example_gates_and_publishes(github_run):
    text, repo, done = github_run["text"], github_run["repo"], github_run["done"]
    assert github_run["commands"] == ["collapse-detect models/classifier data/eval.csv --out reports/collapse-detect "
                                      "--junit reports/collapse-detect-junit.xml"]
    assert [c for c in github_run_commands(text) if c.startswith("pip install")] == [
        "pip install torch --index-url https://download.pytorch.org/whl/cpu", 'pip install "collapse-detect @ git+https://github.com/OWNER/collapse-detect@v0.1.0"']
    assert done.returncode == 1, done.stderr  # the collapse fails the step, so the job fails
    assert done.stdout.startswith("collapse-detect: COLLAPSE  (100 rows, 3 classes;")
    # the later steps publish exactly what the command wrote
    [artifact] = _value_after(text, "path")
    [junit] = _value_after(text, "report_paths")
    assert {"report.html", "summary.json", "summary.md", "predictions.csv", "reliability.png"} <= {
        p.name for p in (repo / artifact).iterdir()}
    _, _, cases = _cases((repo / junit).read_text())
    assert "training_record" not in cases  # skipped by the example pyproject.toml
    assert cases["class_never_predicted"].find("failure").get("message").startswith(
        "2 of 3 classes are (almost) never predicted: politics: 0 predicted for 20 gold rows")
    summary = json.loads((repo / artifact / "summary.json").read_text())
    assert summary["metadata"]["config"] == str(repo / "pyproject.toml")
    assert summary["metadata"]["check_params"] == {"low_recall": {"floor": 0.6, "min_support": 10},
                                                   "prediction_absorbed": {"fail_ratio": 1.4}}
    step = github_run["summary"].read_text()
    assert step.startswith("# collapse-detect: COLLAPSE\n\n- Model: `models/classifier`")
    assert "## Findings" in step and "`class_never_predicted`" in step
    assert text.count("if: always()") == 2  # the report and the test results are published on failure too


def test_the_gitlab_example_gates_and_keeps_its_artifacts(github_run, monkeypatch, capsys):
    text = (EXAMPLES / "gitlab-ci.yml").read_text()
    commands = [c for c in gitlab_script_commands(text, "collapse-detect") if c.startswith("collapse-detect")]
    assert len(commands) == 1
    repo = github_run["repo"]
    if commands != github_run["commands"]:  # the same command already ran in this checkout; run a different one
        monkeypatch.chdir(repo)
        monkeypatch.setenv("GITLAB_CI", "true")
        monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
        argv = [os.path.expandvars(a) for a in shlex.split(commands[0])]
        assert main(argv[1:]) == 1  # the console script's entry point, in-process: the job fails on collapse
        assert capsys.readouterr().out.startswith("collapse-detect: COLLAPSE")
    else:
        assert github_run["done"].returncode == 1
    [junit] = _value_after(text, "junit")
    paths = re.search(r"^    paths:\n((?:      - .*\n)+)", text, re.M).group(1)
    for path in re.findall(r"- (.*)", paths):
        assert (repo / path.strip() / "report.html").is_file()
    _, suite, cases = _cases((repo / junit).read_text())
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert {"class_never_predicted", "prediction_absorbed", "no_better_than_majority", "constant_output"} <= failed
    assert "low_recall" not in failed  # a warning, under fail-on = "fail"
    assert suite.get("failures") == str(len(failed)) and suite.get("errors") == "0"
    assert re.search(r"^    when: always$", text, re.M)


def test_the_examples_are_valid_yaml_with_the_expected_shape():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the YAML-free checks above still ran")
    gh = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    steps = gh["jobs"]["collapse-detect"]["steps"]
    assert [s.get("if") for s in steps][-2:] == ["always()", "always()"]
    assert any("collapse-detect models/classifier" in s.get("run", "") for s in steps)
    gl = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    job = gl["collapse-detect"]
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == "reports/collapse-detect-junit.xml"


def test_the_scikit_learn_example_is_judged_from_its_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import sklearn_predictions
    finally:
        sys.path.remove(str(EXAMPLES))
    path = sklearn_predictions.write_predictions(tmp_path)
    code = main(["--predictions", str(path), "--out", "out", "--quiet", "--format", "json"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == 1 and summary["collapsed_classes"] == ["politics", "business"]
    assert summary["stats"]["n"] == 480 and summary["stats"]["top_class"] == "sports"
    assert summary["metadata"]["mode"] == "predictions"
