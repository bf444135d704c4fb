"""Run a checkpoint over the eval rows: the only module that runs torch.

Rows are tokenized per chunk without padding, sorted by token length and cut into batches that are padded
only to their own longest row, so almost no compute goes to padding; results go back to input order before
they reach the accumulator.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from .data import Chunk
from .stats import Accumulator, Reservoir, row_priority


@dataclass
class ProbeOptions:
    batch_size: int = 32
    max_length: int | None = None
    max_tokens_per_batch: int | None = None
    head_grad_norms: bool = True
    grad_sample: int = 0          # rows per class that get backward-based (ghost) norms; 0 = none
    grad_layers: int | None = None  # last N blocks for ghost norms; None = all
    seed: int = 0
    progress: bool = False
    sample_rows: int = 4000


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


def model_max_length(model, tokenizer, requested: int | None) -> int:
    """The longest input the model takes: the smaller of what was asked, the tokenizer's limit and the
    position embeddings."""
    limits = [getattr(model.config, "max_position_embeddings", None), requested]
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
    """Forward hook on the classification head's Linear: its input is the pooled feature."""

    def __init__(self, head: torch.nn.Module):
        self.value = None
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.value = inputs[0].detach()

    def close(self):
        self.handle.remove()


def _encode(tokenizer, texts, pairs, max_length):
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=True, return_length=False)
    if pairs is None:
        full = tokenizer(texts, truncation=False, padding=False, return_attention_mask=False,
                         add_special_tokens=True)["input_ids"]
    else:
        full = tokenizer(texts, pairs, truncation=False, padding=False, return_attention_mask=False,
                         add_special_tokens=True)["input_ids"]
    return enc, np.asarray([len(x) for x in full])


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

    model.eval()
    max_length = model_max_length(model, tokenizer, options.max_length)
    acc = Accumulator(class_names, seed=options.seed, sample_rows=options.sample_rows)
    run = ProbeRun(acc, max_length=max_length)
    head = find_head(model)
    capture = HeadCapture(head)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    grad_rows = [Reservoir(options.grad_sample) for _ in class_names] if options.grad_sample > 0 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    try:
        with _progress(total_rows, options.progress) as bar:
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
                    run.unknown_tokens += int(sum(sum(1 for t in x if t == unk_id) for x in ids))
                logits = np.empty((n, len(class_names)), dtype=np.float32)
                features = None
                for batch_idx in make_batches(lengths, options.batch_size, options.max_tokens_per_batch):
                    batch = _pad(enc, batch_idx, pad_id)
                    run.padded_tokens += int(batch["input_ids"].numel())
                    with torch.inference_mode():
                        out = model(**batch).logits.float()
                    logits[batch_idx] = out.numpy()
                    feat = capture.value.float().numpy()
                    if features is None:
                        features = np.empty((n, feat.shape[1]), dtype=np.float32)
                    features[batch_idx] = feat
                    if bar is not None:
                        bar.update(len(batch_idx))
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
                if on_chunk is not None:
                    on_chunk(chunk, _softmax(logits))
                run.rows += n
    finally:
        capture.close()
    run.seconds = time.perf_counter() - start
    if grad_rows is not None:
        t0 = time.perf_counter()
        _ghost_pass(model, grad_rows, acc, options, pad_id)
        run.grad_seconds = time.perf_counter() - t0
    return run


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
    rows = [enc["input_ids"][i] for i in idx]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        attention[j, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if "token_type_ids" in enc:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(idx):
            t = enc["token_type_ids"][i]
            tt[j, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        batch["token_type_ids"] = tt
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
                g = acc.grad.setdefault(f"ghost:{group}", _new_grad(acc))
                g.update(gold[batch_idx], np.asarray(values, dtype=np.float64),
                         res.priority[batch_idx])


def _new_grad(acc: Accumulator):
    from .stats import GradAccumulator

    return GradAccumulator(acc.k)
