"""Data-parallel runs: 2 CPU processes (gloo) give a single process's summary.json and predictions.csv, and a
failure on one rank stops every rank with exit code 2, one line and nothing written."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

LABELS = ["sports", "politics", "business"]
ROOT = Path(__file__).resolve().parents[1]


def build_tiny(root: Path, rows: int = 400, seed: int = 11) -> tuple[Path, Path]:
    """A random-init tiny BERT (hidden 32, 2 layers) whose head is rescaled so predictions spread over the
    three classes, saved with its WordPiece tokenizer; an eval CSV of generated headlines (60/20/20)."""
    import build_samples as B
    import torch

    n = {"sports": int(rows * 0.6), "politics": int(rows * 0.2)}
    n["business"] = rows - sum(n.values())
    df = B.make_headlines(n, seed=seed)
    tok = B.train_tokenizer(df["text"], vocab_size=400)
    model = B.make_tiny_bert(tok, LABELS, seed=5, intermediate_size=37)
    with torch.no_grad():
        enc = tok(df["text"].tolist()[:200], padding=True, return_tensors="pt")
        pooled = model.bert(**enc).pooler_output
        w = torch.randn(3, pooled.shape[1], generator=torch.Generator().manual_seed(seed))
        w = w / ((pooled - pooled.mean(0)) @ w.T).std(0).unsqueeze(1)  # logits of unit spread
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(-(pooled @ w.T).mean(0))
    B.save_checkpoint(model, tok, root / "model")
    df.to_csv(root / "eval.csv", index=False)
    return root / "model", root / "eval.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model, data = build_tiny(root)
    return {"root": root, "model": model, "data": data}


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLLAPSE_DETECT_DIST_TIMEOUT_S="180")
    env.update(extra)
    return env


def _stop(procs) -> None:
    """Kill what is left of launched processes (and their children) when a test ends early."""
    import signal

    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The flags both runs share. --batch-size 1 makes every row's forward independent of which rows share its batch,
# so the two runs compute bit-identical probabilities and any difference left is the merge's.
FLAGS = ["--quiet", "--format", "json,csv", "--batch-size", "1", "--grad-sample", "8", "--seed", "3"]
RUN_METADATA = {"probe_seconds", "grad_seconds", "threads", "threads_reason", "omp_wait_policy", "processes",
                "model_dir", "data_file", "checkpoint", "versions"}


def _compare(a, b, path=""):
    """Equal: ints, strings and structure exactly; floats to 1e-9 relative (sums merged in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _compare(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), \
            f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_processes_give_the_single_process_report(tiny, tmp_path, monkeypatch):
    import torch

    from collapse_detect.cli import main

    dist_out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "collapse_detect", str(tiny["model"]), str(tiny["data"]), "--out",
           str(dist_out), *FLAGS]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # meanwhile, the single-process run in this process (1 thread, as each rank has)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        single_code = main([str(tiny["model"]), str(tiny["data"]), "--out", str(tmp_path / "one"), "--threads", "1",
                            *FLAGS])
        out, err = proc.communicate(timeout=240)
    finally:
        torch.set_num_threads(threads)
        _stop([proc])
    # torchrun exits 1 whenever a worker exits non-zero (here: rank 0's verdict 1 = collapse found)
    assert proc.returncode == (0 if single_code == 0 else 1), err[-3000:]
    assert single_code in (0, 1)

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((dist_out / "summary.json").read_text())
    assert two["metadata"]["processes"] == 2 and "processes" not in one["metadata"]
    assert two["metadata"]["rows"] == one["metadata"]["rows"] == 400
    assert two["stats"]["n"] == 400 and sum(map(sum, two["stats"]["confusion"])) == 400
    assert len(set(np.argmax(np.asarray(two["stats"]["confusion"]), axis=1))) > 1  # predictions do vary
    assert two["stats"]["gradients"]["ghost:total"]["n"] == one["stats"]["gradients"]["ghost:total"]["n"] == 24
    _compare(one["stats"], two["stats"], "stats")
    _compare(one["findings"], two["findings"], "findings")
    for key in ("verdict", "exit_code", "collapsed_classes", "worst_class", "root_cause"):
        _compare(one[key], two[key], key)
    meta = {k: v for k, v in one["metadata"].items() if k not in RUN_METADATA}
    _compare(meta, {k: v for k, v in two["metadata"].items() if k not in RUN_METADATA}, "metadata")
    # every row once, in row order, with the same probabilities
    assert (dist_out / "predictions.csv").read_bytes() == (tmp_path / "one" / "predictions.csv").read_bytes()


def test_a_failing_rank_stops_every_rank_with_one_line(tiny, tmp_path):
    """A label the model does not know, in a row of rank 1's shard: rank 1 reports it, rank 0 prints that one
    line and writes nothing, both exit 2 (ranks started as torchrun starts them, without its agent)."""
    import pandas as pd

    bad = tmp_path / "bad.csv"
    df = pd.read_csv(tiny["data"])
    df.loc[7, "label"] = "weather"  # row 7: 7 % 2 == 1, rank 1's row
    df.to_csv(bad, index=False)
    out = tmp_path / "report"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "collapse_detect", str(tiny["model"]), str(bad),
                                       "--out", str(out), "--quiet"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        _stop(procs)
    assert [p.returncode for p in procs] == [2, 2], results
    lines0 = [x for x in results[0][1].splitlines() if x.strip()]
    assert len(lines0) == 1, results[0][1]
    assert lines0[0].startswith("Error: ") and "'weather'" in lines0[0] and lines0[0].endswith("(rank 1 of 2)")
    assert "Error" not in results[1][1] and "Traceback" not in results[1][1]
    assert not out.exists()


# ------------------------------------------------------------------------ the pieces, without processes


class FakeGroup:
    """Stands in for Group: ``gather`` returns what every rank would send in this round."""

    def __init__(self, world, rounds_by_rank):
        from collapse_detect.distributed import DistEnv

        self.env = DistEnv(0, world)
        self.rounds = rounds_by_rank
        self.i = 0

    def gather(self, own):
        blocks = [own] + [r[self.i] if self.i < len(r) else None for r in self.rounds[1:]]
        self.i += 1
        return blocks

    def exchange(self, payload):
        return [payload] + self.rounds


class FakePart:
    def __init__(self, blocks):
        self.blocks, self.chunks = blocks, len(blocks)
        self.i = 0

    def read(self):
        self.i += 1
        return self.blocks[self.i - 1]


class Recorder:
    def __init__(self):
        self.ids = []

    def write_predictions(self, ids, gold, probs, names):
        assert np.all(np.diff(ids) > 0)
        self.ids.extend(ids.tolist())


GROUP_LIFETIME = """
import os, sys, time
from collapse_detect.checkpoint import load_checkpoint
from collapse_detect.distributed import DistEnv, Group

def tasks():
    return set(os.listdir("/proc/self/task"))

before = tasks()
group = Group(DistEnv(rank=0, world_size=1))
made = tasks() - before  # the group's threads (gloo's workers and loop, the store's server)
load_checkpoint(sys.argv[1])  # what every rank does after joining: transformers imports torch.distributed.nn
group.exchange("done")
group.close()
deadline = time.monotonic() + 10
while made & tasks() and time.monotonic() < deadline:
    time.sleep(0.05)
print(len(made), len(made & tasks()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed from /proc")
def test_closing_the_group_ends_its_threads_after_a_model_load(tiny, tmp_path):
    """Loading a model after the group exists must not keep the group alive past close(): a group left to the
    interpreter's teardown took gloo's threads down at exit and, now and then, aborted a rank (exit -6)."""
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    done = subprocess.run([sys.executable, "-c", GROUP_LIFETIME, str(tiny["model"])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    made, left = map(int, done.stdout.split()[-2:])
    assert made > 0  # the check sees the group's threads
    assert left == 0


def _blocks(ids, cuts):
    ids = np.asarray(ids, dtype=np.int64)
    return [(part, part % 3, np.full((len(part), 3), 1 / 3)) for part in np.split(ids, cuts) if len(part)]


def test_predictions_merge_in_row_order_with_uneven_chunks():
    from collapse_detect.distributed import _merge_predictions

    rows = np.arange(103)
    r0 = _blocks(rows[rows % 3 == 0], [5, 6, 20])        # rank 0: 4 chunks, one of a single row
    r1 = _blocks(rows[rows % 3 == 1], [30])             # rank 1: 2 chunks
    r2 = _blocks(rows[rows % 3 == 2], [1, 2, 3, 4, 9])  # rank 2: 6 chunks
    rec = Recorder()
    group = FakeGroup(3, [r0, r1, r2])
    _merge_predictions(group, FakePart(r0), max(len(r0), len(r1), len(r2)), rec, LABELS)
    assert rec.ids == list(range(103))


def test_sample_trim_keeps_the_global_smallest_priorities():
    from collapse_detect.distributed import trim_sample
    from collapse_detect.stats import Reservoir, row_priority

    rows = np.arange(1000)
    prio = row_priority(rows, 0)
    mine = Reservoir(10)
    mine.add(prio[rows % 2 == 0], row_id=rows[rows % 2 == 0])
    theirs = Reservoir(10)
    theirs.add(prio[rows % 2 == 1], row_id=rows[rows % 2 == 1])
    group = FakeGroup(2, [[theirs.priority]])
    (kept,) = trim_sample(group, [mine])
    whole = set(rows[np.argsort(prio)[:10]].tolist())
    assert set(kept.arrays["row_id"].tolist()) == {r for r in whole if r % 2 == 0}
    assert 0 < len(kept) < 10


def test_env_detection():
    from collapse_detect.distributed import DistEnv, from_env
    from collapse_detect.errors import CollapseDetectError

    assert from_env({}) is None
    assert from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == DistEnv(3, 4, 1, 2)
    assert env.row_filter(np.arange(10)).tolist() == [False, False, False, True] * 2 + [False, False]
    with pytest.raises(CollapseDetectError, match="outside"):
        from_env({"WORLD_SIZE": "2", "RANK": "2"})
