"""User mistakes found before any work (exit 2, one line, nothing written), one run per report folder, and text
from the data kept inert in the terminal and in summary.md."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.cli import main
from collapse_detect.config import parse_set
from collapse_detect.errors import ConfigError
from collapse_detect.outputs import MANIFEST


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Each test stages its report in its own temp folder, so leftovers are this test's alone."""
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("collapse-detect-*")}


def _fails_cleanly(capsys, argv, expect: str, nothing_at: Path | None = None) -> str:
    before = _leftovers()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err
    assert expect in err, err
    assert _leftovers() <= before  # no staged report left in the temp folder
    if nothing_at is not None:
        assert not nothing_at.exists()
    return err


@pytest.mark.parametrize("value", ["-1", str(2**32), "99999999999999999999999", "1.5"])
def test_seed_out_of_range_is_a_usage_error(capsys, tmp_path, value):
    _fails_cleanly(capsys, ["m", "d.csv", "--seed", value, "--out", str(tmp_path / "o")], "--seed expects an "
                   "integer from 0 to 4294967295", tmp_path / "o")


def test_config_file_seed_is_checked_like_the_flag(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("seed = -1\n")
    _fails_cleanly(capsys, ["m", "d.csv", "--config", str(cfg)], "seed")


def test_config_file_that_is_not_utf8(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"\xff\xfe bad")
    _fails_cleanly(capsys, ["m", "d.csv", "--config", str(cfg)], "is not UTF-8 text")


@pytest.mark.parametrize("item, expect", [
    ("low_recall.floor=nan", "must be finite and >= 0"),
    ("constant_output.max_spread=inf", "must be finite and >= 0"),
    ("low_recall.floor=-1", "must be finite and >= 0"),
    ("low_recall.min_support=-3", "must be finite and >= 0"),
    ("low_recall.floor=1.5", "is a share between 0 and 1"),
    ("prediction_absorbed.alpha=0", "significance level"),
    ("prediction_absorbed.alpha=-0.5", "must be finite and >= 0"),
    ("untrained_head.init_ratio=[2.0, 0.5]", "(low, high) range"),
])
def test_set_refuses_values_a_check_cannot_use(item, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        parse_set([item])


def test_set_keeps_values_in_range():
    assert parse_set(["low_recall.floor=0.6", "prediction_absorbed.alpha=0.05", "untrained_head.init_ratio=[0.25, 4]",
                      "minority_gradient_ratio.max_ratio=8"]) == {
        "low_recall": {"floor": 0.6}, "prediction_absorbed": {"alpha": 0.05},
        "untrained_head": {"init_ratio": (0.25, 4.0)}, "minority_gradient_ratio": {"max_ratio": 8.0}}


@pytest.mark.parametrize("length", ["1", "2"])
def test_max_length_without_room_for_text(capsys, tiny_collapsed, tmp_path, length):
    # 2 is exactly [CLS] + [SEP]: every row would be the same two tokens
    _fails_cleanly(capsys, [str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--max-length", length,
                            "--out", str(tmp_path / "o"), "--quiet"],
                   f"--max-length {length} leaves no room for text: the tokenizer adds 2 special tokens",
                   tmp_path / "o")


def test_max_length_truncates_and_counts(tiny_collapsed, tmp_path):
    code = main([str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--max-length", "4",
                 "--out", str(tmp_path / "o"), "--quiet", "--format", "json"])
    assert code in (0, 1)
    probe = json.loads((tmp_path / "o" / "summary.json").read_text())["stats"]["tokenization"]
    assert probe["max_length"] == 4
    # every headline is longer than [CLS] + 2 tokens + [SEP]
    assert probe["truncated_rows"] == len(tiny_collapsed["eval_df"])


def test_grad_layers_beyond_the_model(capsys, tiny_collapsed, tmp_path):
    err = _fails_cleanly(capsys, [str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--grad-sample", "4",
                                  "--grad-layers", "100", "--out", str(tmp_path / "o"), "--quiet"],
                         "--grad-layers 100 but the model has", tmp_path / "o")
    assert "pass at most 2" in err


@pytest.mark.parametrize("flag, target, expect", [
    ("--out", "afile/sub", "is a file"),
    ("--junit", "afile/j.xml", "is a file"),
    ("--junit", "adir", "is a folder; pass a file name"),
    ("--write-fixed", "afile/sub", "is a file"),
])
def test_unusable_output_paths_are_refused_before_the_probe(capsys, tiny_collapsed, tmp_path, flag, target,
                                                            expect):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = tmp_path / "o"
    argv = [str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--quiet", "--out", str(out),
            flag, str(tmp_path / target)]
    _fails_cleanly(capsys, argv, expect, out if flag != "--out" else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "staging"]


def test_read_only_parent_is_refused(capsys, tmp_path, monkeypatch):
    import os

    import collapse_detect.outputs as outputs

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # permission bits do not bind root (CI runs as root), so the check's answer for this folder is simulated
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    _fails_cleanly(capsys, ["m", "d.csv", "--out", str(locked / "o")], "no write permission in")
    assert not (locked / "o").exists()


def test_a_report_folder_holds_one_run(tiny_collapsed, tiny_trained, tmp_path):
    out = tmp_path / "o"
    assert main([str(tiny_trained["dir"]), str(tiny_trained["eval"]), "--out", str(out), "--quiet"]) == 0
    first = {p.name for p in out.iterdir()}
    assert {"report.html", "summary.md", "predictions.csv", "prior_vs_predicted.png", MANIFEST} <= first
    (out / "notes.txt").write_text("mine")
    assert main([str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--out", str(out), "--quiet",
                 "--format", "json"]) == 1
    # the HEALTHY report of the first run is gone; the user's own file stays
    assert {p.name for p in out.iterdir()} == {"summary.json", "notes.txt", MANIFEST}
    assert json.loads((out / "summary.json").read_text())["verdict"] == "COLLAPSE"
    assert (out / MANIFEST).read_text().split() == ["summary.json"]


@pytest.mark.parametrize("kept, expect", [
    (("config.json", "model.safetensors"), "has no tokenizer files"),
    (("config.json", "model.safetensors", "tokenizer_config.json"), "cannot load the tokenizer from"),
])
def test_model_folder_without_tokenizer_files(capsys, tiny_collapsed, tmp_path, kept, expect):
    model = tmp_path / "model"
    model.mkdir()
    for name in kept:
        shutil.copy(tiny_collapsed["dir"] / name, model / name)
    _fails_cleanly(capsys, [str(model), str(tiny_collapsed["eval"]), "--out", str(tmp_path / "o")],
                   expect, tmp_path / "o")


NASTY = ["[click](javascript:alert(1))", "![i](http://evil.example/x.png)", "a\nFAKE: collapse-detect: HEALTHY",
         "esc\x1b[31mred", "tick`x``y"]


def _nasty_predictions(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    n, k = 200, len(NASTY)
    gold = rng.choice(k, n, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    probs = rng.dirichlet(np.ones(k), n)
    probs[:, 0] += 2.0  # everything goes to the first class: findings name the others
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"gold": [NASTY[g] for g in gold]})
    for c, name in enumerate(NASTY):
        frame[f"prob_{name}"] = probs[:, c]
    path = tmp_path / "preds.csv"
    frame.to_csv(path, index=False)
    return path


def test_class_names_stay_text_in_markdown_and_terminal(capsys, tmp_path):
    path = _nasty_predictions(tmp_path)
    out = tmp_path / "o"
    code = main(["--predictions", str(path), "--out", str(out), "--format", "md,json"])
    terminal = capsys.readouterr().out
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [c["class"] for c in summary["stats"]["per_class"]] == NASTY  # the data keeps its own names
    md = (out / "summary.md").read_text()
    for text in (md, terminal):
        assert "\x1b" not in text
        assert not any(line.startswith("FAKE") for line in text.splitlines())
        assert "a\\nFAKE" in text
    prose = re.sub(r"^(`{3,})python\n.*?^\1$", "", md, flags=re.S | re.M)  # code blocks show repr() names
    assert prose.count("```") == 0 and "CLASS_WEIGHTS" not in prose
    assert "](" not in prose.replace("\\](", "")  # no link or image syntax survives
    assert "\\[click\\](javascript" in prose and "!\\[i\\](http" in prose
    assert "tick\\`x\\`\\`y" in prose
    assert not re.search(r"(?<!\\)[<>&]", prose)  # every <, > and & backslash-escaped: no HTML, no entities


@pytest.mark.parametrize("rows", [1, 5])
def test_eval_set_of_one_class_is_refused(capsys, tiny_collapsed, tmp_path, rows):
    path = tmp_path / "one.csv"
    df = tiny_collapsed["eval_df"]
    df[df.label == "business"].head(rows).to_csv(path, index=False)
    err = _fails_cleanly(capsys, [str(tiny_collapsed["dir"]), str(path), "--out", str(tmp_path / "o"), "--quiet"],
                         f"every gold label is 'business' ({rows} row", tmp_path / "o")
    assert "at least two classes" in err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_allow_pickle_never_runs_a_pickle_that_holds_code(capsys, tiny_collapsed, tmp_path):
    import pickle

    model = tmp_path / "model"
    model.mkdir()
    for name in tiny_collapsed["dir"].iterdir():
        if name.name != "model.safetensors":
            shutil.copy(name, model / name.name)
    marker = tmp_path / "ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    err = _fails_cleanly(capsys, [str(model), str(tiny_collapsed["eval"]), "--allow-pickle", "--quiet",
                                  "--out", str(tmp_path / "o")],
                         "holds more than tensors, so torch's safe loader (weights_only=True) refused it",
                         tmp_path / "o")
    assert not marker.exists()
    assert "weights_only=False" not in err  # no advice to load it unsafely


def test_ctrl_c_before_the_run_is_one_line(capsys, monkeypatch):
    import collapse_detect.config as config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load_config", interrupted)
    assert main(["m", "d.csv"]) == 130
    assert capsys.readouterr().err == "Error: interrupted\n"


def test_an_unusable_name_is_a_usage_error(capsys, tmp_path):
    _fails_cleanly(capsys, ["m", "d.csv", "--out", str(tmp_path / ("x" * 300) / "o")], "cannot be used: File name "
                   "too long")


def test_the_manifest_cannot_reach_outside_report_files(tiny_trained, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / MANIFEST).symlink_to(victim)  # a manifest that is a link is replaced, never written through
    (out / "pyproject.toml").write_text("mine")
    (out / "notes").mkdir()
    assert main([str(tiny_trained["dir"]), str(tiny_trained["eval"]), "--out", str(out), "--quiet",
                  "--format", "json"]) == 0
    assert victim.read_text() == "keep" and not (out / MANIFEST).is_symlink()
    # an edited manifest naming files no run writes, a folder and a path outside: none of them is touched
    (out / MANIFEST).write_text("pyproject.toml\nnotes\n../victim.txt\nsummary.md\n")
    (out / "summary.md").write_text("stale")
    assert main([str(tiny_trained["dir"]), str(tiny_trained["eval"]), "--out", str(out), "--quiet",
                  "--format", "json"]) == 0
    assert (out / "pyproject.toml").read_text() == "mine" and (out / "notes").is_dir() and victim.exists()
    assert not (out / "summary.md").exists()  # a report file the earlier run listed and this one did not write


def test_names_plots_cannot_draw_or_parse_still_make_a_report(capsys, tmp_path):
    # "$...$" would start matplotlib's math mode (and fail to parse), CJK is missing from its default font,
    # ESC is a control character: the report is written, no warning, and the terminal table stays aligned
    import warnings

    names = ["$\\frac$", "日本語ニュース", "esc\x1b[31mred"]
    rng = np.random.default_rng(1)
    gold = rng.choice(3, 90)
    probs = np.eye(3)[gold] * 0.6 + 0.4 / 3
    frame = pd.DataFrame({"gold": [names[g] for g in gold], **{f"prob_{n}": probs[:, c] for c, n in enumerate(names)}})
    path = tmp_path / "preds.csv"
    frame.to_csv(path, index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["--predictions", str(path), "--out", str(tmp_path / "o")])
    terminal = capsys.readouterr().out
    assert code == 0
    assert not [w for w in caught if "Glyph" in str(w.message)]
    written = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"prior_vs_predicted.png", "confusion_matrix.png", "report.html"} <= written
    table = terminal.splitlines()[2:6]
    assert table[0].lstrip().startswith("class") and "esc\\x1b[31mred" in terminal
    assert len({len(line) for line in table}) == 1  # every row as wide as the header


# ------------------------------------------------------------------ a gate that cannot look, inputs, stdout

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "headlines_eval.csv"
COLLAPSED = ROOT / "samples" / "models" / "collapsed"


@pytest.mark.parametrize("flags, expect", [
    (["--only", "low_recall", "--skip", "low_recall"], "(running: none)"),
    (["--only", "training_record,long_inputs_truncated"], "(running: long_inputs_truncated, training_record)"),
    (["--only", "low_recall"], "at --fail-on fail (running: low_recall)"),  # it only ever warns
])
def test_a_selection_without_a_collapse_check_is_refused(capsys, tmp_path, flags, expect):
    err = _fails_cleanly(capsys, [str(COLLAPSED), str(SAMPLE), "--out", str(tmp_path / "o"), *flags],
                         "--only/--skip leave no check that can fail the gate", nothing_at=tmp_path / "o")
    assert expect in err


def test_a_warning_check_gates_under_fail_on_warn(capsys, tmp_path):
    assert main([str(COLLAPSED), str(SAMPLE), "--out", str(tmp_path / "o"), "--only", "low_recall", "--fail-on",
                 "warn", "--quiet"]) == 1


def test_symlinks_do_not_smuggle_an_input_into_the_report_folder(capsys, tmp_path):
    out = tmp_path / "rep"
    assert main([str(COLLAPSED), str(SAMPLE), "--out", str(out), "--quiet"]) == 1
    link = tmp_path / "eval.csv"  # a link outside the folder to the file the report writes
    link.symlink_to(out / "predictions.csv")
    _fails_cleanly(capsys, [str(COLLAPSED), str(link), "--out", str(out)], "is in the report folder --out")
    (tmp_path / "preds.csv").write_bytes((out / "predictions.csv").read_bytes())
    (out / "predictions.csv").unlink()
    (out / "predictions.csv").symlink_to(tmp_path / "preds.csv")  # a link inside it to a file elsewhere
    _fails_cleanly(capsys, ["--predictions", str(out / "predictions.csv"), "--out", str(out)],
                   "is in the report folder --out")
    assert (out / "predictions.csv").is_symlink() and (tmp_path / "preds.csv").exists()


def test_predictions_mode_refuses_checks_it_cannot_run_as_the_only_ones(capsys, tmp_path):
    preds = _nasty_predictions(tmp_path)
    err = _fails_cleanly(capsys, ["--predictions", str(preds), "--out", str(tmp_path / "o"), "--only", "input_ignored"],
                         "(running: none; input_ignored cannot run here (needs the model))")
    assert "a gate that cannot look must not pass" in err


def test_an_input_file_in_the_report_folder_is_never_replaced_or_removed(capsys, tmp_path):
    out = tmp_path / "rep"
    assert main([str(COLLAPSED), str(SAMPLE), "--out", str(out), "--quiet"]) == 1
    before = (out / "predictions.csv").read_bytes()
    _fails_cleanly(capsys, ["--predictions", str(out / "predictions.csv"), "--out", str(out)],
                   f"--predictions {str(out / 'predictions.csv')!r} is in the report folder --out")
    assert (out / "predictions.csv").read_bytes() == before
    data = out / "predictions.csv"  # an eval file the report would overwrite
    _fails_cleanly(capsys, [str(COLLAPSED), str(data), "--out", str(out)],
                   f"DATA {str(data)!r} is in the report folder --out")
    assert (out / "predictions.csv").read_bytes() == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_does_not_change_the_verdict(tmp_path):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "collapse_detect", str(ROOT / "samples" / "models" / "healthy"),
                               str(SAMPLE), "--out", str(tmp_path / "o"), "--format", "json"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "warning: could not print the summary" in proc.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["verdict"] in ("HEALTHY", "WARNINGS")


def test_version_and_predictions_mode_formats(capsys, tmp_path):
    from collapse_detect import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"collapse-detect {__version__}"
    _fails_cleanly(capsys, ["--predictions", str(_nasty_predictions(tmp_path)), "--out", str(tmp_path / "o"),
                            "--format", "csv"], "--format csv writes predictions.csv, which a --predictions run reads")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("flag, target", [("--write-fixed", "/proc/collapse-detect-fixed"),
                                          ("--junit", "/proc/collapse-detect-junit.xml")])
def test_an_output_that_fails_only_when_written_is_one_line_and_leaves_nothing(capsys, tmp_path, flag, target):
    """A path that passes the early checks but cannot be written (as root, /proc allows every access test; a
    full disk does the same): --write-fixed gave a traceback and exit 1, and --junit left the report written."""
    out = tmp_path / "o"
    err = _fails_cleanly(capsys, [str(COLLAPSED), str(SAMPLE), "--out", str(out), flag, target, "--quiet"],
                         f"cannot write {flag} {target!r}: ", nothing_at=out)
    assert not Path(target).exists()
    assert err.count("Error") == 1


def test_a_defect_of_the_tool_exits_3_not_as_a_verdict(capsys, tmp_path, monkeypatch):
    """An unexpected exception is neither a collapse (1) nor a user mistake (2): exit 3, with the traceback for
    a bug report and a last line that says nothing was judged; the report folder is not written."""
    import collapse_detect.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("state the probe cannot be in")

    monkeypatch.setattr(api, "probe_files", broken)
    out = tmp_path / "o"
    code = main([str(COLLAPSED), str(SAMPLE), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(
        "Error: collapse-detect failed unexpectedly (RuntimeError: state the probe cannot be in); nothing was judged")
    assert not out.exists()


def test_write_fixed_that_fails_midway_leaves_no_folder(capsys, tmp_path, monkeypatch):
    """safetensors reports a full disk with its own error type, not OSError: it gave a traceback and exit 3 with
    a half-written folder. Any failure while writing the fixed checkpoint is now one line, and the folder goes."""
    import collapse_detect.model_evidence as evidence

    class DiskFull(Exception):
        pass

    def half_written(model, tokenizer, offsets, out_dir, source_dir=None):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise DiskFull("Error while serializing: No space left on device")

    monkeypatch.setattr(evidence, "write_fixed_checkpoint", half_written)
    fixed, out = tmp_path / "fixed", tmp_path / "o"
    _fails_cleanly(capsys, [str(COLLAPSED), str(SAMPLE), "--out", str(out), "--write-fixed", str(fixed), "--quiet"],
                   f"cannot write --write-fixed {str(fixed)!r}: Error while serializing: No space left on device",
                   nothing_at=out)
    assert not fixed.exists()


def test_a_report_that_cannot_land_leaves_no_junit_file(capsys, tmp_path, monkeypatch):
    """The JUnit file is staged before the report lands and moved in after it: a report that cannot be moved into
    --out leaves no JUnit file claiming a verdict."""
    from collapse_detect.errors import InputError
    from collapse_detect.outputs import OutputWriter

    def refuse(self):  # as commit() fails: the staged files go, then one error
        self.abort()
        raise InputError(f"cannot write the report into {str(self.out_dir)!r}: No space left on device")

    monkeypatch.setattr(OutputWriter, "commit", refuse)
    junit = tmp_path / "ci" / "junit.xml"
    _fails_cleanly(capsys, [str(COLLAPSED), str(SAMPLE), "--out", str(tmp_path / "o"), "--junit", str(junit),
                            "--quiet"], "No space left on device")
    assert not junit.exists() and not [p for p in junit.parent.iterdir()]
