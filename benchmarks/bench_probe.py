#!/usr/bin/env python
"""Probe throughput against the transformers pipeline, on the same rows, in one run.

Prints side by side (each method runs in its own subprocess, so peak RSS is its own):

* ``pipeline``   transformers.pipeline("text-classification", top_k=None, batch_size=32)
* ``per-row``    a naive loop: one forward per row (no padding at all, batch of one)
* ``probe``      collapse-detect's probe, forward only (head gradient norms off): one batch per thread at once
* ``probe intra-op`` the same probe with one batch at a time on all threads (what it did before batch workers)
* ``probe+head`` the probe as the CLI runs it (closed-form head gradient norms for every row)
* ``probe bf16`` the probe with ``--dtype bf16`` (and its drift against fp32 on a seeded sample)

for each: rows/s, ratio to the pipeline, useful GFLOP/s (forward FLOPs from the model's shapes and the real,
unpadded token counts) and its share of an fp32 matmul peak measured in the same run, padded/real tokens, and
peak RSS. Then the whole command (``collapse-detect MODEL DATA``, a fresh process, every output) on the same
rows, with the probe's share of its time. A second table runs the probe with a busy-loop process pinned to one
core ("noisy neighbour") under several thread settings.

The model is a randomly initialised MiniLM-L6-sized BERT (hidden 384, 6 layers, 12 heads, intermediate 1536,
vocab 30522) with a WordPiece tokenizer trained on a generated corpus; rows have mixed lengths (median ~37
tokens, longest ~313). Nothing is downloaded.

Usage::

    python benchmarks/bench_probe.py                 # 2,000 rows, all methods, both tables
    python benchmarks/bench_probe.py --rows 500 --skip-neighbour
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["alpha", "beta", "gamma"]
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)


# ------------------------------------------------------------------------------------------- fixture


def _lexicon(n: int, rng: random.Random) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "cl", "dr", "gr", "pl", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_texts(n: int, seed: int, lexicon: list[str]) -> list[str]:
    """Texts of mixed length: log-normal word counts (median ~31 words, a long tail to ~280)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.05 for i in range(len(lexicon))]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    out = []
    for _ in range(n):
        words = int(min(280, max(3, rng.lognormvariate(math.log(31), 0.76))))
        picks = rng.choices(lexicon, cum_weights=cum, k=words)
        text = " ".join(picks)
        out.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", "."]))
    return out


def make_tokenizer(corpus: list[str], vocab_size: int = 30522, model_max_length: int = 512):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                              show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_fixture(out: str | os.PathLike, rows: int = 2000, seed: int = 0, config: dict | None = None,
                  lexicon_size: int = 40000, corpus_rows: int = 20000) -> dict:
    """Write ``model/`` (save_pretrained: random-init BERT + tokenizer) and ``eval.csv`` (text,label) under
    ``out``; return their paths."""
    import pandas as pd
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lexicon = _lexicon(lexicon_size, rng)
    tokenizer = make_tokenizer(make_texts(corpus_rows, seed + 1, lexicon),
                               vocab_size=(config or MINILM)["vocab_size"])
    cfg = dict(config or MINILM)
    cfg.setdefault("max_position_embeddings", 512)
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        **cfg, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    texts = make_texts(rows, seed + 2, lexicon)
    labels = random.Random(seed + 3).choices(LABELS, weights=[0.6, 0.2, 0.2], k=rows)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(out / "eval.csv", index=False)
    return {"model": str(out / "model"), "data": str(out / "eval.csv")}


# ------------------------------------------------------------------------------------------- measuring


def forward_flops(config, lengths) -> float:
    """Useful FLOPs of a BERT-style classifier's forward on rows of the given (unpadded) token counts:
    per layer 2*T*d*(3d) QKV + 2*T*d*d output + 2*2*T*d*ff FFN + 2*2*T*T*d attention; pooler and head on one
    token. Embedding look-ups, LayerNorm, softmax and GELU are not counted (not matmul work)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    k = config.num_labels
    total = 0.0
    for t in lengths:
        t = float(t)
        total += layers * (8 * t * d * d + 4 * t * d * ff + 4 * t * t * d) + 2 * d * d + 2 * d * k
    return total


def matmul_peak_gflops(seconds: float = 1.5, n: int = 2048) -> tuple[float, float]:
    """Best fp32 GFLOP/s of an n x n matmul with the current thread settings (best of repeated runs): per
    wall-clock second, and per CPU-second of this process (the per-core peak, which other processes' load
    does not change)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_wall = best_cpu = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            torch.mm(a, b)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best_wall = max(best_wall, 6 * n**3 / wall)
        best_cpu = max(best_cpu, 6 * n**3 / max(cpu, 1e-9))
    return best_wall / 1e9, best_cpu / 1e9


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batched_padding(lengths, batch: int) -> int:
    return int(sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch)))


def worker(method: str, fixture: dict, rows: int | None, threads: int | None, batch_size: int | None,
           max_tokens: int | None, repeat: int = 1, allocator: str = "tool") -> dict:
    """One method, timed in this process (which the parent started with the thread environment it wants)."""
    import numpy as np
    import pandas as pd
    import torch

    from collapse_detect.checkpoint import load_checkpoint
    from collapse_detect.data import iter_chunks
    from collapse_detect.probe import ProbeOptions, drift_summary, run_probe
    from collapse_detect.runtime import apply_threads, keep_freed_memory

    keep_freed = allocator == "tool" and keep_freed_memory()
    runtime = apply_threads(threads)
    loaded = load_checkpoint(fixture["model"])
    model, tok = loaded.model, loaded.tokenizer
    frame = pd.read_csv(fixture["data"])
    if rows:
        frame = frame.iloc[:rows]
    data_path = fixture["data"]
    if rows and rows < len(pd.read_csv(fixture["data"], usecols=[0])):
        data_path = str(Path(fixture["data"]).with_name(f"eval_{rows}.csv"))
        frame.to_csv(data_path, index=False)
    texts = frame["text"].tolist()
    lengths = [len(x) for x in tok(texts)["input_ids"]]
    out: dict = {"method": method, "rows": len(texts), "tokens": int(sum(lengths)), **runtime,
                 "keep_freed_memory": keep_freed}

    workers = 1 if method.endswith("intra-op") else runtime["threads"]

    def probe(dtype="fp32", head=False, sample=None):
        """As the CLI probes (api.probe_files), minus checkpoint loading."""
        opts = ProbeOptions(head_grad_norms=head, dtype=dtype, workers=workers)
        opts.batch_size = batch_size or opts.batch_size
        opts.max_tokens_per_batch = max_tokens or opts.max_tokens_per_batch
        out["batches"] = f"{opts.batch_size} rows and {opts.max_tokens_per_batch} padded tokens"
        _, chunks = iter_chunks(sample or data_path, loaded.class_names)
        return run_probe(model, tok, chunks, loaded.class_names, opts)

    clock = {}

    def start():
        clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()

    def stop():
        # best of the repeats: other processes can only slow a run down
        out["seconds"] = min(out.get("seconds", math.inf), time.perf_counter() - clock["wall"])
        out["cpu_seconds"] = min(out.get("cpu_seconds", math.inf), time.process_time() - clock["cpu"])

    if method == "pipeline":
        from transformers import pipeline

        pipe = pipeline("text-classification", model=model, tokenizer=tok, top_k=None, batch_size=32,
                        device=-1)
        pipe(texts[:64])  # warm-up
        for _ in range(repeat):
            start()
            result = pipe(texts)
            stop()
        assert len(result) == len(texts)
        out["padded_tokens"] = _batched_padding(lengths, 32)
    elif method == "per-row":
        for _ in range(repeat):
            start()
            with torch.inference_mode():
                for text in texts:
                    enc = tok(text, return_tensors="pt", truncation=True)
                    torch.softmax(model(**enc).logits, dim=-1).numpy()
            stop()
        out["padded_tokens"] = out["tokens"]
    elif method in ("probe", "probe intra-op", "probe+head", "probe bf16"):
        warm = str(Path(data_path).with_name("warmup.csv"))
        frame.iloc[:64].to_csv(warm, index=False)
        dtype = "bf16" if method == "probe bf16" else "fp32"
        probe(dtype=dtype, head=method == "probe+head", sample=warm)
        for _ in range(repeat):
            start()  # reading the CSV, tokenizing, batching, forward, statistics (and the bf16 drift pass)
            run = probe(dtype=dtype, head=method == "probe+head")
            stop()
        out["padded_tokens"] = run.padded_tokens
        if run.drift is not None:
            out["drift"] = drift_summary(run.drift, len(loaded.class_names))
    elif method == "latency":  # single-row forward, median of repeated calls (the noisy-neighbour symptom)
        enc = tok(texts[0], return_tensors="pt")
        times = []
        with torch.inference_mode():
            model(**enc)
            for _ in range(30):
                t0 = time.perf_counter()
                model(**enc)
                times.append(time.perf_counter() - t0)
        out["seconds"] = out["cpu_seconds"] = float(np.median(times))
        out["latency_ms"] = 1000 * float(np.median(times))
        out["padded_tokens"] = 0
    else:
        raise SystemExit(f"unknown method {method!r}")
    out["peak_rss_mb"] = _peak_rss_mb()
    out["useful_gflop"] = forward_flops(model.config, lengths) / 1e9
    out["matmul_peak_gflops"], out["matmul_peak_gflops_cpu"] = matmul_peak_gflops()
    return out


# ------------------------------------------------------------------------------------------- driving


def _spawn(method: str, fixture_dir: Path, args, env_extra: dict, threads: int | None, rows: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(fixture_dir),
           "--repeat", str(args.repeat), "--allocator", args.allocator]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if threads:
        cmd += ["--threads", str(threads)]
    if rows:
        cmd += ["--rows", str(rows)]
    if args.max_tokens_per_batch:
        cmd += ["--max-tokens-per-batch", str(args.max_tokens_per_batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _BusyCore:
    """A busy-loop process pinned to one core: the noisy neighbour on a shared runner."""

    def __init__(self, core: int):
        code = (f"import os\ntry:\n    os.sched_setaffinity(0, {{{core}}})\nexcept Exception:\n    pass\n"
                "while True:\n    pass\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code])

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description="collapse-detect probe vs transformers pipeline")
    ap.add_argument("--rows", type=int, default=None, help="rows of the eval file to use (default: all 2,000)")
    ap.add_argument("--fixture-rows", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None, help="the probe's rows per batch (default: the CLI's)")
    ap.add_argument("--max-tokens-per-batch", type=int, default=None,
                    help="the probe's padded tokens per batch (default: the CLI's)")
    ap.add_argument("--allocator", choices=["tool", "default"], default="tool",
                    help="tool (default): every method runs with the allocator setting the CLI applies "
                    "(runtime.keep_freed_memory); default: glibc's own")
    ap.add_argument("--threads", type=int, default=None, help="threads for every method (default: the tool's "
                    "choice, with OMP_WAIT_POLICY=PASSIVE as the CLI sets it)")
    ap.add_argument("--methods", default="pipeline,per-row,probe,probe intra-op,probe+head,probe bf16")
    ap.add_argument("--neighbour-rows", type=int, default=400, help="rows per run in the noisy-neighbour table")
    ap.add_argument("--skip-neighbour", action="store_true")
    ap.add_argument("--skip-cli", action="store_true", help="skip timing the whole command end to end")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per method in each worker (best counts)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all methods, in alternating order; each "
                    "method's best round counts (default 2)")
    ap.add_argument("--workdir", help="reuse/keep the fixture here (default: a temporary folder)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fixture = {"model": str(Path(args.workdir) / "model"), "data": str(Path(args.workdir) / "eval.csv")}
        res = worker(args.worker, fixture, args.rows, args.threads, args.batch_size, args.max_tokens_per_batch,
                     args.repeat, args.allocator)
        print(json.dumps(res))
        return

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-probe-"))
    if not (root / "model" / "config.json").exists() or not (root / "eval.csv").exists():
        print(f"building the fixture in {root} ...", flush=True)
        build_fixture(root, rows=args.fixture_rows)
    import platform

    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{_load()}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from collapse_detect.runtime import available_cores, bf16_fast

    caps = ", ".join(f"{k}={os.environ[k]}" for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                     if os.environ.get(k))
    print(f"physical cores available: {available_cores()}; native bf16: {bf16_fast()}; "
          f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}" + (f"; {caps}" if caps else ""))

    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):  # rounds in alternating order, so a slow spell of the machine hits all methods
        for method in (methods if rnd % 2 == 0 else methods[::-1]):
            r = _spawn(method, root, args, env, args.threads, args.rows)
            print(f"  round {rnd + 1}: {method:<15} {r['rows'] / r['seconds']:7.1f} rows/s ({_load()})", flush=True)
            old = best.get(method)
            if old is None:
                best[method] = r
            else:  # best time and best peak of the rounds; the larger peak RSS
                for key in ("seconds", "cpu_seconds"):
                    old[key] = min(old[key], r[key])
                for key in ("matmul_peak_gflops", "matmul_peak_gflops_cpu", "peak_rss_mb"):
                    old[key] = max(old[key], r[key])
    results = [best[m] for m in methods]
    base = next((r for r in results if r["method"] == "pipeline"), None)
    peak = max(r["matmul_peak_gflops"] for r in results)
    peak_cpu = max(r["matmul_peak_gflops_cpu"] for r in results)
    r0 = results[0]
    print(f"\n{r0['rows']} rows, {r0['tokens']} tokens (median {_median_tokens(root, args.rows)}); threads "
          f"{r0['threads']} ({r0['threads_reason']}), OMP_WAIT_POLICY={r0['omp_wait_policy']}, "
          f"allocator: {'keep freed memory (as the CLI)' if r0['keep_freed_memory'] else 'glibc default'}")
    probe_batches = next((r["batches"] for r in results if "batches" in r), None)
    if probe_batches:
        print(f"probe batches: at most {probe_batches}; pipeline: batch_size=32 as it is usually called")
    print(f"fp32 matmul peak measured in the same run (2048x2048, best over the workers): {peak:.1f} GFLOP/s "
          f"wall-clock, {peak_cpu:.1f} GFLOP per CPU-second")
    print("wall: per wall-clock second (what a user waits); cpu: per CPU-second of the process (robust to other "
          "processes' load on a shared machine)")
    hdr = (f"{'method':<15}{'rows/s':>8}{'x pipe':>8}{'GFLOP/s':>9}{'of peak':>8}{'rows/cpu-s':>11}{'x pipe':>8}"
           f"{'GFLOP/cpu-s':>12}{'of peak':>8}{'padded/real':>12}{'RSS MB':>8}")
    print(hdr)

    def rate(r, cpu=False):
        return r["rows"] / (r["cpu_seconds"] if cpu else r["seconds"])

    for r in results:
        gf, gfc = r["useful_gflop"] / r["seconds"], r["useful_gflop"] / r["cpu_seconds"]
        x = f"{rate(r) / rate(base):.2f}" if base else "-"
        xc = f"{rate(r, True) / rate(base, True):.2f}" if base else "-"
        print(f"{r['method']:<15}{rate(r):>8.1f}{x:>8}{gf:>9.1f}{gf / peak:>8.2f}{rate(r, True):>11.1f}{xc:>8}"
              f"{gfc:>12.1f}{gfc / peak_cpu:>8.2f}{r['padded_tokens'] / r['tokens']:>12.2f}{r['peak_rss_mb']:>8.0f}")
    for r in results:
        if r.get("drift"):
            d = r["drift"]
            print(f"{r['method']}: drift vs fp32 on {d['rows']} seeded rows: max |dp| {d['max_abs_prob_diff']:.2e}, "
                  f"mean |dp| {d['mean_abs_prob_diff']:.2e}, predictions agree {100 * d['prediction_agreement']:.1f}%")
    probe = next((r for r in results if r["method"] == "probe"), None)
    if probe and base:
        for name, cpu, pk in (("wall", False, peak), ("cpu", True, peak_cpu)):
            x = rate(probe, cpu) / rate(base, cpu)
            frac = probe["useful_gflop"] / (probe["cpu_seconds"] if cpu else probe["seconds"]) / pk
            print(f"targets ({name}): probe >= 3.5x pipeline: {x:.2f}x ({'met' if x >= 3.5 else 'MISSED'}); "
                  f"probe >= 0.70 of fp32 peak: {frac:.2f} ({'met' if frac >= 0.7 else 'MISSED'})")

    if not args.skip_cli:
        _cli_end_to_end(root, args)
    if args.skip_neighbour:
        return
    configs = [("1 thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1, "probe"),
               ("2 intra-op threads, default wait policy", {}, 2, "probe intra-op"),
               ("2 intra-op threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 2, "probe intra-op"),
               ("tool's choice (CLI default: batch workers)", {"OMP_WAIT_POLICY": "PASSIVE"}, None, "probe")]
    print(f"\nnoisy neighbour: the probe on {args.neighbour_rows} rows and a single-row forward, without and with a "
          "busy-loop process pinned to core 1")
    table = []
    for label, env_extra, threads, method in configs:
        row = [label]
        for busy in (False, True):
            neighbour = _BusyCore(1) if busy else None
            try:
                p = _spawn(method, root, args, env_extra, threads, args.neighbour_rows)
                lat = _spawn("latency", root, args, env_extra, threads, None)
            finally:
                if neighbour:
                    neighbour.stop()
            row += [p["rows"] / p["seconds"], lat["latency_ms"]]
        table.append(row)
        print(f"  {label} done ({_load()})", flush=True)
    print(f"{'threads':<44}{'idle rows/s':>12}{'1-row ms':>9}{'busy rows/s':>12}{'1-row ms':>9}{'busy/idle':>10}")
    one_busy = table[0][3]
    for label, idle, lat_idle, busy, lat_busy in table:
        print(f"{label:<44}{idle:>12.1f}{lat_idle:>9.1f}{busy:>12.1f}{lat_busy:>9.1f}{busy / idle:>10.2f}"
              f"   (busy: {busy / one_busy:.2f}x of 1 thread)")


def _cli_end_to_end(root: Path, args) -> None:
    """The whole command a CI job runs on the same rows (a fresh process: imports, loading, probe with head
    gradient norms, the evidence passes, every report file), and the probe's share of it."""
    from bench_streaming import run_cli  # exit 1 (the random fixture model judged collapsed) counts as a run

    data = root / (f"eval_{args.rows}.csv" if args.rows else "eval.csv")
    extra = ["--threads", str(args.threads)] if args.threads else []
    best = None
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-cli-") as out:
            wall = run_cli(root / "model", data, Path(out), extra)["seconds"]
            meta = json.loads((Path(out) / "summary.json").read_text())["metadata"]
        if best is None or wall < best[0]:
            best = (wall, meta["probe_seconds"], meta["rows"])
    wall, probe_s, rows = best
    print(f"\nCLI end to end (collapse-detect MODEL DATA: fresh process, every output file; best of {args.rounds}): "
          f"{wall:.1f} s for {rows} rows = {rows / wall:.1f} rows/s; the probe {probe_s:.1f} s of it, the rest is "
          "start-up, loading, the evidence passes and the report")


def _median_tokens(root: Path, rows: int | None) -> str:
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    texts = pd.read_csv(root / "eval.csv")["text"].tolist()[: rows or None]
    lengths = sorted(len(x) for x in tok(texts)["input_ids"])
    return f"{lengths[len(lengths) // 2]}, max {lengths[-1]}"


if __name__ == "__main__":
    main()
