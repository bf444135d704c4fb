"""Branches of the model-evidence checks that no other test reaches: each test builds the input that takes one
branch, asserts the finding (check id, severity, the numbers in its summary, computed here), and that the input
next to it, on the healthy side, gets no finding."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from collapse_detect import analysis, model_evidence
from collapse_detect.api import RunOptions, diagnose_files
from collapse_detect.checks import REGISTRY, Severity, run_checks
from collapse_detect.stats import Accumulator, compute_stats

from helpers import logits_for, stats_for

LABELS = ["sports", "politics", "business"]
OPTIMIZATION_FIX = "Retrain with a smaller learning rate and warm-up"


def _healthy(seed=0):
    rng = np.random.default_rng(seed)
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    pred = np.where(rng.random(200) < 0.9, gold, rng.integers(0, 3, 200))
    return stats_for(gold, pred, 3, names=LABELS, noise=1.0)


def _only(stats, check_id, params=None):
    """The findings of one check as run_checks runs it (the registry's defaults, overridden by ``params``)."""
    return run_checks(stats, only=[check_id], params=params)


# --------------------------------------------------------------------------------------------------------------
# 1. tokenizer_mismatch: the warn level of the unknown-token rate, and a vocabulary that does not fit the embeddings
# --------------------------------------------------------------------------------------------------------------

def _with_unknown_rate(rate, fit=None):
    s = _healthy()
    s["tokenization"] = {"max_length": 64, "model_max_length": 64, "tokens": 10_000,
                         "unknown_tokens": round(rate * 10_000), "unknown_token_rate": rate,
                         "truncated_rows": 0, "truncation_rate": 0.0}
    s["evidence"] = {"tokenizer_fit": fit or {"tokenizer_vocab": 400, "embedding_rows": 400,
                                              "vocab_mismatch": False}}
    return s


def test_tokenizer_mismatch_warns_between_its_warn_and_fail_thresholds():
    d = REGISTRY["tokenizer_mismatch"].defaults
    warn, fail = d["warn_unknown"], d["fail_unknown"]
    assert 0 < warn < fail < 1
    mid = (warn + fail) / 2
    [f] = _only(_with_unknown_rate(mid), "tokenizer_mismatch")
    assert f.check_id == "tokenizer_mismatch" and f.severity is Severity.WARN
    assert f.summary == f"Tokenization problem: {100 * mid:.1f}% of tokens are the unknown token."
    assert f.evidence["unknown_token_rate"] == mid and f.evidence["vocab_mismatch"] is False
    # the warn threshold itself warns (>=); just under it, nothing
    [f] = _only(_with_unknown_rate(warn), "tokenizer_mismatch")
    assert f.severity is Severity.WARN
    assert _only(_with_unknown_rate(warn * 0.99), "tokenizer_mismatch") == []
    # the fail threshold fails; a raised warn threshold (--set) silences the mid rate
    [f] = _only(_with_unknown_rate(fail), "tokenizer_mismatch")
    assert f.severity is Severity.FAIL
    assert _only(_with_unknown_rate(mid), "tokenizer_mismatch",
                 {"tokenizer_mismatch": {"warn_unknown": mid + 0.01}}) == []


def _tiny_tokenizer():
    import build_samples as B

    texts = B.make_headlines({"sports": 20, "politics": 20, "business": 20}, seed=7)["text"]
    return B.train_tokenizer(texts, vocab_size=200)


def test_tokenizer_fit_flags_an_embedding_matrix_far_larger_or_smaller_than_the_vocabulary():
    import build_samples as B

    tok = _tiny_tokenizer()
    vocab = len(tok)
    cases = {  # embedding rows -> mismatch: more tokens than rows, or fewer than half the rows
        vocab: False, 2 * vocab: False, 2 * vocab + 1: True, 3 * vocab: True, vocab - 1: True}
    for rows, mismatch in cases.items():
        model = B.make_tiny_bert(tok, LABELS, seed=1, vocab_size=rows)
        assert model.get_input_embeddings().weight.shape[0] == rows
        fit = model_evidence.tokenizer_fit(model, tok)
        assert fit == {"tokenizer_vocab": vocab, "embedding_rows": rows, "vocab_mismatch": mismatch}, rows
        findings = _only(_with_unknown_rate(0.0, fit), "tokenizer_mismatch")
        if not mismatch:
            assert findings == []
            continue
        [f] = findings
        assert f.check_id == "tokenizer_mismatch" and f.severity is Severity.FAIL
        # no unknown tokens: the vocabulary alone is named
        assert f.summary == f"Tokenization problem: the tokenizer has {vocab} tokens for {rows} embedding rows."
        assert f.evidence["embedding_rows"] == rows and f.evidence["tokenizer_vocab"] == vocab
    # both problems at once: a warn-level rate and the vocabulary, failed and both named
    warn = REGISTRY["tokenizer_mismatch"].defaults["warn_unknown"]
    fit = {"tokenizer_vocab": vocab, "embedding_rows": 3 * vocab, "vocab_mismatch": True}
    [f] = _only(_with_unknown_rate(warn, fit), "tokenizer_mismatch")
    assert f.severity is Severity.FAIL
    assert f.summary == (f"Tokenization problem: {100 * warn:.1f}% of tokens are the unknown token; "
                         f"the tokenizer has {vocab} tokens for {3 * vocab} embedding rows.")


def test_a_checkpoint_with_three_times_the_embedding_rows_fails_tokenizer_mismatch_end_to_end(tiny_collapsed,
                                                                                              tmp_path):
    import build_samples as B

    tok = tiny_collapsed["tokenizer"]
    rows = 3 * len(tok)
    model = B.make_tiny_bert(tok, LABELS, seed=11, vocab_size=rows)
    path = B.save_checkpoint(model, tok, tmp_path / "wide_embeddings")
    d = diagnose_files(path, tiny_collapsed["eval"], RunOptions())
    assert d.stats["evidence"]["tokenizer_fit"] == {"tokenizer_vocab": len(tok), "embedding_rows": rows,
                                                    "vocab_mismatch": True}
    [f] = [f for f in d.findings if f.check_id == "tokenizer_mismatch"]
    assert f.severity is Severity.FAIL
    assert f"the tokenizer has {len(tok)} tokens for {rows} embedding rows" in f.summary
    # the same tokenizer with its own model: the tokenizer is fine
    assert d.stats["tokenization"]["unknown_token_rate"] < REGISTRY["tokenizer_mismatch"].defaults["warn_unknown"]
    fine = diagnose_files(tiny_collapsed["dir"], tiny_collapsed["eval"], RunOptions(only=["tokenizer_mismatch"]))
    assert fine.stats["evidence"]["tokenizer_fit"]["vocab_mismatch"] is False
    assert [f for f in fine.findings if f.check_id == "tokenizer_mismatch"] == []


# --------------------------------------------------------------------------------------------------------------
# 2. untrained_head: a head still at its initialisation (zero bias, weight std at initializer_range)
# --------------------------------------------------------------------------------------------------------------

def _head_numbers(model):
    w = model.classifier.weight.detach().double().numpy()
    b = model.classifier.bias.detach().double().numpy()
    return float(w.std()), float(np.abs(b).max())


def _head_stats(model):
    s = _healthy()
    s["evidence"] = {"head": model_evidence.head_state(model, [], s["label_prior"])}
    return s


def test_a_fresh_head_from_make_tiny_bert_is_untrained(tiny_collapsed):
    import build_samples as B

    model = B.make_tiny_bert(tiny_collapsed["tokenizer"], LABELS, seed=21)  # the head is never trained
    std, bias_max = _head_numbers(model)
    init = model.config.initializer_range
    assert bias_max == 0.0 and 0.5 <= std / init <= 2.0  # what the fresh branch reads
    s = _head_stats(model)
    head = s["evidence"]["head"]
    assert head["missing_head_keys"] == []  # not the missing-weights branch
    assert head["weight_std"] == pytest.approx(std, rel=1e-6)
    assert head["weight_std_ratio"] == pytest.approx(std / init, rel=1e-6)
    [f] = _only(s, "untrained_head")
    assert f.check_id == "untrained_head" and f.severity is Severity.FAIL
    assert f.summary == (f"The classification head was never trained: its bias is zero and its weight std "
                         f"{std:.4f} is the initializer_range {init}.")

    # a non-default initializer_range: still read against the config's own range
    wide = B.make_tiny_bert(tiny_collapsed["tokenizer"], LABELS, seed=21, initializer_range=0.1)
    wstd, _ = _head_numbers(wide)
    [f] = _only(_head_stats(wide), "untrained_head")
    assert f.summary.endswith(f"its weight std {wstd:.4f} is the initializer_range 0.1.")

    # either half of the fresh test failing leaves the head alone: a bias, or weights far from the init scale
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.classifier.bias[1] = 1e-3
    assert _only(_head_stats(biased), "untrained_head") == []
    for scale in (5.0, 0.1):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.classifier.weight.mul_(scale)
        assert not 0.5 <= _head_numbers(scaled)[0] / init <= 2.0
        assert _only(_head_stats(scaled), "untrained_head") == []


def test_a_trained_head_is_not_untrained(tiny_trained):
    model = tiny_trained["model"]
    std, bias_max = _head_numbers(model)
    assert bias_max > 1e-6
    s = _head_stats(model)
    assert s["evidence"]["head"]["bias_abs_max"] == pytest.approx(bias_max, rel=1e-6)
    assert _only(s, "untrained_head") == []


def test_a_saved_fresh_head_is_named_end_to_end_without_missing_keys(tiny_collapsed, tmp_path):
    import build_samples as B

    model = B.make_tiny_bert(tiny_collapsed["tokenizer"], LABELS, seed=23)
    std, _ = _head_numbers(model)
    path = B.save_checkpoint(model, tiny_collapsed["tokenizer"], tmp_path / "fresh_head")
    d = diagnose_files(path, tiny_collapsed["eval"], RunOptions())
    [f] = [f for f in d.findings if f.check_id == "untrained_head"]
    assert f.severity is Severity.FAIL
    assert f.evidence["missing_head_keys"] == []
    assert f"its bias is zero and its weight std {std:.4f} is the initializer_range 0.02" in f.summary


# --------------------------------------------------------------------------------------------------------------
# 3. vanishing_gradients: the head's own gradient norm near zero while rows are wrong
# --------------------------------------------------------------------------------------------------------------

def _grad_stats(gold, pred, head_norms, encoder_norms=None):
    acc = Accumulator(LABELS)
    norms = {"head": np.asarray(head_norms, dtype=float)}
    if encoder_norms is not None:
        norms["ghost:encoder"] = np.asarray(encoder_norms, dtype=float)
    acc.update(np.arange(len(gold)), gold, logits_for(pred, 3, 4.0, 1.0, 0), grad_norms=norms)
    s = compute_stats(acc)
    s["model"] = {}
    return s


def test_vanishing_gradients_fires_on_a_tiny_head_norm_with_many_errors():
    rng = np.random.default_rng(3)
    gold = np.repeat([0, 1, 2], [120, 40, 40])
    pred = np.zeros(200, dtype=int)  # every row 'sports': 80 of 200 wrong
    head = rng.uniform(1e-6, 5e-5, 200)
    max_head = REGISTRY["vanishing_gradients"].defaults["max_head_norm"]
    assert head.mean() < max_head
    s = _grad_stats(gold, pred, head)
    [f] = _only(s, "vanishing_gradients")
    assert f.check_id == "vanishing_gradients" and f.severity is Severity.WARN
    assert f.summary == (f"Near-zero gradients: the head's mean gradient norm is {head.mean():.2e} while "
                         "40% of rows are wrong.")
    assert f.evidence["head"]["mean"] == pytest.approx(head.mean())
    assert f.evidence["encoder"] is None  # the encoder branch had nothing to read
    # the same norms on a model that gets every row right: small gradients are what a fitted model has
    assert _only(_grad_stats(gold, gold, head), "vanishing_gradients") == []
    # errors, but a head norm above the floor
    assert _only(_grad_stats(gold, pred, head + 2 * max_head), "vanishing_gradients") == []
    # a raised min_error_rate leaves the 40% of errors below it
    assert _only(s, "vanishing_gradients", {"vanishing_gradients": {"min_error_rate": 0.5}}) == []


# --------------------------------------------------------------------------------------------------------------
# 4. training_record: collapsing gradient norms and a NaN loss in log_history
# --------------------------------------------------------------------------------------------------------------

def _log(losses, grads=None, lr=2e-5, evaluate=True):
    history = []
    for i, loss in enumerate(losses):
        row = {"step": 10 * (i + 1), "loss": loss, "learning_rate": lr}
        if grads is not None:
            row["grad_norm"] = grads[i]
        history.append(row)
    if evaluate:
        history.append({"step": 10 * len(losses), "eval_loss": 0.5})
    # through JSON, as trainer_state.json holds it (a NaN loss is written as NaN, which json reads back)
    return json.loads(json.dumps({"log_history": history, "global_step": 10 * len(losses),
                                  "max_steps": 10 * len(losses)}))


def _record_stats(state):
    s = _healthy()
    s["evidence"] = {"training_record": analysis.training_record(state)}
    return s


def test_collapsing_gradient_norms_in_the_log_are_a_training_record_warning():
    grads = [2.0, 1.2, 0.5, 1.5e-3]  # the last is under 1e-3 of the first
    assert grads[-1] < 1e-3 * grads[0]
    rec = analysis.training_record(_log([1.1, 0.9, 0.7, 0.6], grads))
    assert rec["grad_norm_collapse"] is True
    assert (rec["first_grad_norm"], rec["last_grad_norm"]) == (2.0, 1.5e-3)
    assert rec["diverged"] is False and rec["loss_spikes"] == 0 and rec["evaluations"] == 1
    [f] = _only(_record_stats(_log([1.1, 0.9, 0.7, 0.6], grads)), "training_record")
    assert f.check_id == "training_record" and f.severity is Severity.WARN
    assert f.summary == "Training record: gradient norms collapsed toward zero."
    # an unstable run (not a missing evaluation): the optimisation fix, with the run's own rate
    assert f.fix.title == OPTIMIZATION_FIX
    assert f.fix.steps[0].startswith("The run peaked at a learning rate of 2e-05, within the usual")
    # gradients that merely shrink, or end exactly at 1e-3 of the first, are no collapse
    for last in (0.5, 2e-3):
        state = _log([1.1, 0.9, 0.7, 0.6], [2.0, 1.2, 0.5, last])
        assert analysis.training_record(state)["grad_norm_collapse"] is False
        assert _only(_record_stats(state), "training_record") == []
    # a first norm of zero cannot collapse further
    assert analysis.training_record(_log([1.0, 0.9], [0.0, 0.0]))["grad_norm_collapse"] is False


def test_a_nan_loss_in_log_history_is_a_diverged_run():
    # NaN in the middle, a finite and lowest loss at the end: only the NaN says the run diverged
    losses = [1.1, float("nan"), 0.5]
    rec = analysis.training_record(_log(losses))
    assert rec["nan_loss"] is True and rec["diverged"] is True
    assert rec["first_loss"] == 1.1 and rec["last_loss"] == 0.5 and rec["min_loss"] == 0.5
    assert rec["loss_spikes"] == 1  # the NaN row
    [f] = _only(_record_stats(_log(losses)), "training_record")
    assert f.check_id == "training_record" and f.severity is Severity.WARN
    assert f.summary == ("Training record: the loss diverged (first 1.1, last 0.5, minimum 0.5); "
                         "1 loss spike(s).")
    assert f.fix.title == OPTIMIZATION_FIX
    # NaN as the last loss: the minimum is over the finite losses only
    rec = analysis.training_record(_log([1.1, 0.8, float("nan")]))
    assert rec["nan_loss"] is True and rec["diverged"] is True and rec["min_loss"] == 0.8
    assert math.isnan(rec["last_loss"])
    # every loss NaN: no minimum, still diverged
    rec = analysis.training_record(_log([float("nan")] * 2))
    assert rec["nan_loss"] is True and rec["diverged"] is True and rec["min_loss"] is None
    # the same run with finite losses: nothing to say
    clean = analysis.training_record(_log([1.1, 0.8, 0.5]))
    assert clean["nan_loss"] is False and clean["diverged"] is False
    assert _only(_record_stats(_log([1.1, 0.8, 0.5])), "training_record") == []


def test_the_check_reads_nan_loss_even_where_the_record_does_not_say_diverged():
    s = _healthy()
    s["evidence"] = {"training_record": {"nan_loss": True, "diverged": False, "first_loss": 1.0,
                                         "last_loss": 0.4, "min_loss": 0.4, "evaluations": 2}}
    [f] = _only(s, "training_record")
    assert f.summary == "Training record: the loss diverged (first 1.0, last 0.4, minimum 0.4)."
    assert f.fix.title == OPTIMIZATION_FIX
    s["evidence"]["training_record"]["nan_loss"] = False
    assert _only(s, "training_record") == []


# --------------------------------------------------------------------------------------------------------------
# 5. generic_label_names from a real checkpoint whose id2label is LABEL_0..LABEL_2, labels given as ids
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generic_checkpoint(tiny_trained, tmp_path_factory):
    import build_samples as B

    model = copy.deepcopy(tiny_trained["model"])
    generic = [f"LABEL_{i}" for i in range(3)]
    model.config.id2label = dict(enumerate(generic))
    model.config.label2id = {n: i for i, n in enumerate(generic)}
    root = tmp_path_factory.mktemp("generic")
    path = B.save_checkpoint(model, tiny_trained["tokenizer"], root / "model")
    assert json.loads((path / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(generic)}
    eval_df = tiny_trained["eval_df"].copy()
    eval_df["label"] = eval_df["label"].map({n: i for i, n in enumerate(LABELS)})
    assert eval_df["label"].isin([0, 1, 2]).all()
    eval_path = root / "eval_ids.csv"
    eval_df.to_csv(eval_path, index=False)
    return {"dir": path, "eval": eval_path, "names": generic, "eval_df": eval_df}


def test_generic_label_names_from_a_saved_checkpoint_is_an_info_finding(generic_checkpoint):
    g = generic_checkpoint
    d = diagnose_files(g["dir"], g["eval"], RunOptions())
    assert d.stats["class_names"] == g["names"]
    support = g["eval_df"]["label"].value_counts().sort_index().tolist()
    assert [c["support"] for c in d.stats["per_class"]] == support  # ids read as ids
    [f] = [f for f in d.findings if f.check_id == "generic_label_names"]
    assert f.severity is Severity.INFO
    assert f.summary.startswith("The checkpoint names its classes LABEL_0, LABEL_1, LABEL_2: ")
    # the healthy model stays healthy: the info finding does not gate
    assert d.verdict() == "HEALTHY" and d.exit_code() == 0
    # names given on the command line replace the generic ones: no finding
    named = diagnose_files(g["dir"], g["eval"], RunOptions(label_names=LABELS))
    assert named.stats["class_names"] == LABELS
    assert [f for f in named.findings if f.check_id == "generic_label_names"] == []


def test_generic_label_names_through_the_cli(generic_checkpoint, tmp_path, monkeypatch):
    from collapse_detect.cli import main

    g = generic_checkpoint
    monkeypatch.chdir(tmp_path)  # away from any pyproject.toml with a [tool.collapse-detect] table
    code = main([str(g["dir"]), str(g["eval"]), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["verdict"] == "HEALTHY" and summary["exit_code"] == 0
    [f] = [f for f in summary["findings"] if f["check_id"] == "generic_label_names"]
    assert f["severity"] == "info"
    assert f["summary"].startswith("The checkpoint names its classes LABEL_0, LABEL_1, LABEL_2: ")
    code = main([str(g["dir"]), str(g["eval"]), "--out", str(tmp_path / "named"), "--quiet",
                 "--label-names", ",".join(LABELS)])
    assert code == 0
    named = json.loads((tmp_path / "named" / "summary.json").read_text())
    assert [f for f in named["findings"] if f["check_id"] == "generic_label_names"] == []


# --------------------------------------------------------------------------------------------------------------
# 6. representation_collapse: features a probe still separates, but that barely move across rows ("frozen")
# --------------------------------------------------------------------------------------------------------------

def _features(relative_noise, seed=0, n_per_class=40, dim=16):
    """Every row near one point (all 5.0), moved by ``relative_noise`` with a class-dependent direction, so a
    probe on standardised features separates the classes at any scale."""
    rng = np.random.default_rng(seed)
    gold = np.repeat(np.arange(3), n_per_class)
    signal = np.zeros((len(gold), dim))
    signal[np.arange(len(gold)), gold] = 1.0
    x = 5.0 + 5.0 * relative_noise * (signal + 0.1 * rng.normal(size=signal.shape))
    return x, gold


def _spread(x):
    return float(np.std(x, axis=0).mean() / np.abs(x).mean())


def _frozen_stats(x, gold):
    s = _healthy()
    s["evidence"] = {"linear_probe": analysis.linear_probe(x, gold),
                     "geometry": analysis.representation_geometry(x)}
    return s


def test_frozen_features_are_representation_collapse_even_when_a_probe_separates_them():
    min_spread = REGISTRY["representation_collapse"].defaults["min_relative_spread"]
    min_gain = REGISTRY["representation_collapse"].defaults["min_probe_gain"]
    x, gold = _features(1e-5)
    spread = _spread(x)
    assert spread < min_spread
    s = _frozen_stats(x, gold)
    probe, geo = s["evidence"]["linear_probe"], s["evidence"]["geometry"]
    assert probe["balanced_accuracy"] - probe["chance"] >= min_gain  # the probe path alone would not fire
    assert geo["relative_spread"] == pytest.approx(spread, rel=1e-9)
    [f] = _only(s, "representation_collapse")
    assert f.check_id == "representation_collapse" and f.severity is Severity.FAIL
    assert f"spread across rows {spread:.1e} of their size" in f.summary
    assert f.summary.startswith(f"A linear probe on the model's features reaches balanced accuracy "
                                f"{probe['balanced_accuracy']:.3f} (chance {1 / 3:.3f});")
    assert f.evidence["geometry"]["relative_spread"] == pytest.approx(spread, rel=1e-9)
    # the same class structure at a spread well above the floor: informative features, no finding
    x2, gold2 = _features(1e-1)
    assert _spread(x2) > min_spread
    assert _only(_frozen_stats(x2, gold2), "representation_collapse") == []
    # the floor is strict and read from the settings
    assert _only(s, "representation_collapse", {"representation_collapse": {"min_relative_spread": spread}}) == []


def test_a_head_without_a_bias_is_never_called_fresh(tiny_collapsed):
    """A bias-free head read as a zero bias made any head whose weight std sat near the initializer's scale (a
    lightly fine-tuned one) 'never trained': COLLAPSE on a model with balanced accuracy 1.0. Without a bias the
    weights alone cannot tell, so neither the check nor the root cause names it."""
    import build_samples as B

    from collapse_detect.rootcause import score_causes

    model = B.make_tiny_bert(tiny_collapsed["tokenizer"], LABELS, seed=21)
    model.classifier = torch.nn.Linear(32, 3, bias=False)
    torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    s = _head_stats(model)
    head = s["evidence"]["head"]
    assert head["has_bias"] is False and 0.5 <= head["weight_std_ratio"] <= 2.0  # the fresh test's scale
    assert _only(s, "untrained_head") == []
    cause = score_causes(s)["untrained_head"]
    assert cause["score"] == 0.0 and any("no bias" in c for c in cause["evidence_against"])
    with_bias = B.make_tiny_bert(tiny_collapsed["tokenizer"], LABELS, seed=21)
    assert _head_stats(with_bias)["evidence"]["head"]["has_bias"] is True
    assert [f.check_id for f in _only(_head_stats(with_bias), "untrained_head")] == ["untrained_head"]
