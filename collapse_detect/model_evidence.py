"""Evidence that needs the model itself (torch): what it says to inputs that carry no information, whether
its head was trained, whether the tokenizer fits the embeddings, and writing a bias-patched checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .probe import _softmax, forward_logits
from .stats import SCORE_RANGE, Accumulator, log_odds, total_variation


def null_input_probe(model, tokenizer, acc: Accumulator, class_names: list[str], *, seed: int = 0,
                     length: int | None = None, batching: dict | None = None, reuse_probe: bool = True) -> dict:
    """Outputs on inputs with no information (empty, all-[PAD], all-[MASK]) and on token-shuffled rows.

    ``agreement`` is the share of sampled real rows whose prediction equals the empty input's; ``distance`` the
    mean over rows of the largest per-class log-odds difference to the empty input. A model that ignores its
    input has agreement near 1 and distance near 0. ``batching``: keyword arguments for probe.forward_logits
    (batch size, token budget, workers), so these passes run as the probe runs. ``reuse_probe``: take the
    sampled rows' own probabilities from the probe's sample instead of running them again (only right when the
    probe ran the model as it is now, i.e. in fp32).
    """
    sample = acc.sample.arrays
    probs = sample["probs"].astype(np.float64)
    row_logodds = np.clip(log_odds(sample["logits"]), *SCORE_RANGE)
    if length is None:
        tok_rows = acc.token_sample.arrays.get("ids")
        length = int(np.median([len(r) for r in tok_rows])) if tok_rows is not None and len(tok_rows) else 16
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    empty = tokenizer("", truncation=True)["input_ids"]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = max(length - 2, 1)
    wrap = (lambda ids: [cls_id] + ids + [sep_id]) if cls_id is not None and sep_id is not None else (lambda ids: ids)
    inputs = {"empty": empty or [pad_id], "all_pad": wrap([pad_id] * body)}
    if tokenizer.mask_token_id is not None:
        inputs["all_mask"] = wrap([tokenizer.mask_token_id] * body)
    names = list(inputs)
    batching = batching or {}
    out_logits = forward_logits(model, [inputs[n] for n in names], pad_id, **batching)
    outs = _softmax(out_logits)
    result = {"length": length, "inputs": {}}
    pred = probs.argmax(axis=1)
    for name, p, z in zip(names, outs, out_logits):
        top = int(p.argmax())
        null_logodds = np.clip(log_odds(z[None, :]), *SCORE_RANGE)[0]
        result["inputs"][name] = {
            "probs": p.tolist(), "predicted": class_names[top],
            "agreement": float((pred == top).mean()),
            "distance": float(np.abs(row_logodds - null_logodds).max(axis=1).mean()),
        }
    result["agreement"] = result["inputs"]["empty"]["agreement"]
    result["distance"] = result["inputs"]["empty"]["distance"]
    result["shuffled"] = _shuffled_probe(model, tokenizer, acc, pad_id, seed, batching, reuse_probe)
    return result


def _shuffled_probe(model, tokenizer, acc: Accumulator, pad_id: int, seed: int, batching: dict,
                    reuse_probe: bool) -> dict | None:
    """Shuffle the tokens of sampled rows (specials kept in place) and compare predictions."""
    arrays = acc.token_sample.arrays
    if not arrays or len(arrays.get("ids", [])) == 0:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    rng = np.random.default_rng(seed)
    rows = [list(map(int, r)) for r in arrays["ids"]]
    shuffled = []
    for r in rows:
        r = list(r)
        pos = [i for i, t in enumerate(r) if t not in special]
        vals = [r[i] for i in pos]
        rng.shuffle(vals)
        for i, v in zip(pos, vals):
            r[i] = v
        shuffled.append(r)
    original = _sampled_probs(acc, arrays["row_id"]) if reuse_probe else None
    if original is None:
        original = _softmax(forward_logits(model, rows, pad_id, **batching))
    changed = _softmax(forward_logits(model, shuffled, pad_id, **batching))
    return {"rows": len(rows), "agreement": float((original.argmax(1) == changed.argmax(1)).mean()),
            "distance": float(np.mean([total_variation(a, b) for a, b in zip(original, changed)]))}


def _sampled_probs(acc: Accumulator, row_ids: np.ndarray) -> np.ndarray | None:
    """The probe's probabilities for ``row_ids`` from its row sample, or None unless it holds them all. Both
    samples keep the rows of smallest seeded priority, so the token sample is inside the larger row sample."""
    sample = acc.sample.arrays
    if not sample or "row_id" not in sample:
        return None
    where = {int(r): i for i, r in enumerate(sample["row_id"])}
    idx = [where.get(int(r)) for r in row_ids]
    if any(i is None for i in idx):
        return None
    return sample["probs"][np.asarray(idx, dtype=np.int64)].astype(np.float64)


def head_state(model, missing_keys: list[str], label_prior: list[float]) -> dict:
    """Scale of the classification head against its initialisation, and its bias against log priors."""
    from .gradnorm import find_head

    head = find_head(model)
    weight = head.weight.detach().float().cpu().numpy()
    bias = head.bias.detach().float().cpu().numpy() if head.bias is not None else np.zeros(weight.shape[0])
    init_range = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    head_names = {name for name, module in model.named_modules() if module is head}
    missing_head = [k for k in missing_keys if any(k.startswith(n + ".") for n in head_names)
                    or "classifier" in k or "score" in k]
    prior = np.asarray(label_prior, dtype=float)
    present = prior > 0
    corr = None
    if present.sum() >= 3 and np.std(bias[present]) > 0 and np.std(np.log(prior[present])) > 0:  # both vary
        corr = float(np.corrcoef(bias[present], np.log(prior[present]))[0, 1])
    return {
        "weight_std": float(weight.std()), "initializer_range": init_range,
        "weight_std_ratio": float(weight.std() / init_range),
        "has_bias": head.bias is not None, "bias": bias.tolist(), "bias_abs_max": float(np.abs(bias).max()),
        "bias_spread": float(bias.max() - bias.min()),
        "bias_log_prior_correlation": corr,
        "missing_head_keys": missing_head,
    }


def tokenizer_fit(model, tokenizer) -> dict:
    emb = model.get_input_embeddings()
    rows = int(emb.weight.shape[0]) if emb is not None else None
    vocab = len(tokenizer)
    return {"tokenizer_vocab": vocab, "embedding_rows": rows,
            "vocab_mismatch": rows is not None and (vocab > rows or vocab < 0.5 * rows)}


def write_fixed_checkpoint(model, tokenizer, offsets, out_dir, source_dir=None) -> Path:
    """Save a copy of the model with ``offsets`` added to the classifier bias (post-hoc logit adjustment)."""
    from .gradnorm import find_head

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = find_head(model)
    with torch.no_grad():
        if head.bias is None:
            raise ValueError("the classification head has no bias to shift")
        original = head.bias.detach().clone()
        head.bias += torch.as_tensor(np.asarray(offsets), dtype=head.bias.dtype, device=head.bias.device)
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        with torch.no_grad():
            head.bias.copy_(original)
    return out
