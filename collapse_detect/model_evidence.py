"""Evidence that needs the model itself (torch): what it says to inputs that carry no information, whether
its head was trained, whether the tokenizer fits the embeddings, and writing a bias-patched checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .stats import SCORE_RANGE, Accumulator, log_odds, total_variation


def _forward(model, rows: list[list[int]], pad_id: int, with_logits: bool = False):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    probs = torch.softmax(logits, dim=-1).numpy().astype(np.float64)
    return (probs, logits.numpy().astype(np.float64)) if with_logits else probs


def null_input_probe(model, tokenizer, acc: Accumulator, class_names: list[str], *, seed: int = 0,
                     length: int | None = None) -> dict:
    """Outputs on inputs with no information (empty, all-[PAD], all-[MASK]) and on token-shuffled rows.

    ``agreement`` is the share of sampled real rows whose prediction equals the empty input's; ``distance`` the
    mean over rows of the largest per-class log-odds difference to the empty input. A model that ignores its
    input has agreement near 1 and distance near 0.
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
    outs, out_logits = _forward(model, [inputs[n] for n in names], pad_id, with_logits=True)
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
    result["shuffled"] = _shuffled_probe(model, tokenizer, acc, pad_id, seed)
    return result


def _shuffled_probe(model, tokenizer, acc: Accumulator, pad_id: int, seed: int) -> dict | None:
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
    from .probe import make_batches

    original = changed = None
    # length-sorted batches, as in the probe: shuffling keeps each row's length, so both share the batches
    for idx in make_batches(np.asarray([len(r) for r in rows]), 64, None):
        a = _forward(model, [rows[i] for i in idx], pad_id)
        b = _forward(model, [shuffled[i] for i in idx], pad_id)
        if original is None:
            original, changed = np.empty((len(rows), a.shape[1])), np.empty((len(rows), a.shape[1]))
        original[idx], changed[idx] = a, b
    return {"rows": len(rows), "agreement": float((original.argmax(1) == changed.argmax(1)).mean()),
            "distance": float(np.mean([total_variation(a, b) for a, b in zip(original, changed)]))}


def head_state(model, missing_keys: list[str], label_prior: list[float]) -> dict:
    """Scale of the classification head against its initialisation, and its bias against log priors."""
    from .gradnorm import find_head

    head = find_head(model)
    weight = head.weight.detach().float().numpy()
    bias = head.bias.detach().float().numpy() if head.bias is not None else np.zeros(weight.shape[0])
    init_range = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    head_names = {name for name, module in model.named_modules() if module is head}
    missing_head = [k for k in missing_keys if any(k.startswith(n + ".") for n in head_names)
                    or "classifier" in k or "score" in k]
    prior = np.asarray(label_prior, dtype=float)
    present = prior > 0
    corr = None
    if present.sum() >= 3 and np.std(bias[present]) > 0:
        corr = float(np.corrcoef(bias[present], np.log(prior[present]))[0, 1])
    return {
        "weight_std": float(weight.std()), "initializer_range": init_range,
        "weight_std_ratio": float(weight.std() / init_range),
        "bias": bias.tolist(), "bias_abs_max": float(np.abs(bias).max()),
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
        head.bias += torch.as_tensor(np.asarray(offsets), dtype=head.bias.dtype)
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        with torch.no_grad():
            head.bias.copy_(original)
    return out
