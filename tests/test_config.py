"""Configuration: [tool.collapse-detect] in pyproject.toml, --config, --set, --only, --skip; flags win; every
mistake is one `Error: ...` line with exit code 2 that lists what is valid."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.checks import REGISTRY
from collapse_detect.cli import build_parser, main
from collapse_detect.config import find_pyproject, load_config, parse_set
from collapse_detect.errors import ConfigError

VALID_CHECKS = ", ".join(REGISTRY)


def _pyproject(folder, body: str):
    path = folder / "pyproject.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def _parse(argv, cwd):
    """What main() does before running: read the config, make it the defaults, parse the flags."""
    parser = build_parser()
    config = load_config(parser, argv, cwd=cwd)
    parser.set_defaults(**config.defaults)
    return parser.parse_args(argv), config


def _error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err.rstrip("\n")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- finding the file


def test_nearest_pyproject_with_the_table_is_found_from_a_subfolder(tmp_path):
    _pyproject(tmp_path, "[tool.collapse-detect]\nseed = 3\n")
    inner = tmp_path / "pkg"
    inner.mkdir()
    _pyproject(inner, "[project]\nname = 'x'\n")  # no table: passed over
    deep = inner / "a" / "b"
    deep.mkdir(parents=True)
    assert find_pyproject(deep) == tmp_path / "pyproject.toml"
    args, config = _parse(["m", "d"], deep)
    assert config.path == tmp_path / "pyproject.toml"
    assert args.seed == 3


def test_no_config_anywhere_leaves_the_built_in_defaults(tmp_path):
    args, config = _parse(["m", "d"], tmp_path)
    assert config.path is None and config.defaults == {} and config.check_params == {}
    assert (args.batch_size, args.max_tokens_per_batch, args.fail_on, args.seed, args.quiet) == (64, 1536, "fail", 0,
                                                                                            False)


# ---------------------------------------------------------------- global keys


def test_file_values_become_defaults_and_explicit_flags_win(tmp_path):
    _pyproject(tmp_path, """
        [tool.collapse-detect]
        fail-on = "warn"
        batch_size = 8
        max-length = 64
        format = ["html", "json"]
        out = "ci-reports"
        seed = 7
        grad-sample = 4
        quiet = true
        text-col = "headline"
        label_col = "topic"
        only = ["low_recall", "class-never-predicted"]
        junit = "junit.xml"
    """)
    args, _ = _parse(["m", "d"], tmp_path)
    assert (args.fail_on, args.batch_size, args.max_length, args.format, args.out, args.seed, args.grad_sample,
            args.quiet, args.text_col, args.label_col, args.only, args.junit) == (
        "warn", 8, 64, {"html", "json"}, "ci-reports", 7, 4, True, "headline", "topic",
        ["low_recall", "class_never_predicted"], "junit.xml")
    args, _ = _parse(["m", "d", "--fail-on", "fail", "--batch-size", "16", "--format", "md", "--seed", "1",
                      "--only", "low_recall"], tmp_path)
    assert (args.fail_on, args.batch_size, args.format, args.seed, args.only) == ("fail", 16, {"md"}, 1,
                                                                                 ["low_recall"])
    assert args.max_length == 64  # not given on the command line: the file's value stays


@pytest.mark.parametrize("body, message", [
    ("batchsize = 8", "unknown key 'batchsize' (did you mean 'batch-size'?); valid keys: "),
    ("batch-size = '8'", "batch-size must be an integer, got '8' (string)"),
    ("batch-size = 0", "batch-size = 0: --batch-size expects a positive integer, got '0'"),
    ("batch-size = true", "batch-size must be an integer, got True (boolean)"),
    ("quiet = 1", "quiet must be true or false, got 1 (integer)"),
    ("fail-on = 'never'", "fail-on must be one of warn, fail, got 'never' (string)"),
    ("out = 3", "out must be a string, got 3 (integer)"),
    ("format = ['html', 'pdf']", "format = 'html,pdf': --format got pdf; choose from html,json,md,png,csv"),
    ("format = 3", "format must be a string or an array of strings, got 3 (integer)"),
    ("only = ['low_recal']", "only = 'low_recal': unknown check 'low_recal' (did you mean 'low_recall'?); "
                             f"valid checks: {VALID_CHECKS}"),
    ("set = ['low_recall.floor=1']", "unknown key 'set'; valid keys: "),
    ("batch_size = 8\nbatch-size = 8", "'batch-size' and 'batch_size' are the same key; keep one"),
])
def test_wrong_global_keys_are_one_line_errors(project, capsys, body, message):
    path = _pyproject(project, f"[tool.collapse-detect]\n{body}\n")
    assert main(["m", "d"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"Error: {path} [tool.collapse-detect]: ")
    assert message in line


def test_unknown_key_error_lists_every_valid_key(project, capsys):
    path = _pyproject(project, "[tool.collapse-detect]\ncolour = 2\n")
    assert main(["m", "d"]) == 2
    core = {"allow-pickle", "batch-size", "checks", "fail-on", "format", "grad-layers", "grad-sample", "junit",
            "label-col", "label-names", "max-length", "max-tokens-per-batch", "only", "out", "pred-col", "quiet",
            "seed", "skip", "text-col", "text-pair-col"}
    line = _error_line(capsys)
    assert line.startswith(f"Error: {path} [tool.collapse-detect]: unknown key 'colour'; valid keys: ")
    listed = line.split("valid keys: ", 1)[1].split(", ")
    assert listed == sorted(listed) and core <= set(listed)  # a flag added later is a key too
    assert not {"config", "predictions", "set", "write-fixed"} & set(listed)


# ---------------------------------------------------------------- check thresholds


def test_check_tables_are_validated_and_normalised(tmp_path):
    _pyproject(tmp_path, """
        [tool.collapse-detect.checks.low-recall]
        floor = 1
        min_support = 3
        [tool.collapse-detect.checks.prediction_absorbed]
        fail-ratio = 2.0
    """)
    _, config = _parse(["m", "d"], tmp_path)
    assert config.check_params == {"low_recall": {"floor": 1.0, "min_support": 3},
                                   "prediction_absorbed": {"fail_ratio": 2.0}}
    assert isinstance(config.check_params["low_recall"]["floor"], float)


@pytest.mark.parametrize("body, message", [
    ("[tool.collapse-detect.checks.low_recal]\nfloor = 0.6",
     "[tool.collapse-detect.checks.low_recal]: unknown check 'low_recal' (did you mean 'low_recall'?); "
     f"valid checks: {VALID_CHECKS}"),
    ("[tool.collapse-detect.checks.low_recall]\nflor = 0.6",
     "[tool.collapse-detect.checks.low_recall]: low_recall has no parameter 'flor' (did you mean 'floor'?); "
     "it takes: floor (default 0.5), min_support (default 5)"),
    ("[tool.collapse-detect.checks.low_recall]\nfloor = 'high'",
     "[tool.collapse-detect.checks.low_recall]: low_recall.floor must be a number, got 'high' (string)"),
    ("[tool.collapse-detect.checks.low_recall]\nmin_support = 2.5",
     "[tool.collapse-detect.checks.low_recall]: low_recall.min_support must be an integer, got 2.5 (number)"),
    ("[tool.collapse-detect.checks]\nlow_recall = 0.6",
     "[tool.collapse-detect.checks.low_recall]: must be a table of parameters, got 0.6 (number)"),
])
def test_wrong_check_params_are_one_line_errors(project, capsys, body, message):
    path = _pyproject(project, body + "\n")
    assert main(["m", "d"]) == 2
    assert _error_line(capsys) == f"Error: {path} {message}"


def test_set_reads_toml_values_and_checks_them():
    assert parse_set(["low_recall.floor=0.6", "low-recall.min-support=3",
                      "prediction_absorbed.alpha=1"]) == {
        "low_recall": {"floor": 0.6, "min_support": 3}, "prediction_absorbed": {"alpha": 1.0}}
    with pytest.raises(ConfigError) as err:
        parse_set(["low_recall.floor=high"])
    assert str(err.value) == ("--set low_recall.floor=high: low_recall.floor must be a number, "
                              "got 'high' (string)")
    assert parse_set(["untrained_head.init_ratio=[0.4, 3]"]) == {"untrained_head": {"init_ratio": (0.4, 3.0)}}
    with pytest.raises(ConfigError) as err:
        parse_set(["untrained_head.init_ratio=0.4"])
    assert str(err.value) == ("--set untrained_head.init_ratio=0.4: untrained_head.init_ratio must be an array of "
                              "2 numbers, got 0.4 (number)")
    with pytest.raises(ConfigError) as err:
        parse_set(["floor=0.6"])
    assert str(err.value) == ("--set expects CHECK.PARAM=VALUE (for example low_recall.floor=0.6), "
                              "got 'floor=0.6'")


def test_cli_usage_errors_for_set_only_skip(project, capsys):
    assert main(["m", "d", "--set", "low_recall.flor=0.6"]) == 2
    assert _error_line(capsys) == ("Error: --set low_recall.flor=0.6: low_recall has no parameter 'flor' "
                                   "(did you mean 'floor'?); it takes: floor (default 0.5), min_support (default 5)")
    assert main(["m", "d", "--skip", "nope"]) == 2
    assert _error_line(capsys) == (f"Error: argument --skip: unknown check 'nope'; valid checks: {VALID_CHECKS} "
                                   "(see collapse-detect --help)")


def test_config_flag_reads_a_standalone_file_and_a_missing_one_is_an_error(project, capsys):
    standalone = project / "gate.toml"
    standalone.write_text("fail-on = 'warn'\n[checks.low_recall]\nfloor = 0.7\n", encoding="utf-8")
    args, config = _parse(["m", "d", "--config", str(standalone)], project)
    assert args.fail_on == "warn" and config.check_params == {"low_recall": {"floor": 0.7}}
    assert main(["m", "d", "--config", "missing.toml"]) == 2
    assert _error_line(capsys) == "Error: config file 'missing.toml' does not exist (--config)"
    (project / "other").mkdir()
    plain = _pyproject(project / "other", "[project]\nname = 'x'\n")
    assert main(["m", "d", "--config", str(plain)]) == 2
    assert _error_line(capsys) == f"Error: {str(plain)!r} has no [tool.collapse-detect] table (--config)"


def test_broken_toml_is_reported_with_the_file(project, capsys):
    path = _pyproject(project, "[tool.collapse-detect]\nseed = \n")
    assert main(["m", "d"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"Error: {str(path)!r} is not valid TOML: ")


# ---------------------------------------------------------------- end to end: thresholds change the verdict


@pytest.fixture
def borderline_predictions(project):
    """Predictions where 'politics' has recall 0.55 (11 of 20): low_recall fires with floor 0.6, not with 0.5."""
    names = ["sports", "politics", "business"]
    gold = np.repeat([0, 1, 2], [60, 20, 20])
    pred = gold.copy()
    pred[60:69] = 0  # 9 of 20 politics rows predicted as sports
    probs = np.full((100, 3), 0.1)
    probs[np.arange(100), pred] = 0.8
    frame = pd.DataFrame({"gold": [names[g] for g in gold]})
    for c, name in enumerate(names):
        frame[f"prob_{name}"] = probs[:, c]
    frame.to_csv(project / "preds.csv", index=False)
    return project / "preds.csv"


def _run(project, argv):
    code = main(["--predictions", str(project / "preds.csv"), "--out", str(project / "out"), "--quiet",
                 "--format", "json", *argv])
    summary = json.loads((project / "out" / "summary.json").read_text())
    return code, summary


def test_thresholds_from_the_file_and_set_decide_the_findings(project, borderline_predictions):
    code, summary = _run(project, [])
    assert code == 0 and [f["check_id"] for f in summary["findings"]] == []
    path = _pyproject(project, """
        [tool.collapse-detect]
        fail-on = "warn"
        [tool.collapse-detect.checks.low_recall]
        floor = 0.6
    """)
    code, summary = _run(project, [])
    [finding] = summary["findings"]
    assert finding["check_id"] == "low_recall" and finding["classes"] == ["politics"]
    assert finding["summary"] == "Recall below 0.60 for 1 class(es): politics 0.55 (n=20)."
    assert code == 1 and summary["fail_on"] == "warn"  # the file's fail-on = "warn" gates on the warning
    assert summary["metadata"]["config"] == str(path)
    assert summary["metadata"]["check_params"] == {"low_recall": {"floor": 0.6}}
    code, summary = _run(project, ["--set", "low_recall.floor=0.5"])  # the flag wins over the file
    assert code == 0 and summary["findings"] == []
    code, summary = _run(project, ["--skip", "low_recall"])
    assert code == 0 and "low_recall" not in summary["metadata"]["checks_run"]
    code, summary = _run(project, ["--only", "low_recall,class_never_predicted", "--fail-on", "fail"])
    assert code == 0 and summary["metadata"]["checks_run"] == ["class_never_predicted", "low_recall"]
    assert [f["check_id"] for f in summary["findings"]] == ["low_recall"]
    _pyproject(project, """
        [tool.collapse-detect]
        skip = []
    """)
    code, summary = _run(project, [])  # an empty list skips nothing
    assert code == 0 and "low_recall" in summary["metadata"]["checks_run"]


def test_a_path_from_the_file_is_named_as_the_files_key(project, capsys):
    path = _pyproject(project, """
        [tool.collapse-detect]
        train-file = "data/train.csv"
    """)
    model = Path(__file__).resolve().parents[1] / "samples" / "models" / "healthy"
    data = Path(__file__).resolve().parents[1] / "samples" / "headlines_eval.csv"
    assert main([str(model), str(data), "--out", str(project / "o")]) == 2
    assert capsys.readouterr().err == (f"Error: train-file (in {path}; relative paths start from the working "
                                       "directory) 'data/train.csv' does not exist\n")
    assert main([str(model), str(data), "--out", str(project / "o"), "--train-file", "x.csv"]) == 2
    assert capsys.readouterr().err == "Error: --train-file 'x.csv' does not exist\n"
