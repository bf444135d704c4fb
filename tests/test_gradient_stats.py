"""Gradient-norm statistics by class: the probe's numbers, the checks on them, and training_args.bin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collapse_detect.api import RunOptions, diagnose_files
from collapse_detect.checks import REGISTRY, Severity
from collapse_detect.stats import Accumulator, compute_stats


def _grad_stats(norms_by_class: dict[int, list[float]], k: int = 3):
    gold = np.concatenate([[c] * len(v) for c, v in norms_by_class.items()])
    norms = np.concatenate([v for v in norms_by_class.values()])
    acc = Accumulator([f"c{i}" for i in range(k)])
    logits = np.zeros((len(gold), k))
    logits[np.arange(len(gold)), gold] = 3.0
    acc.update(np.arange(len(gold)), gold, logits, grad_norms={"head": norms})
    stats = compute_stats(acc)
    stats["model"] = {}
    return stats


def test_gradient_statistics_by_class_are_exact():
    stats = _grad_stats({0: [1.0, 1.0, 2.0, 4.0], 1: [10.0, 30.0], 2: [6.0, 6.0]})
    g = stats["gradients"]["head"]
    per = {c["class"]: c for c in g["per_class"]}
    total = 8.0 + 40.0 + 12.0
    assert per["c0"]["mean"] == pytest.approx(2.0) and per["c0"]["median"] == pytest.approx(1.5)
    assert per["c0"]["p90"] == pytest.approx(np.quantile([1, 1, 2, 4], 0.9))
    assert per["c1"]["mass_share"] == pytest.approx(40 / total)
    assert per["c1"]["example_share"] == pytest.approx(2 / 8)
    assert per["c1"]["ratio_to_majority"] == pytest.approx(20.0 / 2.0)


def test_gradient_checks_fire_on_a_dominating_minority_and_not_on_balance():
    skewed = _grad_stats({0: [0.1] * 80, 1: [5.0] * 10, 2: [0.2] * 10})
    [dom] = REGISTRY["gradient_dominated"].func(skewed)
    assert dom.classes == ["c1"] and dom.severity is Severity.WARN
    assert dom.evidence["mass_share"] == pytest.approx(50 / (8 + 50 + 2))
    [ratio] = REGISTRY["minority_gradient_ratio"].func(skewed)
    assert ratio.classes == ["c1"] and "c1 50.0x" in ratio.summary
    even = _grad_stats({0: [1.0] * 80, 1: [1.2] * 10, 2: [0.9] * 10})
    assert REGISTRY["gradient_dominated"].func(even) == []
    assert REGISTRY["minority_gradient_ratio"].func(even) == []


def test_vanishing_gradients_compares_encoder_with_head():
    stats = _grad_stats({0: [1.0] * 10, 1: [1.0] * 10, 2: [1.0] * 10})
    stats["gradients"]["ghost:encoder"] = {"n": 30, "mean": 1e-5, "per_class": []}
    [f] = REGISTRY["vanishing_gradients"].func(stats)
    assert "the encoder's mean gradient norm 1.00e-05 is 1.0e-05 of the head's" in f.summary
    stats["gradients"]["ghost:encoder"]["mean"] = 0.5
    assert REGISTRY["vanishing_gradients"].func(stats) == []


def test_probe_reports_head_norms_on_every_row_and_ghost_norms_on_the_stratified_sample(tiny_trained):
    d = diagnose_files(tiny_trained["dir"], tiny_trained["eval"], RunOptions(grad_sample=4, grad_layers=1))
    grads = d.stats["gradients"]
    assert grads["head"]["n"] == 200  # every row
    assert [c["n"] for c in grads["ghost:total"]["per_class"]] == [4, 4, 4]  # 4 rows per class
    assert {"ghost:layer.1", "ghost:pooler", "ghost:encoder", "ghost:total"} <= set(grads)
    assert "ghost:layer.0" not in grads and "ghost:embeddings" not in grads  # only the last block
    # the closed-form head norm of one row, recomputed by hand: ||p - onehot(y)|| * sqrt(||h||^2 + 1)
    model, tok = tiny_trained["model"], tiny_trained["tokenizer"]
    text, label = tiny_trained["eval_df"].iloc[0]
    captured = {}
    hook = model.classifier.register_forward_hook(lambda m, i, o: captured.update(h=i[0].detach()))
    with torch.no_grad():
        p = torch.softmax(model(**tok([text], return_tensors="pt")).logits, -1)[0]
    hook.remove()
    y = ["sports", "politics", "business"].index(label)
    err = p.clone()
    err[y] -= 1
    expected = float(err.norm() * torch.sqrt(captured["h"].norm() ** 2 + 1))
    values = d.stats["_grad_samples"]["head"][y]
    assert min(abs(v - expected) for v in values) < 1e-5 * max(expected, 1e-6)


def test_training_args_bin_is_read_only_with_allow_pickle(tiny_trained, tmp_path):
    import shutil

    from transformers import TrainingArguments

    ckpt = tmp_path / "with_args"
    shutil.copytree(tiny_trained["dir"], ckpt)
    torch.save(TrainingArguments(output_dir=str(tmp_path / "o"), learning_rate=3e-4, report_to="none"),
               ckpt / "training_args.bin")
    closed = diagnose_files(ckpt, tiny_trained["eval"], RunOptions())
    assert closed.stats["evidence"]["training_args"]["read"] is False
    assert "pass --allow-pickle" in closed.stats["evidence"]["training_args"]["note"]
    opened = diagnose_files(ckpt, tiny_trained["eval"], RunOptions(allow_pickle=True))
    assert opened.stats["evidence"]["training_args"]["read"] is True
    assert opened.stats["evidence"]["training_args"]["learning_rate"] == pytest.approx(3e-4)
    assert opened.stats["evidence"]["training_args"]["eval_strategy"] == "no"  # an enum member, as its value
    assert opened.stats["evidence"]["training_args"]["weight_decay"] == 0.0


class _Payload:
    """Pickles as a call to os.system: what a crafted training_args.bin would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_training_args_bin_runs_nothing_it_names(tiny_trained, tmp_path):
    """With --allow-pickle, a training_args.bin whose pickle calls os.system is read without calling it, in the
    zip format torch.save writes and as a bare pickle; the run goes on and says the file could not be read."""
    import pickle
    import shutil

    from collapse_detect.checkpoint import read_saved_object

    marker = tmp_path / "ran"
    ckpt = tmp_path / "crafted"
    shutil.copytree(tiny_trained["dir"], ckpt)
    torch.save({"learning_rate": _Payload(marker)}, ckpt / "training_args.bin")
    saved = read_saved_object(ckpt / "training_args.bin")
    assert saved == {"learning_rate": "<posix.system>"} and not marker.exists()
    d = diagnose_files(ckpt, tiny_trained["eval"], RunOptions(allow_pickle=True))
    assert not marker.exists()
    assert d.stats["evidence"]["training_args"]["learning_rate"] == "<posix.system>"
    (ckpt / "training_args.bin").write_bytes(pickle.dumps(_Payload(marker)))  # the older, bare-pickle format
    d = diagnose_files(ckpt, tiny_trained["eval"], RunOptions(allow_pickle=True))
    assert not marker.exists()
    assert d.stats["evidence"]["training_args"]["read"] is False
    assert "zip archive" in d.stats["evidence"]["training_args"]["note"]
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: loaded by pickle itself, it runs
    assert marker.exists()


def test_a_saved_object_that_expands_without_end_is_refused(tmp_path):
    """A pickle can refer to one list many times: 10 levels of 1,000 references are 20 kB on disk and 1e30
    values once copied out; the reader stops at its value budget instead of running for ever."""
    import pickle
    import zipfile

    from collapse_detect.checkpoint import PLAIN_VALUE_LIMIT, read_saved_object

    nested = [1]
    for _ in range(10):
        nested = [nested] * 1000
    path = tmp_path / "training_args.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(nested, protocol=2))
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=f"more than {PLAIN_VALUE_LIMIT} values"):
        read_saved_object(path)
    small = [[1] * 10] * 10  # shared references within the budget are copied out
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(small, protocol=2))
    assert read_saved_object(path) == small


def _grad_stats_two_groups(head_by_class, ghost_by_class, k=3):
    """Every row has a head norm; ghost norms only on the rows given (NaN marks the rows not sampled)."""
    gold = np.concatenate([[c] * len(v) for c, v in head_by_class.items()])
    head = np.concatenate([v for v in head_by_class.values()])
    ghost = np.full(len(gold), np.nan)
    for c, values in ghost_by_class.items():
        rows = np.flatnonzero(gold == c)[:len(values)]
        ghost[rows] = values
    acc = Accumulator([f"c{i}" for i in range(k)])
    logits = np.zeros((len(gold), k))
    logits[np.arange(len(gold)), gold] = 3.0
    acc.update(np.arange(len(gold)), gold, logits, grad_norms={"head": head, "ghost:total": ghost})
    stats = compute_stats(acc)
    stats["model"] = {}
    return stats


def test_a_stratified_sample_estimates_the_mass_of_the_whole_eval_set():
    # 60 / 20 / 20 rows; ghost norms on 10 rows of each class: class c1's rows are 5x heavier
    stats = _grad_stats_two_groups({0: [1.0] * 60, 1: [5.0] * 20, 2: [1.0] * 20},
                                   {0: [1.0] * 10, 1: [5.0] * 10, 2: [1.0] * 10})
    g = stats["gradients"]["ghost:total"]
    per = {c["class"]: c for c in g["per_class"]}
    assert g["sampled"] is True and not stats["gradients"]["head"]["sampled"]
    # mass = mean x eval rows: 60, 100, 20 (the sample alone would say 10, 50, 10)
    assert per["c1"]["mass_share"] == pytest.approx(100 / 180) and per["c1"]["example_share"] == pytest.approx(0.2)
    [dom] = REGISTRY["gradient_dominated"].func(stats)
    assert dom.summary == ("'c1' carries 56% of the gradient mass (ghost:total, estimated from 10 or more measured "
                           "rows per class) with 20% of the rows: training on this data would be driven by it.")


def test_too_small_a_sample_falls_back_to_the_head_norms():
    stats = _grad_stats_two_groups({0: [0.1] * 60, 1: [5.0] * 20, 2: [4.0] * 20},
                                   {0: [0.1] * 3, 1: [5.0] * 3, 2: [4.0] * 3})
    [ratio] = REGISTRY["minority_gradient_ratio"].func(stats)
    assert ratio.evidence["group"] == "head" and "c1 50.0x" in ratio.summary


def test_a_few_hard_rows_are_not_called_an_unfitted_class():
    # c1: 16 fitted rows and 4 confidently wrong ones; its mean is 20x the majority's, its median is not
    stats = _grad_stats(({0: [0.2] * 60, 1: [0.1] * 16 + [20.0] * 4, 2: [0.2] * 20}))
    [ratio] = REGISTRY["minority_gradient_ratio"].func(stats)
    assert ratio.classes == ["c1"] and ratio.evidence["median_ratio"]["c1"] == pytest.approx(0.5)
    assert ratio.cause.startswith("For c1 the median row's gradient is not large: a few rows")
    broad = _grad_stats({0: [0.2] * 60, 1: [4.0] * 20, 2: [0.2] * 20})
    [ratio] = REGISTRY["minority_gradient_ratio"].func(broad)
    assert ratio.cause.startswith("The majority class's examples are already easy")


def test_saved_numpy_numbers_and_malformed_files(tmp_path):
    """numpy numbers (a sweep's np.float64 learning rate) read as numbers, bytes stored the protocol-2 way
    included; an archive whose member cannot be read (corrupt deflate data) and values that would break the
    report (an integer of 16,610 bits, inf) are a note or text, never a crash."""
    import zipfile

    from collapse_detect.api import _training_args
    from collapse_detect.checkpoint import read_saved_object

    path = tmp_path / "training_args.bin"
    torch.save({"learning_rate": np.float64(3e-5), "num_train_epochs": np.int64(3), "seed": np.float32(0.5)}, path)
    assert read_saved_object(path) == {"learning_rate": 3e-5, "num_train_epochs": 3, "seed": 0.5}
    torch.save({"learning_rate": np.float64(3e-5)}, path, pickle_protocol=2)
    assert read_saved_object(path) == {"learning_rate": 3e-5}

    torch.save({"seed": 10**5000, "learning_rate": float("inf"), "weight_decay": "x" * 1000}, path)
    read = _training_args(path, allow_pickle=True)
    assert read["read"] is True and read["seed"] == "<integer of 16610 bits>"
    assert read["learning_rate"] == "inf" and len(read["weight_decay"]) == 203

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 200)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"archive/data.pkl") + len(b"archive/data.pkl")
    raw[start:start + 8] = b"\xff" * 8  # the compressed stream's first bytes
    path.write_bytes(bytes(raw))
    read = _training_args(path, allow_pickle=True)
    assert read["read"] is False and read["note"].startswith("could not read training_args.bin: unreadable archive")


HOSTILE_READ = """
import sys
from collapse_detect.api import _training_args
from collapse_detect.checkpoint import read_saved_object
for path in sys.argv[1:]:
    try:
        read_saved_object(path)
        print("read")
    except ValueError as exc:
        print("refused", str(exc)[:80])
    result = _training_args(path, allow_pickle=True)
    assert result["read"] is False or all(len(str(v)) <= 400 for v in result.values()), result
"""


def test_hostile_pickles_are_refused_quickly(tmp_path):
    """Pickles of a few hundred bytes whose keys or values cost exponential time or memory to hash, compare or
    print: a dict key that is a tuple holding the same tuple twice, 40 levels deep (hashing it visits 2**40
    tuples), a frozenset of such tuples as a value, a 1 MB string referred to 2,000 times (a repr of 2 GB). Each
    is refused or cut short; the reads run in a subprocess with a timeout, so a hang fails the test."""
    import pickle
    import struct
    import subprocess
    import sys
    import zipfile

    def zipped(name, data):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("archive/data.pkl", data)
        return path

    def body(obj):  # the opcodes that push obj, without the protocol header, frame and STOP
        data = pickle.dumps(obj, protocol=4)[2:-1]
        return data[9:] if data[:1] == b"\x95" else data

    nested = ()
    for _ in range(40):
        nested = (nested, nested)
    tuple_key = zipped("tuple_key.bin", b"\x80\x04}" + body(nested) + b"K\x01s.")
    set_value = zipped("set_value.bin", b"\x80\x04}\x8c\rlearning_rate(" + body(nested) + b"\x91s.")
    text = b"x" * 2**20
    refs = (b"\x80\x04}\x8c\rlearning_rate(\x8e" + struct.pack("<Q", len(text)) + text + b"\x94"
            + b"h\x00" * 1999 + b"ls.")
    many_refs = zipped("many_refs.bin", refs)
    assert max(p.stat().st_size for p in (tuple_key, set_value)) < 2000
    done = subprocess.run([sys.executable, "-c", HOSTILE_READ, str(tuple_key), str(set_value), str(many_refs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused unreadable pickle (ValueError: a dict key or set member of type tuple")
    assert lines[1].startswith("refused unreadable pickle (ValueError: a dict key or set member of type tuple")
    assert lines[2] == "read"  # a list of one string, cut to 200 characters in the report
