"""Run a checkpoint over the eval rows: the only module that runs torch.

Rows are tokenized per chunk without padding, sorted by token length and cut into batches that are padded
only to their own longest row, so almost no compute goes to padding; results go back to input order before
they reach the accumulator.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from .data import Chunk
from .errors import CheckpointError, InputError
from .runtime import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS
from .stats import Accumulator, Reservoir, row_priority


@dataclass
class ProbeOptions:
    batch_size: int = DEFAULT_BATCH_ROWS
    max_length: int | None = None
    max_tokens_per_batch: int | None = DEFAULT_BATCH_TOKENS
    head_grad_norms: bool = True
    grad_sample: int = 0          # rows per class that get backward-based (ghost) norms; 0 = none
    grad_layers: int | None = None  # last N blocks for ghost norms; None = all
    seed: int = 0
    progress: bool = False
    sample_rows: int = 4000
    dtype: str = "fp32"           # "bf16": run the model in bfloat16 (weights cast for the run, restored after)
    workers: int = 1              # batches in flight at once, each on one thread (see BatchRunner)
    drift_rows: int = 256         # with bf16: seeded rows probed in fp32 too, to measure the probability drift
    # Several processes (torchrun): called with the per-class ghost-norm reservoirs before the ghost pass, it
    # returns them trimmed to this process's share of the global sample (see distributed.py).
    sample_sync: Callable | None = None


@dataclass
class ProbeRun:
    accumulator: Accumulator
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated_rows: int = 0
    unknown_tokens: int = 0
    max_length: int = 0
    seconds: float = 0.0
    grad_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    dtype: str = "fp32"
    drift: Reservoir | None = None  # bf16 only: per-row |p_bf16 - p_fp32| on the seeded rows (merges)
    runtime: dict = field(default_factory=dict)  # threads, wait policy, processes: for the metadata


def _position_offset(model) -> int:
    """Position ids the embeddings skip: models whose position table has a padding row (RoBERTa, XLM-R, MPNet,
    Longformer, ESM, ...) number a row's positions from padding_idx + 1, so they read
    max_position_embeddings - padding_idx - 1 tokens (512 of roberta-base's 514); BERT's table has none."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    padding_idx = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
    return padding_idx + 1 if isinstance(padding_idx, int) and padding_idx >= 0 else 0


def non_finite_message(model, row_ids: np.ndarray, rows: int) -> str:
    """Why a model whose logits are NaN or infinite cannot be judged, and where the cause likely is: weights that
    hold NaN/inf (a diverged run, often fp16 overflow), or else an activation that overflows on these rows."""
    broken = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    first = ", ".join(str(int(r)) for r in row_ids[:3])
    head = (f"the model outputs NaN or infinite logits for {len(row_ids)} of {rows} rows read so far "
            f"({'rows' if len(row_ids) > 1 else 'row'} {first}{', ...' if len(row_ids) > 3 else ''}), from which "
            "nothing can be judged")
    if broken:
        names = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        return (f"{head}: {len(broken)} weight tensor(s) hold NaN or inf ({names}), so training diverged; retrain "
                "with a lower learning rate, gradient clipping (max_grad_norm) and bf16 or fp32 instead of fp16")
    return (f"{head}: the weights are finite, so an activation overflows on these rows (with --dtype bf16, try the "
            "default fp32)")


def model_max_length(model, tokenizer, requested: int | None) -> int:
    """The longest input the model takes: the smaller of what was asked, the tokenizer's limit and the
    position embeddings (less the positions the embeddings skip)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        positions = int(positions) - _position_offset(model)
    limits = [positions, requested]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limits.append(tok_limit)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else 512


def make_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches of at most ``batch_size`` rows and, when given, at most
    ``max_tokens`` padded tokens (rows x longest row)."""
    order = np.argsort(lengths, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        l_i = int(lengths[i])
        new_longest = max(longest, l_i)
        too_many_tokens = max_tokens is not None and current and new_longest * (len(current) + 1) > max_tokens
        if current and (len(current) >= batch_size or too_many_tokens):
            batches.append(np.asarray(current))
            current, new_longest = [], l_i
        current.append(i)
        longest = new_longest
    if current:
        batches.append(np.asarray(current))
    return batches


class HeadCapture:
    """Forward hook on the classification head's Linear: its input is the pooled feature (kept per thread, so
    batches may run on several threads at once)."""

    def __init__(self, head: torch.nn.Module):
        self._local = threading.local()
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self._local.value = inputs[0].detach()

    @property
    def value(self) -> torch.Tensor | None:
        return getattr(self._local, "value", None)

    def close(self):
        self.handle.remove()


class BatchRunner:
    """Forward passes over padded batches, returning each batch's logits and pooled features.

    With ``workers`` > 1, that many batches run at once, each on its own thread with one intra-op thread
    (batch-parallel), longest batch first. On a 2-core runner this beat two intra-op threads per batch: no
    barrier after every operator, so each core keeps its single-thread efficiency, and a core slowed by a
    neighbour delays only its own batch (benchmarks/bench_probe.py). torch releases the GIL inside operators;
    the Python between them is a few percent of a batch. With ``workers`` == 1 batches run in order on the
    calling thread with the process's intra-op threads."""

    def __init__(self, model, capture: HeadCapture | None, workers: int = 1):
        from .runtime import model_device

        self.model, self.capture, self.workers = model, capture, max(1, int(workers))
        self.device = model_device(model)  # batches are padded on the CPU and moved there
        self._pool = None
        self._threads = torch.get_num_threads()
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="probe",
                                            initializer=torch.set_num_threads, initargs=(1,))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        if bool(batch["attention_mask"].all()):  # no padding (common once sorted): sdpa runs unmasked
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        if self.device.type != "cpu":
            batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits.float().cpu().numpy()
        return logits, None if self.capture is None else self.capture.value.float().cpu().numpy()

    def run(self, batches: list[np.ndarray], make_batch: Callable[[np.ndarray], dict]):
        """Yield ``(batch_idx, padded_tokens, logits, features)`` for every batch: in the given order on the
        calling thread, longest rows first with workers (make_batches sorts by length, so the short batches
        even out the end)."""

        def job(idx):
            batch = make_batch(idx)
            return (idx, int(batch["input_ids"].numel()), *self.forward(batch))

        if self._pool is None:
            yield from map(job, batches)
            return
        futures = [self._pool.submit(job, idx) for idx in batches[::-1]]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            torch.set_num_threads(self._threads)  # the workers' setting is process-wide in torch


def forward_logits(model, rows: list[list[int]], pad_id: int, *, token_type_ids: list | None = None,
                   batch_size: int = DEFAULT_BATCH_ROWS, max_tokens: int | None = DEFAULT_BATCH_TOKENS,
                   workers: int = 1) -> np.ndarray:
    """Logits (float64, in the given order) for rows of token ids (and their token types), batched as the probe
    batches (sorted by length, padded per batch, ``workers`` batches at once); every token of a row is
    attended."""
    lengths = np.asarray([len(r) for r in rows])
    enc = {"input_ids": rows} if token_type_ids is None else {"input_ids": rows, "token_type_ids": token_type_ids}
    out = None
    runner = BatchRunner(model, None, workers)
    with contextlib.closing(runner):
        for batch_idx, _, logits, _ in runner.run(make_batches(lengths, batch_size, max_tokens),
                                                  lambda idx: _pad(enc, idx, pad_id)):
            if out is None:
                out = np.empty((len(rows), logits.shape[1]))
            out[batch_idx] = logits
    return out if out is not None else np.empty((0, int(model.config.num_labels)))


def _encode(tokenizer, texts, pairs, max_length):
    """Token ids (and token types) of a chunk, truncated to ``max_length``, and each row's untruncated length.

    One tokenizer call for the whole chunk; only rows that are too long are tokenized again with truncation
    (the tokenizer's own strategy, so pairs are cut as transformers cuts them)."""
    special = tokenizer.num_special_tokens_to_add(pair=pairs is not None)
    if max_length <= special:  # every row would be its special tokens alone
        raise InputError(f"--max-length {max_length} leaves no room for text: the tokenizer adds {special} "
                         f"special tokens to each row; pass --max-length {special + 1} or more")
    enc = tokenizer(texts, pairs, truncation=False, padding=False, return_attention_mask=False,
                    add_special_tokens=True)
    enc = {key: list(enc[key]) for key in ("input_ids", "token_type_ids") if key in enc}
    full_lengths = np.asarray([len(x) for x in enc["input_ids"]])
    long_rows = np.flatnonzero(full_lengths > max_length)
    if len(long_rows):
        cut = tokenizer([texts[i] for i in long_rows], None if pairs is None else [pairs[i] for i in long_rows],
                        truncation=True, max_length=max_length, padding=False, return_attention_mask=False)
        for key in enc:
            for j, i in enumerate(long_rows):
                enc[key][i] = cut[key][j]
    return enc, full_lengths


def check_grad_layers(model, grad_layers: int | None) -> None:
    """``--grad-layers`` must name at most the model's encoder blocks (checked before any row is probed)."""
    from .gradnorm import find_blocks

    if grad_layers is None:
        return
    found = find_blocks(model)
    if found is None:
        raise InputError(f"--grad-layers {grad_layers}: {type(model).__name__} has no list of encoder blocks to "
                         "count from; leave --grad-layers out")
    if grad_layers > len(found[1]):
        raise InputError(f"--grad-layers {grad_layers} but the model has {len(found[1])} encoder blocks; pass at "
                         f"most {len(found[1])}")


def _progress(total_hint: int | None, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total_hint, unit="row", file=sys.stderr, leave=False, dynamic_ncols=True)


def run_probe(model, tokenizer, chunks: Iterable[Chunk], class_names: list[str], options: ProbeOptions,
              on_chunk: Callable[[Chunk, np.ndarray], None] | None = None, total_rows: int | None = None) -> ProbeRun:
    """Probe every row; ``on_chunk(chunk, probs)`` sees each chunk's probabilities in input order."""
    from .gradnorm import find_head, head_grad_norms
    from .runtime import bf16_fast, cast_model, torch_dtype

    model.eval()
    if options.grad_sample > 0:
        check_grad_layers(model, options.grad_layers)
    max_length = model_max_length(model, tokenizer, options.max_length)
    acc = Accumulator(class_names, seed=options.seed, sample_rows=options.sample_rows)
    run = ProbeRun(acc, max_length=max_length, dtype=options.dtype or "fp32")
    dtype = torch_dtype(options.dtype)
    drift = Reservoir(options.drift_rows) if dtype != torch.float32 and options.drift_rows > 0 else None
    if dtype == torch.bfloat16 and not bf16_fast():
        run.notes.append("--dtype bf16 on a CPU without native bf16 matmul (AVX512-BF16/AMX): it is emulated "
                         "and likely slower than fp32")
    head = find_head(model)
    capture = HeadCapture(head)
    runner = BatchRunner(model, capture, options.workers)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    grad_rows = [Reservoir(options.grad_sample) for _ in class_names] if options.grad_sample > 0 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    try:
        # the workers stop before the weights go back to fp32, even when a batch fails
        with _progress(total_rows, options.progress) as bar, cast_model(model, dtype), contextlib.closing(runner):
            for chunk in chunks:
                n = len(chunk.texts)
                if n == 0:
                    continue
                enc, full_lengths = _encode(tokenizer, chunk.texts, chunk.text_pairs, max_length)
                ids = enc["input_ids"]
                lengths = np.asarray([len(x) for x in ids])
                run.truncated_rows += int((full_lengths > lengths).sum())
                run.tokens += int(lengths.sum())
                if unk_id is not None and unk_id not in (pad_id,):
                    run.unknown_tokens += int(sum(x.count(unk_id) for x in ids))
                logits = np.empty((n, len(class_names)), dtype=np.float32)
                features = None
                batches = make_batches(lengths, options.batch_size, options.max_tokens_per_batch)
                for batch_idx, padded, out, feat in runner.run(batches, lambda idx: _pad(enc, idx, pad_id)):
                    run.padded_tokens += padded
                    logits[batch_idx] = out
                    if features is None:
                        features = np.empty((n, feat.shape[1]), dtype=np.float32)
                    features[batch_idx] = feat
                    if bar is not None:
                        bar.update(len(batch_idx))
                finite = np.isfinite(logits).all(axis=1)
                if not finite.all():
                    raise CheckpointError(non_finite_message(model, chunk.row_ids[~finite], run.rows + n))
                norms = None
                if options.head_grad_norms:
                    probs = _softmax(logits)
                    norms = head_grad_norms(features, probs, chunk.gold)
                acc.update(chunk.row_ids, chunk.gold, logits, features=features, grad_norms=norms, token_ids=ids)
                if grad_rows is not None:
                    prio = row_priority(chunk.row_ids, options.seed)
                    types = enc.get("token_type_ids")
                    for c in np.unique(chunk.gold):
                        sel = np.flatnonzero(chunk.gold == c)
                        grad_rows[c].add(prio[sel], row_id=chunk.row_ids[sel],
                                         ids=_objects(ids[i] for i in sel),
                                         token_type=_objects(types[i] if types is not None else None for i in sel))
                if drift is not None:
                    types = enc.get("token_type_ids")
                    drift.add(row_priority(chunk.row_ids, options.seed), row_id=chunk.row_ids,
                              ids=_objects(ids), token_type=_objects(types if types is not None else [None] * n),
                              probs=_softmax(logits))
                if on_chunk is not None:
                    on_chunk(chunk, _softmax(logits))
                run.rows += n
    finally:
        capture.close()
    run.seconds = time.perf_counter() - start
    if drift is not None:
        run.drift = _drift_pass(model, drift, options, pad_id)
    if grad_rows is not None and options.sample_sync is not None:
        grad_rows = options.sample_sync(grad_rows)
    if grad_rows is not None:
        t0 = time.perf_counter()
        _ghost_pass(model, grad_rows, acc, options, pad_id)
        run.grad_seconds = time.perf_counter() - t0
    return run


def _drift_pass(model, sample: Reservoir, options: ProbeOptions, pad_id: int) -> Reservoir:
    """Probe the seeded rows again in fp32 (the model's own weights, restored after the low-precision run) and
    keep, per row, how far the low-precision probabilities were: a reservoir that merges across processes."""
    out = Reservoir(sample.capacity)
    if len(sample) == 0:
        return out
    types = list(sample.arrays["token_type"])
    low = sample.arrays["probs"].astype(np.float64)
    high = _softmax(forward_logits(model, list(sample.arrays["ids"]), pad_id,
                                   token_type_ids=types if types and types[0] is not None else None,
                                   batch_size=options.batch_size, max_tokens=options.max_tokens_per_batch))
    diff = np.abs(low - high)
    out.add(sample.priority, row_id=sample.arrays["row_id"], max_abs=diff.max(axis=1), sum_abs=diff.sum(axis=1),
            agree=low.argmax(axis=1) == high.argmax(axis=1))
    return out


def drift_summary(drift: Reservoir | None, k: int) -> dict | None:
    """max/mean |p_low - p_fp32| over the seeded rows and classes, and how often the predictions agree."""
    if drift is None or len(drift) == 0:
        return None
    a = drift.arrays
    return {"rows": int(len(drift)), "max_abs_prob_diff": float(a["max_abs"].max()),
            "mean_abs_prob_diff": float(a["sum_abs"].sum() / (len(drift) * k)),
            "prediction_agreement": float(a["agree"].mean())}


def _objects(items) -> np.ndarray:
    """A 1-D object array (np.asarray would make equal-length token lists into a 2-D int array)."""
    items = list(items)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _pad(enc, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows ``idx`` padded to their longest (one vectorised fill, not a tensor per row)."""
    rows = [enc["input_ids"][i] for i in idx]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    total = int(lengths.sum())
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    if "token_type_ids" in enc:
        tt = np.zeros(mask.shape, dtype=np.int64)
        tt[mask] = np.fromiter(itertools.chain.from_iterable(enc["token_type_ids"][i] for i in idx),
                               dtype=np.int64, count=total)
        batch["token_type_ids"] = torch.from_numpy(tt)
    return batch


def _ghost_pass(model, grad_rows, acc: Accumulator, options: ProbeOptions, pad_id: int) -> None:
    """Backward-based per-example gradient norms on the stratified sample (one batched backward per batch)."""
    from .gradnorm import per_example_grad_norms

    for c, res in enumerate(grad_rows):
        if len(res) == 0:
            continue
        ids = list(res.arrays["ids"])
        tts = list(res.arrays["token_type"])
        enc = {"input_ids": ids}
        if tts and tts[0] is not None:
            enc["token_type_ids"] = tts
        lengths = np.asarray([len(x) for x in ids])
        gold = np.full(len(ids), c, dtype=np.int64)
        for batch_idx in make_batches(lengths, options.batch_size, options.max_tokens_per_batch):
            batch = _pad(enc, batch_idx, pad_id)
            norms, _ = per_example_grad_norms(model, batch, torch.as_tensor(gold[batch_idx]),
                                              last_n_blocks=options.grad_layers)
            for group, values in norms.items():
                if group.startswith("head"):
                    continue  # the closed form already covers every row
                acc.grad_group(f"ghost:{group}").update(
                    gold[batch_idx], np.asarray(values, dtype=np.float64), res.priority[batch_idx])

