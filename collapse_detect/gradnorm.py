"""Exact per-example gradient norms for sequence classifiers, without per-example backward passes.

Two tools live here:

* :func:`head_grad_norms` -- a closed form for the classification head that needs only the
  forward pass (the head's input features and the predicted probabilities).
* :class:`GhostNorms` -- hooks that turn *one* batched backward pass of the summed loss into
  exact per-example gradient norms for every ``nn.Linear``, ``nn.Embedding`` and
  ``nn.LayerNorm`` of the model, grouped by encoder block ("ghost clipping" norms;
  Goodfellow 2015, Li et al. ICLR 2022).

:func:`per_example_grad_norms` wraps :class:`GhostNorms` for the common case.

The norms are those of the gradient of the cross-entropy loss at the gold label with respect
to the parameters, one example at a time, as if every covered parameter were trainable
(frozen parameters are covered too, so the result does not depend on ``requires_grad``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .runtime import model_device

__all__ = [
    "find_head",
    "find_blocks",
    "head_grad_norms",
    "GhostNorms",
    "per_example_grad_norms",
]


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------


def find_head(model: nn.Module) -> nn.Linear:
    """Return the classification head: the last ``nn.Linear`` with ``num_labels`` outputs.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face ``*ForSequenceClassification`` model (anything with ``config.num_labels``).

    Returns
    -------
    torch.nn.Linear
        ``model.classifier`` for BERT and DistilBERT, ``model.classifier.out_proj`` for RoBERTa.

    Raises
    ------
    ValueError
        If the model has no ``config.num_labels`` or no ``nn.Linear`` with that many outputs.
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is None:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__}: "
            "model.config.num_labels is missing"
        )
    head = None
    # Registration order follows the forward order in HF models, so the last match is the head
    # proper rather than, say, an attention projection that happens to have num_labels outputs.
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            head = module
    if head is None:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__}: "
            f"no nn.Linear with out_features == config.num_labels ({num_labels})"
        )
    return head


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """Find the transformer block list: the longest ``nn.ModuleList`` of same-typed modules.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    (str, torch.nn.ModuleList) or None
        Qualified name (e.g. ``"bert.encoder.layer"``) and the list, or None if the model has
        no such list.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


# --------------------------------------------------------------------------------------------
# Closed form for the head
# --------------------------------------------------------------------------------------------


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def head_grad_norms(
    features: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
) -> dict[str, np.ndarray]:
    """Per-example gradient norms of the head ``nn.Linear`` under softmax cross-entropy.

    For ``logits = W h + b`` and ``L = CE(logits, y)``, ``dL/dlogits = p - onehot(y)``, so
    ``dL/dW = (p - onehot(y)) h^T`` is rank one and its Frobenius norm factorises. Only the
    forward pass is needed.

    Parameters
    ----------
    features : array-like, shape (n, d)
        The *input* of the head Linear (capture it with a forward hook on :func:`find_head`).
    probs : array-like, shape (n, C)
        Softmax probabilities of the logits that the head produced from ``features``.
    labels : array-like of int, shape (n,)
        Gold labels in ``[0, C)``.

    Returns
    -------
    dict of str to numpy.ndarray
        ``"head_weight"``, ``"head_bias"`` and ``"head"`` (both together), each (n,) float64.
    """
    h = _as_float64(features)
    p = _as_float64(probs)
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if h.ndim != 2 or p.ndim != 2 or y.ndim != 1:
        raise ValueError(
            f"expected features (n, d), probs (n, C), labels (n,); got shapes "
            f"{h.shape}, {p.shape}, {y.shape}"
        )
    if not (h.shape[0] == p.shape[0] == y.shape[0]):
        raise ValueError(f"row counts differ: features {h.shape[0]}, probs {p.shape[0]}, labels {y.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}); got range [{y.min()}, {y.max()}]")
    delta = p.copy()
    delta[np.arange(len(y)), y.astype(np.int64)] -= 1.0
    bias = np.linalg.norm(delta, axis=1)
    weight = bias * np.linalg.norm(h, axis=1)
    return {"head": np.hypot(weight, bias), "head_weight": weight, "head_bias": bias}


# --------------------------------------------------------------------------------------------
# Per-module squared norms from activations a and output gradients g
# --------------------------------------------------------------------------------------------


def _as_btd(x: torch.Tensor) -> torch.Tensor:
    """View (B, ..., d) as (B, T, d); 2-D inputs become T = 1."""
    if x.dim() == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    # Half-precision Gram matrices lose too much; float64 models keep their precision.
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _ghost_is_cheaper(T: int, d: int, p: int) -> bool:
    """Time rule: two (T x T) Grams cost T^2 (d + p) per example, the (d x p) product T d p.

    Li et al.'s ``2 T^2 < d p`` compares memory instead; here the materialising route is chunked
    over examples (:data:`_MATERIALISE_BYTES`), so memory is bounded either way and the rule
    can follow the arithmetic.
    """
    return T * (d + p) < d * p


# Upper bound on the (chunk, d, p) per-example gradients held at once by the materialising route.
_MATERIALISE_BYTES = 64 * 2**20

# Beyond this many positions the (T x T) same-id Gram of an embedding gets too big (B T^2
# floats); a sort + index_add takes over.
_EMBEDDING_GRAM_MAX_T = 1024

# Elementwise passes over (B, T, d) tensors are memory-bound and slow next to BLAS on CPU, so
# reductions below are written as batched matmuls (bmm) or a single norm where possible.


def _rowsq(x: torch.Tensor) -> torch.Tensor:
    """Per-example sum of squares over all but the first dimension, one pass."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example <x, y> over all but the first dimension, as one batched matmul."""
    B = x.shape[0]
    return torch.bmm(x.reshape(B, 1, -1), y.reshape(B, -1, 1)).reshape(B)


def _masked_sum(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum_t m_t g_t as one batched matmul (one pass over g, no masked copy)."""
    if mask is None:
        return g.sum(1)
    return torch.bmm(mask.unsqueeze(1), g).squeeze(1)


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.unsqueeze(2) * mask.unsqueeze(1)


def _gram(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked input Gram matrix (B, T, T): zeroing row and column t drops position t."""
    aa = torch.bmm(a, a.transpose(1, 2))
    if mask is not None:
        aa = aa * _pair_mask(mask)
    return aa


def _linear_sq(
    a: torch.Tensor,
    g: torch.Tensor,
    has_bias: bool,
    mask: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example squared Frobenius norms of ``sum_t m_t g_t a_t^T`` and ``sum_t m_t g_t``.

    Parameters
    ----------
    a : (B, T, d) inputs.
    g : (B, T, p) output gradients.
    has_bias : whether to return the bias term.
    mask : (B, T) 0/1 weights in the compute dtype, or None for all positions.
    gram : optional precomputed ``_gram(a, mask)`` (Linears that share an input share it).

    Returns
    -------
    (w, b) : (B,) float64 tensors; b is None without bias.
    """
    dt = _compute_dtype(a, g)
    a, g = a.to(dt), g.to(dt)
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1:
        w = _rowsq(a) * _rowsq(g)
        if mask is not None:
            w = w * mask[:, 0]
    elif _ghost_is_cheaper(T, d, p):
        # Ghost norm: ||A^T G||_F^2 = <A A^T, G G^T>_F.
        aa = _gram(a, mask) if gram is None else gram
        w = _rowdot(aa, torch.bmm(g, g.transpose(1, 2)))
    else:
        if mask is not None:
            if d <= p:
                a = a * mask.unsqueeze(-1)
            else:
                g = g * mask.unsqueeze(-1)
        step = max(1, _MATERIALISE_BYTES // (d * p * a.element_size()))
        w = torch.cat([_rowsq(torch.bmm(a[i:i + step].transpose(1, 2), g[i:i + step]))
                       for i in range(0, B, step)])
    b = _rowsq(_masked_sum(g, mask)).double() if has_bias else None
    return w.double(), b


def _embedding_sq(
    ids: torch.Tensor,
    g: torch.Tensor,
    num_embeddings: int,
    keep: torch.Tensor | None = None,
    grad_gram: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-example squared norm of the sparse embedding gradient.

    The per-example gradient puts ``sum_{t: id_t = v} g_t`` into row ``v``, so its squared norm
    is ``sum_{t,s} [id_t = id_s] (g_t . g_s)`` over kept positions.

    Parameters
    ----------
    ids : (B, T) int ids.
    g : (B, T, d) output gradients.
    num_embeddings : table size (ids lie in [0, num_embeddings)).
    keep : (B, T) bool, positions that count (None: all).
    grad_gram : optional callable returning ``g g^T`` (B, T, T); BERT's word, position and
        token-type tables receive the very same gradient tensor and can share it.
    """
    dt = _compute_dtype(g)
    B = g.shape[0]
    g = g.reshape(B, -1, g.shape[-1]).to(dt)
    ids = ids.reshape(B, -1).to(torch.int64)
    T, d = g.shape[1], g.shape[2]
    if keep is None:
        keep = torch.ones_like(ids, dtype=torch.bool)
    # Dropped positions get ids of their own, so they never merge with a kept one.
    ids = torch.where(keep, ids, num_embeddings + torch.arange(T, device=ids.device))
    sorted_ids, order = torch.sort(ids, dim=1)
    repeats = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    keep_f = keep.to(dt)
    if not bool(repeats.any()):
        # No id repeats within a row (e.g. position ids): the rows are disjoint.
        return _rowdot(torch.linalg.vector_norm(g, dim=-1).square(), keep_f).double()
    if T <= _EMBEDDING_GRAM_MAX_T:
        gg = torch.bmm(g, g.transpose(1, 2)) if grad_gram is None else grad_gram()
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(dt) * _pair_mask(keep_f)
        return _rowdot(gg, same).double()
    # Long rows: sum each run of equal ids (adjacent after sorting) with one index_add.
    g = g * keep_f.unsqueeze(-1)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = ~repeats
    run = torch.cumsum(new_run.reshape(-1), 0) - 1
    g_sorted = torch.gather(g, 1, order.unsqueeze(-1).expand(-1, -1, d)).reshape(-1, d)
    summed = torch.zeros(int(run[-1]) + 1, d, dtype=dt, device=g.device)
    summed.index_add_(0, run, g_sorted)
    row_of_run = torch.zeros(summed.shape[0], dtype=torch.int64, device=g.device)
    row_of_run[run] = torch.arange(B, device=g.device).repeat_interleave(T)
    out = torch.zeros(B, dtype=dt, device=g.device)
    out.index_add_(0, row_of_run, torch.linalg.vector_norm(summed, dim=1).square())
    return out.double()


def _layernorm_xhat(x: torch.Tensor, module: nn.LayerNorm) -> torch.Tensor:
    """Recompute the normalised input of a LayerNorm (what its weight multiplies)."""
    return F.layer_norm(x.to(_compute_dtype(x)), module.normalized_shape, None, None, module.eps)


def _layernorm_sq(xhat: torch.Tensor, g: torch.Tensor, has_weight: bool, has_bias: bool,
                  mask: torch.Tensor | None = None):
    """Per-example squared norms of ``sum_t m_t g_t * xhat_t`` (weight) and ``sum_t m_t g_t``."""
    dt = _compute_dtype(xhat, g)
    g = g.to(dt)
    w = _rowsq(_masked_sum(g * xhat, mask)).double() if has_weight else None
    b = _rowsq(_masked_sum(g, mask)).double() if has_bias else None
    return w, b


# --------------------------------------------------------------------------------------------
# Hook sites
# --------------------------------------------------------------------------------------------


class _Site:
    """One hooked module: what its forward calls saw and what their outputs' gradients were."""

    def __init__(self, name: str, module: nn.Module, group: str, owner: "GhostNorms"):
        self.name = name
        self.module = module
        self.group = group
        self.owner = owner
        self.kind = (
            "linear" if isinstance(module, nn.Linear)
            else "embedding" if isinstance(module, nn.Embedding)
            else "layernorm"
        )
        self.calls: list[dict[str, Any]] = []
        self.sq: dict[str, torch.Tensor] = {}

    def param_names(self) -> dict[str, str]:
        """Local parameter name ("weight"/"bias") -> qualified name, for present params."""
        return {
            local: f"{self.name}.{local}" if self.name else local
            for local, p in self.module.named_parameters(recurse=False)
            if p is not None
        }

    def reset(self) -> None:
        self.calls = []
        self.sq = {}

    # -- forward side ---------------------------------------------------------------------

    def forward_hook(self, module, args, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        replaced = None
        if not output.requires_grad:
            # Parameters are frozen inside the context, so the backward runs through
            # activations only. A covered module whose input carries no graph (an embedding,
            # or the first modules of the lowest kept block) gets its output as a graph root:
            # the backward then stops there instead of computing gradients below it.
            output = replaced = output.detach().requires_grad_(True)
        if self.kind == "embedding":
            ids = x
            batch = self.owner._batch_size
            if batch is not None and output.shape[0] == 1 and batch > 1:
                # BERT/DistilBERT look positions up once with shape (1, T) and broadcast; the
                # gradient of a broadcast output is summed over the batch, so expand first to
                # receive one gradient per example.
                output = replaced = output.expand(batch, *output.shape[1:])
                ids = ids.expand(batch, *ids.shape[1:])
            slot = {"x": ids.detach(), "pending": 1}
        else:
            slot = self.owner._slot(x)
        idx = len(self.calls)
        self.calls.append({"slot": slot, "g": None})
        output.register_hook(lambda grad, idx=idx: self._grad_hook(idx, grad))
        return replaced

    # -- backward side --------------------------------------------------------------------

    def _grad_hook(self, idx: int, grad: torch.Tensor):
        self.owner._grads_seen += 1
        self.calls[idx]["g"] = grad.detach()
        # Every forward call precedes the backward, so once each call has its gradient the
        # activations can be reduced and freed while the backward is still running.
        if all(c["g"] is not None for c in self.calls):
            with torch.no_grad():
                self.finalize()
        return None

    def _ln_view(self, t: torch.Tensor) -> torch.Tensor:
        """(B, positions, normalized size): LayerNorm weights are shared over the positions."""
        n = math.prod(self.module.normalized_shape)
        return t.reshape(1 if t.dim() == len(self.module.normalized_shape) else t.shape[0], -1, n)

    def _zero_grad_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x.new_zeros(*x.shape[:-1], self.module.out_features)
        if self.kind == "embedding":
            return torch.zeros(*x.shape, self.module.embedding_dim, device=x.device)
        return torch.zeros_like(x)

    def finalize(self) -> None:
        if self.sq or not self.calls:
            return
        mod = self.module
        calls, self.calls = self.calls, []
        for c in calls:
            if c["g"] is None:
                # An output that never reached the loss contributes nothing.
                c["g"] = self._zero_grad_for(c["slot"]["x"])
        if self.kind == "embedding":
            ids = [c["slot"]["x"].reshape(c["g"].shape[0], -1) for c in calls]
            gs = [c["g"].reshape(c["g"].shape[0], -1, c["g"].shape[-1]) for c in calls]
            keeps = []
            for i in ids:
                keep = self.owner._keep(i.shape)
                if mod.padding_idx is not None:
                    # The padding_idx row never receives a gradient.
                    pad_ok = i != mod.padding_idx
                    keep = pad_ok if keep is None else keep & pad_ok
                keeps.append(keep if keep is not None else torch.ones_like(i, dtype=torch.bool))
            if len(calls) == 1:
                g0 = gs[0]
                w = _embedding_sq(ids[0], g0, mod.num_embeddings, keeps[0],
                                  grad_gram=lambda: self.owner._grad_gram(calls[0]["g"], g0))
            else:
                w = _embedding_sq(torch.cat(ids, 1), torch.cat(gs, 1), mod.num_embeddings, torch.cat(keeps, 1))
            self.sq["weight"] = w
            return

        dt = _compute_dtype(calls[0]["slot"]["x"], calls[0]["g"])
        if len(calls) == 1:
            slot, g = calls[0]["slot"], _as_btd(calls[0]["g"])
            x = _as_btd(slot["x"])
            mask = self.owner._float_mask(x.shape[:2], dt)
            if self.kind == "linear":
                gram = None
                T, d, p = x.shape[1], x.shape[2], g.shape[2]
                if T > 1 and _ghost_is_cheaper(T, d, p):
                    # q, k and v read the same hidden states: one Gram for the three.
                    if slot.get("gram") is None:
                        slot["gram"] = _gram(x.to(dt), mask)
                    gram = slot["gram"]
                w, b = _linear_sq(x, g, mod.bias is not None, mask, gram)
            else:
                xhat = self._ln_view(_layernorm_xhat(slot["x"], mod))
                g = self._ln_view(calls[0]["g"])
                mask = self.owner._float_mask(xhat.shape[:2], dt)
                w, b = _layernorm_sq(xhat, g, mod.weight is not None, mod.bias is not None, mask)
            self.owner._release(slot)
        else:
            # Several calls of one module share its parameters: their per-example gradients add,
            # which is one call over the concatenated positions.
            xs, gs, ms = [], [], []
            for c in calls:
                if self.kind == "layernorm":
                    x, g = self._ln_view(_layernorm_xhat(c["slot"]["x"], mod)), self._ln_view(c["g"])
                else:
                    x, g = _as_btd(c["slot"]["x"]), _as_btd(c["g"])
                m = self.owner._float_mask(x.shape[:2], dt)
                xs.append(x)
                gs.append(g)
                ms.append(m if m is not None else x.new_ones(x.shape[:2], dtype=dt))
                self.owner._release(c["slot"])
            x, g, mask = torch.cat(xs, 1), torch.cat(gs, 1), torch.cat(ms, 1)
            if self.kind == "linear":
                w, b = _linear_sq(x, g, mod.bias is not None, mask)
            else:
                w, b = _layernorm_sq(x, g, mod.weight is not None, mod.bias is not None, mask)
        if w is not None:
            self.sq["weight"] = w
        if b is not None:
            self.sq["bias"] = b


# --------------------------------------------------------------------------------------------
# GhostNorms
# --------------------------------------------------------------------------------------------

_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class GhostNorms:
    """Exact per-example gradient norms from one batched backward pass ("ghost norms").

    Inside the context, every parameter of the model is temporarily frozen (so the backward
    computes activation gradients only, and never writes ``.grad``), forward hooks record the
    inputs of the covered ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` modules, and
    tensor hooks record the gradients of their outputs. For a Linear with inputs ``a`` (B, T, d)
    and output gradients ``g`` (B, T, p) the per-example weight gradient is ``sum_t g_t a_t^T``;
    its squared norm is ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (ghost norm) or the norm of the
    materialised (d, p) product -- both exact; the ghost route is taken when it needs fewer
    operations, ``T (d + p) < d p`` (Li et al. 2022 use the memory rule ``2 T^2 < d p``; here
    the materialising route is chunked over examples so memory stays bounded), and Linears
    reading the same input (query, key, value) share one input Gram. Embeddings scatter
    gradients into the rows of the looked-up ids, so their squared norm is
    ``sum_{t,s} [id_t = id_s] (g_t . g_s)``; LayerNorm weights get ``sum_t g_t * xhat_t``.

    The loss must be the *sum* of per-example losses (``reduction="sum"``); a mean scales every
    norm by 1/B. Positions with ``attention_mask == 0`` (taken from the ``attention_mask``
    keyword of the model's forward, or :meth:`set_attention_mask`) contribute nothing, nor do
    positions holding an embedding's ``padding_idx``. :meth:`norms` describes the last forward
    and backward run inside the context, and can be called after it closes.

    A covered module whose output does not require grad (embeddings; the first modules of the
    lowest kept block) has its output replaced by a detached leaf that does: the backward then
    stops there. A model that modifies such an output in place would make autograd raise.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face sequence classifier (BERT, RoBERTa, DistilBERT, ...).
    last_n_blocks : int or None
        None covers every transformer block; N covers only the last N blocks plus everything
        between the encoder and the head ("pooler") and the head. With N set, the embeddings
        and the lower blocks are left out whatever ``include_embeddings`` says, and the backward
        stops at the input of block ``L - N``.
    include_head : bool
        Cover the classification head (:func:`find_head`).
    include_embeddings : bool
        Cover the embedding tables and the embedding LayerNorm (only when ``last_n_blocks`` is
        None).

    Attributes
    ----------
    groups : dict of str to list of str
        Group name -> qualified names of the covered parameters in it. Groups are
        ``"embeddings"``, ``"layer.<i>"`` (i = index in the block list), ``"pooler"`` (covered
        modules between the encoder and the head: BERT's pooler, RoBERTa's ``classifier.dense``,
        DistilBERT's ``pre_classifier``) and ``"head"``; only non-empty ones appear.
    covered : list of str
        Qualified names of all covered parameters (LayerNorm weights and biases included).
    left_out : dict of str to str
        Qualified name -> reason, for every model parameter that is not covered.
    blocks_name : str or None
        Qualified name of the block list (e.g. ``"bert.encoder.layer"``).

    Examples
    --------
    >>> with GhostNorms(model) as gn:                                   # doctest: +SKIP
    ...     logits = model(**batch).logits
    ...     F.cross_entropy(logits, labels, reduction="sum").backward()
    >>> gn.norms()["total"]                                             # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        last_n_blocks: int | None = None,
        include_head: bool = True,
        include_embeddings: bool = True,
    ):
        self.model = model
        self.last_n_blocks = last_n_blocks
        self.include_head = include_head
        self.include_embeddings = include_embeddings and last_n_blocks is None

        found = find_blocks(model)
        self.blocks_name = found[0] if found else None
        n_blocks = len(found[1]) if found else 0
        if last_n_blocks is not None:
            if found is None:
                raise ValueError(f"last_n_blocks={last_n_blocks} but {type(model).__name__} has no block list")
            if not 0 <= last_n_blocks <= n_blocks:
                raise ValueError(f"last_n_blocks must be in [0, {n_blocks}]; got {last_n_blocks}")
        first_block = 0 if last_n_blocks is None else n_blocks - last_n_blocks

        try:
            head = find_head(model)
        except ValueError:
            if include_head:
                raise
            head = None

        emb_prefixes = self._embedding_prefixes()
        block_prefix = f"{self.blocks_name}." if self.blocks_name else None

        def classify(name: str, module: nn.Module) -> tuple[str, str | None]:
            """(group, reason left out or None)."""
            if head is not None and module is head:
                return "head", None if include_head else "head excluded (include_head=False)"
            if block_prefix and name.startswith(block_prefix):
                i = int(name[len(block_prefix):].split(".")[0])
                if i < first_block:
                    return f"layer.{i}", f"below the last {last_n_blocks} block(s)"
                return f"layer.{i}", None
            if isinstance(module, nn.Embedding) or any(name.startswith(p) for p in emb_prefixes):
                if last_n_blocks is not None:
                    return "embeddings", f"embeddings are below the last {last_n_blocks} block(s)"
                if not include_embeddings:
                    return "embeddings", "embeddings excluded (include_embeddings=False)"
                return "embeddings", None
            return "pooler", None

        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1

        self.sites: list[_Site] = []
        self.groups: dict[str, list[str]] = {}
        self.left_out: dict[str, str] = {}
        for name, module in model.named_modules():
            direct = list(module.named_parameters(recurse=False))
            if not direct:
                continue
            group, reason = classify(name, module)
            qual = [f"{name}.{n}" if name else n for n, _ in direct]
            if reason is None and not isinstance(module, _SUPPORTED):
                reason = f"unsupported module type {type(module).__name__}"
            if reason is None and any(owners[id(p)] > 1 for _, p in direct):
                # Tied weights get gradient from several modules; one module's hooks see only
                # part of it.
                reason = "parameter shared between modules (tied weights)"
            if reason is not None:
                for q in qual:
                    self.left_out[q] = reason
                continue
            self.sites.append(_Site(name, module, group, self))
            self.groups.setdefault(group, []).extend(qual)
        self.covered = [q for names in self.groups.values() for q in names]

        self._handles: list[Any] = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._mask: torch.Tensor | None = None
        self._manual_mask: torch.Tensor | None = None
        self._batch_size: int | None = None
        self._forwards = 0
        self._active = False
        self._reset_forward()

    def _embedding_prefixes(self) -> list[str]:
        """Prefixes of the modules that hold the embedding tables (e.g. ``bert.embeddings.``)."""
        prefixes = set()
        blocks = self.blocks_name or ""
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Embedding):
                continue
            if self.blocks_name and name.startswith(self.blocks_name + "."):
                continue
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            # A parent that also holds the encoder (GPT-2's ``transformer.wte``) is not an
            # embeddings module; only the table itself counts then.
            if parent and not blocks.startswith(parent + "."):
                prefixes.add(parent + ".")
        return sorted(prefixes)

    # -- per-forward state --------------------------------------------------------------------

    def _reset_forward(self) -> None:
        for site in self.sites:
            site.reset()
        self._slots = {}
        self._mask_cache = {}
        self._grad_grams = {}
        self._grads_seen = 0

    def _slot(self, x: torch.Tensor) -> dict[str, Any]:
        """Shared record of one input tensor (holding x keeps its id from being reused)."""
        slot = self._slots.get(id(x))
        if slot is None or slot["ref"] is not x:
            slot = {"ref": x, "x": x.detach(), "pending": 0, "gram": None}
            self._slots[id(x)] = slot
        slot["pending"] += 1
        return slot

    def _grad_gram(self, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g g^T`` of an output gradient, computed once per gradient tensor object."""
        hit = self._grad_grams.get(id(grad))
        if hit is None or hit[0] is not grad:
            g = g.to(_compute_dtype(g))
            hit = (grad, torch.bmm(g, g.transpose(1, 2)))
            self._grad_grams[id(grad)] = hit
        return hit[1]

    def _release(self, slot: dict[str, Any]) -> None:
        slot["pending"] -= 1
        if slot["pending"] <= 0:
            # Last reader done: drop the activation and its Gram while the backward goes on.
            slot["gram"] = slot["x"] = slot["ref"] = None

    def _keep(self, shape) -> torch.Tensor | None:
        """(B, T) bool positions that count, when ``shape`` is the padded token grid."""
        m = self._mask
        if m is None or tuple(shape) != tuple(m.shape):
            return None
        return m != 0

    def _float_mask(self, shape, dtype) -> torch.Tensor | None:
        keep = self._keep(shape)
        if keep is None:
            return None
        key = (dtype, tuple(shape))
        if key not in self._mask_cache:
            self._mask_cache[key] = keep.to(dtype)
        return self._mask_cache[key]

    # -- context ----------------------------------------------------------------------------

    def __enter__(self) -> "GhostNorms":
        if self._active:
            raise RuntimeError("GhostNorms is not re-entrant")
        self._active = True
        self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(False)
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._reset_forward()
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(site.forward_hook))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and restore ``requires_grad``; idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad = []
        self._active = False
        self._slots = {}

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Set the (B, T) padding mask by hand, for models called without an
        ``attention_mask`` keyword; a keyword mask given to the forward takes precedence."""
        self._manual_mask = None if attention_mask is None else attention_mask.detach()

    def _model_pre_hook(self, module, args, kwargs):
        # A new top-level forward starts a new batch.
        self._reset_forward()
        self._forwards += 1
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = self._manual_mask
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        batch = None
        for key in ("input_ids", "inputs_embeds"):
            t = kwargs.get(key)
            if isinstance(t, torch.Tensor):
                batch = t.shape[0]
                break
        if batch is None and args and isinstance(args[0], torch.Tensor):
            batch = args[0].shape[0]
        if batch is None and self._mask is not None:
            batch = self._mask.shape[0]
        self._batch_size = batch
        return None

    # -- results ----------------------------------------------------------------------------

    def _squares(self) -> dict[str, torch.Tensor]:
        """Qualified parameter name -> per-example squared gradient norm (B,) float64."""
        if self._forwards == 0:
            raise RuntimeError("no forward pass was recorded inside the GhostNorms context")
        if self._grads_seen == 0 and any(site.calls for site in self.sites):
            raise RuntimeError(
                "no gradient reached the hooked modules: call backward() on the summed loss "
                "inside the GhostNorms context (with grad enabled) before norms()"
            )
        out: dict[str, torch.Tensor] = {}
        batch = self._batch_size
        for site in self.sites:
            with torch.no_grad():
                site.finalize()
        self._slots, self._grad_grams = {}, {}
        for site in self.sites:
            for local, qual in site.param_names().items():
                sq = site.sq.get(local)
                if sq is None:
                    # Module not reached by this forward/backward: zero gradient.
                    if batch is None:
                        continue
                    sq = torch.zeros(batch, dtype=torch.float64)
                out[qual] = sq.cpu()
                batch = sq.shape[0]
        return out

    def param_norms(self) -> dict[str, np.ndarray]:
        """Per-example gradient norm of each covered parameter.

        Returns
        -------
        dict of str to numpy.ndarray
            Qualified parameter name -> (B,) float64.
        """
        return {k: v.sqrt().numpy() for k, v in self._squares().items()}

    def norms(self) -> dict[str, np.ndarray]:
        """Per-example gradient norms, grouped.

        Returns
        -------
        dict of str to numpy.ndarray
            (B,) float64 arrays for each covered group (``"embeddings"``, ``"layer.<i>"``,
            ``"pooler"``, ``"head"``), plus ``"encoder"`` (all covered blocks together, when any
            are covered) and ``"total"`` (all covered parameters). See :attr:`covered` and
            :attr:`left_out` for exactly which parameters count.
        """
        sq = self._squares()
        n = next(iter(sq.values())).shape[0] if sq else (self._batch_size or 0)
        grouped: dict[str, torch.Tensor] = OrderedDict()

        def order(g: str) -> tuple[int, int]:
            if g == "embeddings":
                return (0, 0)
            if g.startswith("layer."):
                return (1, int(g.split(".")[1]))
            return (2, 0) if g == "pooler" else (3, 0)

        for group in sorted(self.groups, key=order):
            grouped[group] = sum((sq[q] for q in self.groups[group] if q in sq),
                                 torch.zeros(n, dtype=torch.float64))
        layers = [v for k, v in grouped.items() if k.startswith("layer.")]
        if layers:
            grouped["encoder"] = sum(layers, torch.zeros(n, dtype=torch.float64))
        grouped["total"] = sum((v for k, v in grouped.items() if k != "encoder"),
                               torch.zeros(n, dtype=torch.float64))
        return {k: v.sqrt().numpy() for k, v in grouped.items()}


# --------------------------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------------------------


def per_example_grad_norms(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    last_n_blocks: int | None = None,
    include_embeddings: bool = True,
    include_head: bool = True,
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """One forward and one backward pass -> exact per-example gradient norms.

    The model runs in eval mode (no dropout, so the norms are deterministic); its training
    mode, ``requires_grad`` flags and ``.grad`` fields are left as they were (the backward
    flows through activations only and never writes ``.grad``).

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face sequence classifier.
    batch : dict of str to torch.Tensor
        Model inputs (``input_ids``, ``attention_mask``, optionally ``token_type_ids``); moved to
        the model's device and passed as keyword arguments so the padding mask is seen.
    labels : torch.Tensor of int, shape (B,)
        Gold labels.
    last_n_blocks, include_embeddings, include_head
        See :class:`GhostNorms`.

    Returns
    -------
    norms : dict of str to numpy.ndarray
        :meth:`GhostNorms.norms`.
    logits : torch.Tensor, shape (B, C)
        Detached logits of the same forward pass.
    """
    was_training = model.training
    model.eval()
    try:
        # inference_mode(False): callers may sit inside an inference_mode block.
        with torch.inference_mode(False), torch.enable_grad(), GhostNorms(
            model,
            last_n_blocks=last_n_blocks,
            include_embeddings=include_embeddings,
            include_head=include_head,
        ) as gn:
            device = model_device(model)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum")
            if loss.requires_grad:
                loss.backward()
        norms = gn.norms()
    finally:
        model.train(was_training)
    return norms, logits.detach()
