#!/usr/bin/env python
"""Would `torch.compile` bring the probe's forward closer to the fp32 matmul peak? Measured side by side in one
process on bench_probe.py's fixture (MiniLM-L6-sized BERT, 2,000 rows, the probe's own batches):

1. one thread: the eager model against the compiled model on the same batches, in alternating rounds;
2. the probe as the CLI runs it (batch workers, one thread each) with the encoder eager, compiled with inductor's
   default Python wrapper, and compiled with ``cpp_wrapper`` (the whole graph in C++), in alternating rounds.

Compiling uses inductor with freezing, ``max_autotune`` (the CPP GEMM template against oneDNN) and dynamic
shapes, in a fresh inductor cache folder (no compiled graphs of earlier runs). Every share of the peak is
against a matmul peak measured just before and after the round, with the same thread count. Needs a C++ compiler and
Python headers (inductor builds its kernels with them). About 8 minutes on 2 cores.

    python benchmarks/bench_compile.py --workdir /tmp/bfx
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def compile_options(cpp_wrapper: bool) -> dict:
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "cpp_wrapper": cpp_wrapper}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="bench_probe.py's fixture folder (built there if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-compile-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")  # cold compiles

    import numpy as np
    import pandas as pd
    import torch

    from bench_probe import build_fixture, forward_flops, matmul_peak_gflops
    from collapse_detect.checkpoint import load_checkpoint
    from collapse_detect.data import iter_chunks
    from collapse_detect.probe import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, ProbeOptions, _pad, make_batches
    from collapse_detect.probe import run_probe
    from collapse_detect.runtime import apply_threads

    if not (root / "model" / "config.json").exists() or not (root / "eval.csv").exists():
        print(f"building the fixture in {root} ...", flush=True)
        build_fixture(root)
    data = str(root / "eval.csv")
    warm = root / "warmup_compile.csv"
    pd.read_csv(data).iloc[:64].to_csv(warm, index=False)

    runtime = apply_threads(None)
    loaded = load_checkpoint(str(root / "model"))
    model, tok = loaded.model, loaded.tokenizer
    prefix = model.base_model_prefix
    encoder = getattr(model, prefix)
    texts = pd.read_csv(data)["text"].tolist()
    enc = tok(texts, truncation=True, max_length=512)
    enc = {k: list(enc[k]) for k in ("input_ids", "token_type_ids")}
    lengths = np.array([len(x) for x in enc["input_ids"]])
    flops = forward_flops(model.config, lengths)
    print(f"{len(texts)} rows, {lengths.sum()} tokens, torch {torch.__version__}, "
          f"{runtime['threads']} batch workers in the probe", flush=True)

    def compiled(cpp_wrapper: bool):
        return torch.compile(encoder, dynamic=True, options=compile_options(cpp_wrapper))

    def peak() -> float:
        return matmul_peak_gflops()[0]

    def share(seconds: float, pk: float) -> str:
        return f"{seconds:6.2f} s {flops / seconds / 1e9:6.1f} GFLOP/s ({flops / seconds / 1e9 / pk:.2f})"

    # 1. one thread, a bare forward over the probe's batches
    batches = [_pad(enc, idx, tok.pad_token_id or 0) for idx in
               make_batches(lengths, DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS)]

    def forward_all() -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = torch.cat([model(**b).logits for b in batches])
        return time.perf_counter() - t0, out

    torch.set_num_threads(1)
    python_wrapper = compiled(False)
    setattr(model, prefix, python_wrapper)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**batches[len(batches) // 2])
    print(f"\none thread; compile (Python wrapper): {time.perf_counter() - t0:.1f} s", flush=True)
    seconds, _ = forward_all()
    print(f"  first compiled pass (shapes recompiled): {seconds:.1f} s", flush=True)
    for r in range(args.rounds):
        pk = peak()
        setattr(model, prefix, encoder)
        eager_s, eager_out = forward_all()
        setattr(model, prefix, python_wrapper)
        comp_s, comp_out = forward_all()
        pk = max(pk, peak())
        print(f"  round {r + 1}: peak {pk:.1f} | eager {share(eager_s, pk)} | compiled {share(comp_s, pk)} | "
              f"max |d logit| {float((eager_out - comp_out).abs().max()):.1e}", flush=True)
    setattr(model, prefix, encoder)

    # 2. the probe with its batch workers
    torch.set_num_threads(runtime["threads"])
    engines = {"eager": encoder, "compiled": python_wrapper, "compiled cpp_wrapper": compiled(True)}

    def probe(engine: str, path) -> float:
        setattr(model, prefix, engines[engine])
        try:
            _, chunks = iter_chunks(str(path), loaded.class_names)
            t0 = time.perf_counter()
            run_probe(model, tok, chunks, loaded.class_names,
                      ProbeOptions(head_grad_norms=False, workers=runtime["threads"]))
            return time.perf_counter() - t0
        finally:
            setattr(model, prefix, encoder)

    print(f"\nthe probe, {runtime['threads']} batch workers (encoder swapped, head eager)", flush=True)
    for engine in engines:
        warm_s = probe(engine, warm)  # compiles on first use
        print(f"  {engine}: warm-up {warm_s:.1f} s, first pass {probe(engine, data):.1f} s", flush=True)
    for r in range(args.rounds):
        pk = peak()
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        times = {engine: probe(engine, data) for engine in order}
        pk = max(pk, peak())
        print(f"  round {r + 1}: peak {pk:.1f} | " + " | ".join(f"{e} {share(times[e], pk)}" for e in engines),
              flush=True)


if __name__ == "__main__":
    main()
