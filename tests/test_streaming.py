"""Streaming and the probe's runtime: chunking does not change the numbers, memory does not grow with rows,
token budgets cap every batch (gradient norms included), bf16 reports its drift and leaves fp32 weights intact,
and the thread choice follows --threads > OMP_NUM_THREADS > available cores per process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

LABELS = ["sports", "politics", "business"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random-init tiny BERT (hidden 32, 2 layers, intermediate 37) and 300 generated headlines."""
    import build_samples as B
    import torch

    df = B.make_headlines({"sports": 180, "politics": 60, "business": 60}, seed=21)
    tok = B.train_tokenizer(df["text"], vocab_size=400)
    model = B.make_tiny_bert(tok, LABELS, seed=9, intermediate_size=37)
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # spread the random head's outputs a little
    root = tmp_path_factory.mktemp("stream")
    df.to_csv(root / "eval.csv", index=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"model": model, "tok": tok, "data": root / "eval.csv", "root": root, "df": df}
    torch.set_num_threads(threads)


def _probe(tiny, chunk_rows=8192, rows=None, writer=None, on_chunk=None, **options):
    from collapse_detect.data import iter_chunks
    from collapse_detect.probe import ProbeOptions, run_probe

    data = tiny["data"]
    if rows is not None:
        data = tiny["root"] / f"eval_{rows}.csv"
        if not data.exists():
            reps = -(-rows // len(tiny["df"]))
            tiny["df"].loc[np.tile(np.arange(len(tiny["df"])), reps)[:rows]].to_csv(data, index=False)
    _, chunks = iter_chunks(data, LABELS, chunk_rows=chunk_rows)
    seen = []

    def record(chunk, probs):
        if writer is not None:  # streamed to predictions.csv, as the CLI does
            writer.write_predictions(chunk.row_ids, chunk.gold, probs, LABELS)
        else:
            seen.append((chunk.row_ids, probs))

    run = run_probe(tiny["model"], tiny["tok"], chunks, LABELS, ProbeOptions(**options),
                    on_chunk=on_chunk or record)
    return run, seen


def test_chunk_size_does_not_change_the_statistics(tiny):
    from collapse_detect.stats import compute_stats

    one, seen_one = _probe(tiny, chunk_rows=10_000, batch_size=1)
    many, seen_many = _probe(tiny, chunk_rows=7, batch_size=1)
    assert len(seen_one) == 1 and len(seen_many) == 43  # 300 rows in chunks of 7
    ids = np.concatenate([s[0] for s in seen_many])
    assert ids.tolist() == list(range(300))  # on_chunk sees every row once, in file order
    np.testing.assert_array_equal(np.concatenate([s[1] for s in seen_many]), seen_one[0][1])
    a, b = compute_stats(one.accumulator), compute_stats(many.accumulator)
    assert a["confusion"] == b["confusion"] and sum(map(sum, a["confusion"])) == 300
    for x, y in zip(a["per_class"], b["per_class"]):
        assert (x["support"], x["predicted"]) == (y["support"], y["predicted"])
        assert x["mean_score"] == pytest.approx(y["mean_score"], rel=1e-12)
        assert x["roc_auc"] == pytest.approx(y["roc_auc"], rel=1e-12)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "mean_nll", "total_variation"):
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15)
    assert (one.tokens, one.padded_tokens, one.rows) == (many.tokens, many.padded_tokens, many.rows)
    assert one.tokens == sum(len(x) for x in tiny["tok"](tiny["df"]["text"].tolist())["input_ids"])


def test_memory_does_not_grow_with_rows(tiny, monkeypatch):
    """What the tool's own code holds (tracemalloc: Python and numpy allocations made by collapse_detect's
    lines) at the last chunk and once the probe returns is the same for 600 and 9,600 rows streamed in chunks of
    200: nothing per row is kept once the fixed-size samples are full (here made small so that 600 rows fill them:
    100 sampled rows, 50 gradient norms per class and group instead of 4,000 and 20,000).

    Only allocations made by the tool's own lines count, after an untraced warm-up run. Outside them, memory grows
    for a while and then stays flat: pandas' chunked reader keeps about 3 KB a chunk for its first few hundred
    chunks, and the interpreter's attribute cache keeps the names transformers builds for its look-ups (flat after
    about 3,000 forwards). Comparing whole-process peaks, as this test once did, failed or passed on that alone. The
    whole command's resident memory, reader included, is measured at 100k and 1M rows by
    benchmarks/bench_streaming.py."""
    from collapse_detect.outputs import OutputWriter
    from collapse_detect.stats import GradAccumulator

    defaults = GradAccumulator.__init__.__defaults__
    monkeypatch.setattr(GradAccumulator.__init__, "__defaults__", (50,) + defaults[1:])
    own = [tracemalloc.Filter(True, str(ROOT / "collapse_detect" / "*"))]

    def held():
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(own).traces)

    # warm-up, untraced: what the interpreter allocates once per function (specialized bytecode, caches)
    warm = OutputWriter(tiny["root"] / "out_warm", {"csv"})
    _probe(tiny, chunk_rows=200, rows=600, writer=warm, batch_size=64, sample_rows=100)
    warm.commit()
    sizes = {}
    for rows in (600, 9600):
        writer = OutputWriter(tiny["root"] / f"out_{rows}", {"csv"})
        at_last_chunk = []

        def last_chunk(chunk, probs):
            writer.write_predictions(chunk.row_ids, chunk.gold, probs, LABELS)
            if chunk.row_ids[-1] == rows - 1:
                at_last_chunk.append(held())

        tracemalloc.start()
        try:
            run, _ = _probe(tiny, chunk_rows=200, rows=rows, on_chunk=last_chunk, batch_size=64, sample_rows=100)
            sizes[rows] = (at_last_chunk[0], held())
        finally:
            tracemalloc.stop()
        writer.commit()
        assert run.rows == rows
        assert all(len(r) <= 50 for g in run.accumulator.grad.values() for r in g.values)
        assert len(run.accumulator.sample) == 100
        with open(tiny["root"] / f"out_{rows}" / "predictions.csv") as f:
            assert sum(1 for _ in f) == rows + 1
    # 9,000 more rows: keeping one float32 a row would add 36 KB. What varies without a leak (6-9 KB here) is
    # strings the interpreter keeps for a while: formatted probabilities, attribute names built with f-strings.
    for small, large in zip(sizes[600], sizes[9600]):
        assert large < small + 24_000, sizes


def test_token_budget_caps_every_batch():
    from collapse_detect.probe import make_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 300, size=2000)
    batches = make_batches(lengths, batch_size=64, max_tokens=2048)
    flat = np.sort(np.concatenate(batches))
    assert flat.tolist() == list(range(2000))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or lengths[b].max() * len(b) <= 2048
    # a row longer than the budget goes alone rather than being dropped
    assert [len(b) for b in make_batches(np.array([5, 5000, 5]), 8, 100)] == [2, 1]
    # without a budget: length-sorted batches of batch_size
    plain = make_batches(lengths, 32, None)
    assert all(len(b) == 32 for b in plain[:-1]) and all(np.diff(lengths[np.concatenate(plain)]) >= 0)


def test_token_budget_caps_gradient_norm_batches_too(tiny, monkeypatch):
    """Ghost norms (backward) run on batches under the same budget, and give the same norms as without it."""
    from collapse_detect import gradnorm

    shapes = []
    real = gradnorm.per_example_grad_norms

    def spy(model, batch, labels, **kw):
        shapes.append(tuple(batch["input_ids"].shape))
        return real(model, batch, labels, **kw)

    monkeypatch.setattr(gradnorm, "per_example_grad_norms", spy)
    capped, _ = _probe(tiny, batch_size=32, grad_sample=12, max_tokens_per_batch=64)
    ghost_shapes = list(shapes)
    shapes.clear()
    free, _ = _probe(tiny, batch_size=32, grad_sample=12)
    assert ghost_shapes and all(r * t <= 64 or r == 1 for r, t in ghost_shapes)
    assert max(r * t for r, t in shapes) > 64  # the budget did change the batches
    assert sum(r for r, _ in ghost_shapes) == sum(r for r, _ in shapes) == 36  # 12 rows x 3 classes
    g1, g2 = capped.accumulator.grad["ghost:total"], free.accumulator.grad["ghost:total"]
    np.testing.assert_array_equal(g1.count, [12, 12, 12])
    np.testing.assert_allclose(g1.total, g2.total, rtol=1e-4)


def test_bf16_reports_drift_and_restores_fp32_weights(tiny):
    import torch

    from collapse_detect.probe import drift_summary

    before = {k: v.clone() for k, v in tiny["model"].state_dict().items()}
    run, seen = _probe(tiny, batch_size=1, dtype="bf16", drift_rows=40)
    after = tiny["model"].state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    drift = drift_summary(run.drift, 3)
    assert drift["rows"] == 40 and run.dtype == "bf16"
    # the same numbers by hand: the 40 seeded rows, fp32 vs a bf16 copy, one row at a time
    rows = np.sort(run.drift.arrays["row_id"])
    texts = [tiny["df"]["text"][int(r)] for r in rows]
    low_model = copy.deepcopy(tiny["model"]).to(torch.bfloat16)
    with torch.inference_mode():
        hi = np.stack([torch.softmax(tiny["model"](**tiny["tok"](t, return_tensors="pt")).logits.double(), -1)[0]
                       .numpy() for t in texts])
    probs = np.concatenate([s[1] for s in seen])
    lo = probs[rows]  # what the bf16 run reported for those rows
    with torch.inference_mode():
        lo_copy = np.stack([torch.softmax(low_model(**tiny["tok"](t, return_tensors="pt")).logits.float().double(),
                                          -1)[0].numpy() for t in texts])
    np.testing.assert_allclose(lo, lo_copy, atol=1e-6)
    diff = np.abs(lo - hi)
    assert drift["max_abs_prob_diff"] == pytest.approx(diff.max(), abs=1e-6)
    assert drift["mean_abs_prob_diff"] == pytest.approx(diff.mean(), abs=1e-6)
    assert drift["prediction_agreement"] == pytest.approx(np.mean(lo.argmax(1) == hi.argmax(1)))
    assert 0 < drift["max_abs_prob_diff"] < 0.05


def test_thread_choice(monkeypatch):
    from collapse_detect import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    assert runtime.choose_threads(3) == (3, "--threads")
    assert runtime.choose_threads()[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: 3 processes share the node's cores
    assert runtime.choose_threads()[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default: respected, and the report says so
    n, why = runtime.choose_threads()
    assert n == 1 and why.startswith("OMP_NUM_THREADS") and "3 of 8 cores" in why and "--threads 2" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.choose_threads() == (1, "OMP_NUM_THREADS")
    monkeypatch.undo()
    cores = runtime.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


def test_wait_policy_is_set_before_torch_loads(tmp_path):
    """cli.main sets OMP_WAIT_POLICY=PASSIVE (unless the user set one) and nothing imports torch before it."""
    code = ("import os, sys\nos.environ.pop('OMP_WAIT_POLICY', None)\nimport collapse_detect.cli as cli\n"
            "assert 'torch' not in sys.modules\ncli.main(['--help'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code + "print(os.environ['OMP_WAIT_POLICY'])"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE" and "--threads" in out.stdout and "--dtype" in out.stdout
    from collapse_detect import runtime

    os.environ["OMP_WAIT_POLICY"], old = "ACTIVE", os.environ.get("OMP_WAIT_POLICY")
    try:
        runtime.prepare_process_env()
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # an explicit choice wins
    finally:
        if old is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = old



def test_batch_parallel_workers_give_the_single_thread_numbers(tiny):
    """Three batches in flight on three threads: every row's probabilities, the statistics and the token
    counts equal the run with batches in order on the calling thread, whose thread setting comes back."""
    import torch

    from collapse_detect.stats import compute_stats

    one, seen_one = _probe(tiny, chunk_rows=130, batch_size=8, workers=1)
    torch.set_num_threads(2)
    try:
        many, seen_many = _probe(tiny, chunk_rows=130, batch_size=8, workers=3)
        assert torch.get_num_threads() == 2  # the workers' one-thread setting does not leak out
    finally:
        torch.set_num_threads(1)
    p1, p3 = np.concatenate([s[1] for s in seen_one]), np.concatenate([s[1] for s in seen_many])
    assert p1.shape == (300, 3) and p1.std(axis=0).min() > 1e-4  # the rows do differ (by 2e-4 to 5e-4)
    np.testing.assert_allclose(p3, p1, rtol=0, atol=1e-7)
    a, b = compute_stats(one.accumulator), compute_stats(many.accumulator)
    assert a["confusion"] == b["confusion"]
    assert a["balanced_accuracy"] == pytest.approx(b["balanced_accuracy"], abs=1e-12)
    assert a["mean_nll"] == pytest.approx(b["mean_nll"], rel=1e-6)
    assert (one.tokens, one.padded_tokens) == (many.tokens, many.padded_tokens)
    # the pooled features are captured per thread: the head gradient norms match row for row
    g1, g3 = one.accumulator.grad["head"], many.accumulator.grad["head"]
    assert g1.count.tolist() == g3.count.tolist() == [180, 60, 60]
    for c in range(3):
        r1, r3 = g1.values[c], g3.values[c]
        np.testing.assert_array_equal(r1.priority, r3.priority)
        np.testing.assert_allclose(r3.arrays["value"], r1.arrays["value"], rtol=1e-5)


def test_batch_runner_error_reaches_the_caller_and_the_pool_closes(tiny):
    import threading

    import torch

    from collapse_detect.gradnorm import find_head
    from collapse_detect.probe import BatchRunner, HeadCapture, _pad

    model, tok = tiny["model"], tiny["tok"]
    enc = tok(tiny["df"]["text"].tolist()[:40])
    enc = {"input_ids": list(enc["input_ids"]), "token_type_ids": list(enc["token_type_ids"])}
    capture = HeadCapture(find_head(model))
    runner = BatchRunner(model, capture, workers=2)
    calls = []

    def make_batch(idx):
        calls.append(threading.get_ident())
        if len(calls) == 3:
            raise ValueError("row 17 is broken")
        return _pad(enc, idx, 0)

    batches = [np.arange(i, i + 5) for i in range(0, 40, 5)]
    with pytest.raises(ValueError, match="row 17"):
        list(runner.run(batches, make_batch))
    runner.close()
    capture.close()
    assert threading.get_ident() not in calls  # the batches ran on the workers
    assert not [t for t in threading.enumerate() if t.name.startswith("probe")]
    assert torch.get_num_threads() == 1


def test_keep_freed_memory_stops_page_faults(tmp_path):
    """Two 7 MB blocks freed together are handed back to the kernel by glibc's defaults and fault in again
    on every reuse; with keep_freed_memory they are reused. A user's MALLOC_* setting wins."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = ("import resource, sys\nimport numpy as np\nfrom collapse_detect import runtime\n"
            "applied = runtime.keep_freed_memory() if sys.argv[1] == 'tuned' else False\n"
            "def cycle():\n    a = np.ones(7 << 18, np.float32); b = np.ones(7 << 18, np.float32)\n    del a, b\n"
            "cycle()\nf0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20):\n    cycle()\n"
            "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n")
    faults = {}
    for mode, extra in (("default", {}), ("tuned", {}), ("tuned-by-user", {"MALLOC_TRIM_THRESHOLD_": "0"})):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code, mode.split("-")[0]], env=env, capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        applied, n = out.stdout.split()
        faults[mode] = (applied, int(n))
    if faults["default"][1] < 5000:
        pytest.skip(f"this libc does not return such blocks to the kernel: {faults}")
    assert faults["tuned"][0] == "True" and faults["tuned"][1] < 500, faults  # default: about 20,000 here
    assert faults["tuned-by-user"][0] == "False" and faults["tuned-by-user"][1] > 5000, faults


def test_forward_logits_batches_like_the_probe_and_keeps_row_order(tiny):
    """The evidence passes' forward (sorted, token-budgeted batches, batch workers) gives each row the
    logits of a forward on that row alone, in the order given."""
    import torch

    from collapse_detect.probe import forward_logits

    model, tok = tiny["model"], tiny["tok"]
    rows = [list(r) for r in tok(tiny["df"]["text"].tolist()[:70])["input_ids"]]
    rows[5] = rows[5][:2]  # lengths from 2 tokens up, in no particular order
    with torch.inference_mode():
        alone = np.stack([model(input_ids=torch.tensor([r])).logits[0].numpy() for r in rows])
    assert alone.std(axis=0).min() > 5e-4  # rows differ, by far more than the tolerance below
    for workers in (1, 2):
        got = forward_logits(model, rows, 0, batch_size=16, max_tokens=200, workers=workers)
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)  # a few float32 steps, on any CPU's kernels
    assert torch.get_num_threads() == 1  # the fixture's setting, back after the workers
    assert forward_logits(model, [], 0, workers=2).shape == (0, 3)


def test_null_input_probe_reuses_the_probe_rows_to_the_same_numbers(tiny):
    """The token-shuffle probe takes the sampled rows' probabilities from the probe's own sample (a subset of
    it by construction) instead of a second forward: the evidence equals running them again."""
    from collapse_detect.model_evidence import _sampled_probs, null_input_probe

    run, _ = _probe(tiny, chunk_rows=130, batch_size=8, head_grad_norms=False)
    acc = run.accumulator
    token_rows = acc.token_sample.arrays["row_id"]
    assert len(token_rows) == 256 and len(acc.sample) == 300
    reused = null_input_probe(tiny["model"], tiny["tok"], acc, LABELS, reuse_probe=True)
    again = null_input_probe(tiny["model"], tiny["tok"], acc, LABELS, reuse_probe=False,
                             batching={"batch_size": 16, "max_tokens": 300, "workers": 2})
    assert reused["shuffled"]["rows"] == again["shuffled"]["rows"] == 256
    assert reused["shuffled"]["agreement"] == again["shuffled"]["agreement"]
    assert reused["shuffled"]["distance"] == pytest.approx(again["shuffled"]["distance"], rel=1e-4)
    assert again["shuffled"]["distance"] > 1e-5  # shuffling does move this model's outputs
    for name, value in reused["inputs"].items():
        np.testing.assert_allclose(value["probs"], again["inputs"][name]["probs"], rtol=0, atol=1e-6)
    # a row the sample lacks: no reuse (the caller runs the rows)
    assert _sampled_probs(acc, np.append(token_rows[:3], 10_000)) is None
    np.testing.assert_allclose(_sampled_probs(acc, token_rows[:3]).sum(axis=1), 1.0, atol=1e-6)


def test_one_blas_thread_limits_numpy_blas_inside_the_block_only():
    from threadpoolctl import threadpool_info

    from collapse_detect.runtime import one_blas_thread

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    assert before  # numpy's BLAS is loaded
    with one_blas_thread():
        assert set(blas_threads().values()) == {1}
    assert blas_threads() == before


def test_linear_probe_gives_the_same_answer_on_any_number_of_threads():
    """Folds fitted on 1 or 3 threads (one BLAS thread, as the CLI runs it): the same out-of-fold balanced
    accuracy; informative features score high, shuffled labels near chance."""
    from collapse_detect.analysis import linear_probe
    from collapse_detect.runtime import one_blas_thread

    rng = np.random.default_rng(4)
    gold = np.repeat([0, 1, 2], [240, 80, 80])
    features = rng.normal(size=(400, 24)) + 2.0 * np.eye(3, 24)[gold]
    with one_blas_thread():
        one = linear_probe(features, gold, threads=1)
        three = linear_probe(features, gold, threads=3)
        noise = linear_probe(features, rng.permutation(gold), threads=3)
    assert one == three
    assert one["folds"] == 5 and one["rows"] == 400 and one["balanced_accuracy"] > 0.75
    assert abs(noise["balanced_accuracy"] - 1 / 3) < 0.1
