"""Per-example gradient norms checked against plain autograd, one backward per example."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

try:
    import collapse_detect.gradnorm  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_detect import gradnorm  # noqa: E402
from collapse_detect.gradnorm import (  # noqa: E402
    GhostNorms,
    _embedding_sq,
    _ghost_is_cheaper,
    _gram,
    _layernorm_sq,
    _layernorm_xhat,
    _linear_sq,
    _rowdot,
    find_blocks,
    find_head,
    head_grad_norms,
    per_example_grad_norms,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

RTOL = 1e-4
VOCAB = 99


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: thread start-up and barriers cost more than they save on shared CPUs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_roberta(seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=3, max_position_embeddings=66,
                        pad_token_id=1, type_vocab_size=1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_distilbert(seed=0):
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=3,
                           max_position_embeddings=64)
    return DistilBertForSequenceClassification(cfg).eval()


def make_batch(lengths, *, pad_id=0, pair=False, seed=0, pad_fill=None):
    """Right-padded batch; ``pad_fill`` puts junk ids at padded positions instead of pad_id."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if pad_fill is None:
            ids[i, n:] = pad_id
    # Repeated ids inside a row exercise the per-row sum of the embedding gradient.
    ids[0, 1:4] = 7
    # A pad id on a real position: its (padding_idx) table row gets no gradient.
    if len(lengths) > 1 and lengths[1] > 2:
        ids[1, 1] = pad_id
    batch = {"input_ids": ids, "attention_mask": mask}
    if pair:
        tt = torch.zeros(B, T, dtype=torch.long)
        for i, n in enumerate(lengths):
            tt[i, n // 2:n] = 1
        batch["token_type_ids"] = tt
    labels = torch.randint(0, 3, (B,), generator=g)
    return batch, labels


def autograd_squares(model, batch, labels):
    """Per-parameter squared grad norms, one unpadded forward/backward per example."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    out = {n: np.zeros(len(labels)) for n in params}
    try:
        for i in range(len(labels)):
            n_tok = int(batch["attention_mask"][i].sum())
            row = {k: v[i:i + 1, :n_tok] for k, v in batch.items()}
            logits = model(**row).logits
            loss = F.cross_entropy(logits, labels[i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    out[n][i] = g.double().square().sum().item()
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    return out


def assert_close(got, want, rtol=RTOL, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    assert np.all(want > 0), f"{what}: reference norm is zero, test is vacuous"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=what)


def check_against_autograd(model, batch, labels, rtol=RTOL, **kw):
    ref = autograd_squares(model, batch, labels)
    with torch.enable_grad(), GhostNorms(model, **kw) as gn:
        logits = model(**batch).logits
        F.cross_entropy(logits, labels, reduction="sum").backward()
    per_param = gn.param_norms()
    assert set(per_param) == set(gn.covered)
    total = np.sqrt(sum(ref[n] for n in gn.covered))
    for name, val in per_param.items():
        # Some gradients are zero up to rounding (BERT's key bias: softmax ignores a shift of
        # all scores), so per-parameter checks get an absolute floor far below the total.
        np.testing.assert_allclose(val, np.sqrt(ref[name]), rtol=rtol, atol=rtol * 1e-3 * total.min(),
                                   err_msg=name)
    norms = gn.norms()
    for group, names in gn.groups.items():
        assert_close(norms[group], np.sqrt(sum(ref[n] for n in names)), rtol, group)
    assert_close(norms["total"], np.sqrt(sum(ref[n] for n in gn.covered)), rtol, "total")
    layer_names = [n for g, names in gn.groups.items() if g.startswith("layer.") for n in names]
    if layer_names:
        assert_close(norms["encoder"], np.sqrt(sum(ref[n] for n in layer_names)), rtol, "encoder")
    return gn, norms, ref


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------


def test_find_head_and_blocks():
    bert, roberta, distil = tiny_bert(), tiny_roberta(), tiny_distilbert()
    assert find_head(bert) is bert.classifier
    assert find_head(roberta) is roberta.classifier.out_proj
    assert find_head(distil) is distil.classifier
    assert find_blocks(bert)[0] == "bert.encoder.layer"
    assert find_blocks(roberta)[0] == "roberta.encoder.layer"
    assert find_blocks(distil)[0] == "distilbert.transformer.layer"

    toy = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="num_labels is missing"):
        find_head(toy)
    toy.config = SimpleNamespace(num_labels=5)
    with pytest.raises(ValueError, match="out_features == config.num_labels"):
        find_head(toy)


def test_groups_cover_every_bert_parameter():
    model = tiny_bert()
    gn = GhostNorms(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(gn.covered) == names and gn.left_out == {}
    assert set(gn.groups) == {"embeddings", "layer.0", "layer.1", "pooler", "head"}
    assert gn.groups["head"] == ["classifier.weight", "classifier.bias"]
    assert gn.groups["pooler"] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert "bert.embeddings.LayerNorm.weight" in gn.groups["embeddings"]
    assert "bert.encoder.layer.1.output.LayerNorm.bias" in gn.groups["layer.1"]
    assert all(n.startswith("bert.encoder.layer.0.") for n in gn.groups["layer.0"])


def test_last_n_blocks_validation():
    with pytest.raises(ValueError, match=r"last_n_blocks must be in \[0, 2\]"):
        GhostNorms(tiny_bert(), last_n_blocks=3)


# ---------------------------------------------------------------------------------------------
# Head closed form
# ---------------------------------------------------------------------------------------------


def test_head_closed_form_hand_example():
    out = head_grad_norms(np.array([[3.0, 4.0]]), np.array([[0.5, 0.5]]), np.array([0]))
    np.testing.assert_allclose(out["head_bias"], [np.sqrt(0.5)])
    np.testing.assert_allclose(out["head_weight"], [5 * np.sqrt(0.5)])
    np.testing.assert_allclose(out["head"], [np.sqrt(0.5 + 25 * 0.5)])
    assert out["head"].dtype == np.float64
    with pytest.raises(ValueError, match="labels must lie"):
        head_grad_norms(np.ones((1, 2)), np.array([[0.5, 0.5]]), np.array([2]))


def test_head_closed_form_matches_autograd():
    model = tiny_bert()
    batch, labels = make_batch([12, 5, 9, 3, 12])
    head = find_head(model)
    captured = []
    handle = head.register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    with torch.inference_mode():
        logits = model(**batch).logits
    handle.remove()
    got = head_grad_norms(captured[0], logits.softmax(-1), labels)
    ref = autograd_squares(model, batch, labels)
    assert_close(got["head_weight"], np.sqrt(ref["classifier.weight"]), what="weight")
    assert_close(got["head_bias"], np.sqrt(ref["classifier.bias"]), what="bias")
    assert_close(got["head"], np.sqrt(ref["classifier.weight"] + ref["classifier.bias"]), what="head")


# ---------------------------------------------------------------------------------------------
# Ghost norms against autograd
# ---------------------------------------------------------------------------------------------


def test_bert_all_groups_with_padding():
    model = tiny_bert()
    # 30 > sqrt(32*32/2): the long rows take the materialising route, the short ones the ghost one.
    batch, labels = make_batch([30, 7, 3, 18, 11, 1 + 1])
    _, norms, _ = check_against_autograd(model, batch, labels)
    assert set(norms) == {"embeddings", "layer.0", "layer.1", "pooler", "head", "encoder", "total"}
    assert all(v.shape == (6,) and v.dtype == np.float64 for v in norms.values())


def test_bert_short_batch_ghost_route():
    # Every T here satisfies 2 T^2 < d p for all Linears: pure ghost route.
    batch, labels = make_batch([9, 4, 6], seed=3)
    check_against_autograd(tiny_bert(seed=3), batch, labels)


def test_bert_sentence_pairs():
    batch, labels = make_batch([14, 8, 10, 5], pair=True, seed=1)
    assert batch["token_type_ids"].sum() > 0
    gn, norms, ref = check_against_autograd(tiny_bert(seed=1), batch, labels)
    # Both token-type rows were used, so the token-type table has a real gradient.
    assert np.all(ref["bert.embeddings.token_type_embeddings.weight"] > 0)


def test_junk_ids_under_padding_change_nothing():
    model = tiny_bert()
    lengths = [10, 4, 7]
    batch, labels = make_batch(lengths, seed=2)
    junk, _ = make_batch(lengths, seed=2, pad_fill="junk")
    assert not torch.equal(batch["input_ids"], junk["input_ids"])
    clean, _ = per_example_grad_norms(model, batch, labels)
    dirty, _ = per_example_grad_norms(model, junk, labels)
    for k in clean:
        np.testing.assert_allclose(dirty[k], clean[k], rtol=RTOL, err_msg=k)


def test_positional_call_with_manual_mask():
    model = tiny_bert(seed=13)
    batch, labels = make_batch([11, 4, 8], seed=13)
    want, _ = per_example_grad_norms(model, batch, labels)
    with torch.enable_grad(), GhostNorms(model) as gn:
        gn.set_attention_mask(batch["attention_mask"])
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        F.cross_entropy(logits, labels, reduction="sum").backward()
    assert gn._mask is not None and gn._batch_size == 3
    got = gn.norms()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)


def test_bert_last_block_only():
    model = tiny_bert()
    batch, labels = make_batch([13, 6, 9, 2], seed=4)
    gn, norms, _ = check_against_autograd(model, batch, labels, last_n_blocks=1)
    reached = []
    h = model.bert.encoder.layer[0].register_forward_hook(lambda m, a, o: reached.append(
        (o[0] if isinstance(o, tuple) else o).requires_grad))
    again, _ = per_example_grad_norms(model, batch, labels, last_n_blocks=1)
    h.remove()
    # The lower block ran without building a graph: the backward stopped at block 1.
    assert reached == [False]
    np.testing.assert_allclose(again["total"], norms["total"], rtol=1e-6)
    assert set(gn.groups) == {"layer.1", "pooler", "head"}
    assert set(norms) == {"layer.1", "pooler", "head", "encoder", "total"}
    np.testing.assert_allclose(norms["encoder"], norms["layer.1"])
    assert "below the last 1 block" in gn.left_out["bert.encoder.layer.0.attention.self.query.weight"]
    assert "embeddings" in gn.left_out["bert.embeddings.word_embeddings.weight"]
    assert set(gn.covered) | set(gn.left_out) == {n for n, _ in model.named_parameters()}


def test_head_and_pooler_only():
    model = tiny_bert(seed=12)
    batch, labels = make_batch([9, 5, 2], seed=12)
    gn, norms, _ = check_against_autograd(model, batch, labels, last_n_blocks=0)
    assert set(norms) == {"pooler", "head", "total"}


def test_norms_need_a_backward():
    model = tiny_bert()
    batch, _ = make_batch([5, 3])
    with torch.enable_grad(), GhostNorms(model) as gn:
        model(**batch)
    with pytest.raises(RuntimeError, match="no gradient reached"):
        gn.norms()
    with pytest.raises(RuntimeError, match="no forward pass"):
        GhostNorms(model).norms()


def test_bert_without_embeddings_and_head():
    model = tiny_bert()
    batch, labels = make_batch([8, 3, 5], seed=5)
    gn, norms, ref = check_against_autograd(model, batch, labels, include_embeddings=False, include_head=False)
    assert "embeddings" not in norms and "head" not in norms
    assert gn.left_out["bert.embeddings.position_embeddings.weight"].startswith("embeddings excluded")
    assert gn.left_out["classifier.weight"].startswith("head excluded")


def test_float64_is_exact():
    model = tiny_bert(dtype=torch.float64, seed=6)
    batch, labels = make_batch([25, 3, 16], pair=True, seed=6)
    check_against_autograd(model, batch, labels, rtol=1e-10)


def test_roberta():
    model = tiny_roberta()
    batch, labels = make_batch([12, 5, 9], pad_id=1, seed=7)
    gn, norms, ref = check_against_autograd(model, batch, labels)
    assert gn.groups["head"] == ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    assert gn.groups["pooler"] == ["classifier.dense.weight", "classifier.dense.bias"]


def test_distilbert():
    model = tiny_distilbert()
    batch, labels = make_batch([11, 4, 8, 2], seed=8)
    gn, norms, _ = check_against_autograd(model, batch, labels)
    assert gn.groups["pooler"] == ["pre_classifier.weight", "pre_classifier.bias"]
    assert gn.left_out == {}


class _TwiceToy(nn.Module):
    """One Linear applied twice: the per-example gradients of both calls must add up."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_labels=3)
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        h = torch.tanh(self.lin(h))
        h = self.norm(torch.tanh(self.lin(h)))
        pooled = (h * attention_mask.unsqueeze(-1)).sum(1)
        return SimpleNamespace(logits=self.head(pooled))


def test_module_called_twice_and_long_sequences():
    torch.manual_seed(9)
    model = _TwiceToy().eval()
    g = torch.Generator().manual_seed(9)
    # T = 2 * 20 positions per Linear after concatenation, d p = 16: materialising route; few
    # distinct ids: heavy repetition in the embedding scatter.
    ids = torch.randint(0, 6, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    labels = torch.tensor([0, 2, 1])
    check_against_autograd(model, {"input_ids": ids, "attention_mask": mask}, labels)


# ---------------------------------------------------------------------------------------------
# Side effects
# ---------------------------------------------------------------------------------------------


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_no_side_effects():
    model = tiny_bert()
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch, labels = make_batch([9, 4, 6], seed=10)
    norms, logits = per_example_grad_norms(model, batch, labels)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.training
    assert _hook_count(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not logits.requires_grad and logits.shape == (3, 3)
    # The frozen table is still covered: coverage does not depend on requires_grad.
    assert np.all(norms["embeddings"] > 0)
    with torch.no_grad():
        model.eval()
        np.testing.assert_allclose(logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_hooks_removed_after_exception():
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="boom"):
        with GhostNorms(model):
            assert _hook_count(model) > 0
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_logits_and_head_agree_with_closed_form():
    model = tiny_bert(seed=11)
    batch, labels = make_batch([10, 3, 7, 7], seed=11)
    norms, logits = per_example_grad_norms(model, batch, labels)
    captured = []
    h = find_head(model).register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    with torch.inference_mode():
        model(**batch)
    h.remove()
    closed = head_grad_norms(captured[0], logits.softmax(-1), labels)
    assert_close(norms["head"], closed["head"])


# ---------------------------------------------------------------------------------------------
# Kernels against brute force
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 12), d=st.integers(1, 6), p=st.integers(1, 6),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_linear_kernel_matches_brute_force(B, T, d, p, seed, masked):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    go = torch.randn(B, T, p, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.7).double() if masked else None
    gm = go if mask is None else go * mask.unsqueeze(-1)
    want_w = torch.einsum("btd,btp->bdp", a, gm).square().sum((1, 2))
    want_b = gm.sum(1).square().sum(1)
    # The shapes drawn here take either route.
    w, b = _linear_sq(a, go, True, mask)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(b, want_b)
    if T > 1:
        # A supplied Gram forces the ghost route (when it is the cheaper one anyway, a no-op).
        ghost = _rowdot(_gram(a, mask), torch.bmm(go, go.transpose(1, 2)))
        torch.testing.assert_close(ghost, want_w)


def test_linear_kernel_both_routes_agree():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 40, 3, generator=g, dtype=torch.float64)
    go = torch.randn(2, 40, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.float64)
    mask[1, 25:] = 0
    assert not _ghost_is_cheaper(40, 3, 5)
    materialised, _ = _linear_sq(a, go, False, mask)
    ghost = _rowdot(_gram(a, mask), torch.bmm(go, go.transpose(1, 2)))
    torch.testing.assert_close(ghost, materialised)
    want = torch.einsum("btd,btp->bdp", a, go * mask.unsqueeze(-1)).square().sum((1, 2))
    torch.testing.assert_close(materialised, want)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 12), V=st.integers(1, 30), seed=st.integers(0, 2**16),
       masked=st.booleans())
def test_embedding_kernel_matches_brute_force(B, T, V, seed, masked):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    go = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    keep = torch.rand(B, T, generator=g) < 0.7 if masked else None
    gm = go if keep is None else go * keep.unsqueeze(-1)
    dense = torch.zeros(B, V, 3, dtype=torch.float64)
    dense.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, 3), gm)
    want = dense.square().sum((1, 2))
    torch.testing.assert_close(_embedding_sq(ids, go, V, keep), want)


def test_embedding_kernel_long_rows_route(monkeypatch):
    # Rows longer than the Gram limit go through sort + index_add; both must agree.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (3, 50), generator=g)
    go = torch.randn(3, 50, 4, generator=g, dtype=torch.float64)
    keep = torch.rand(3, 50, generator=g) < 0.8
    via_gram = _embedding_sq(ids, go, 7, keep)
    monkeypatch.setattr(gradnorm, "_EMBEDDING_GRAM_MAX_T", 10)
    torch.testing.assert_close(_embedding_sq(ids, go, 7, keep), via_gram)
    dense = torch.zeros(3, 7, 4, dtype=torch.float64)
    dense.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, 4), go * keep.unsqueeze(-1))
    torch.testing.assert_close(via_gram, dense.square().sum((1, 2)))


def test_embedding_kernel_distinct_ids_respect_keep():
    # Position ids never repeat within a row: the cheap disjoint-rows route must still drop
    # the positions that are not kept.
    g = torch.Generator().manual_seed(2)
    ids = torch.arange(6).expand(2, 6)
    go = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    want = (go.square().sum(-1) * keep).sum(1)
    torch.testing.assert_close(_embedding_sq(ids, go, 6, keep), want)
    assert want[0] < go[0].square().sum()


def test_layernorm_kernel_matches_autograd_with_mask():
    torch.manual_seed(3)
    ln = nn.LayerNorm(5, eps=1e-5).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    go = torch.randn(3, 7, 5, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[2, 1] = 0
    want_w, want_b = [], []
    for i in range(3):
        ln.zero_grad()
        (ln(x[i]) * go[i] * mask[i].unsqueeze(-1)).sum().backward()
        want_w.append(ln.weight.grad.square().sum())
        want_b.append(ln.bias.grad.square().sum())
    w, b = _layernorm_sq(_layernorm_xhat(x, ln), go, True, True, mask)
    torch.testing.assert_close(w, torch.stack(want_w))
    torch.testing.assert_close(b, torch.stack(want_b))


def test_callable_inside_inference_mode():
    model = tiny_bert(seed=14)
    batch, labels = make_batch([7, 3], seed=14)
    want, _ = per_example_grad_norms(model, batch, labels)
    with torch.inference_mode():
        got, _ = per_example_grad_norms(model, batch, labels)
    np.testing.assert_allclose(got["total"], want["total"], rtol=1e-6)
    assert np.all(want["total"] > 0)
