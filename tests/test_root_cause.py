"""One tiny model per cause: the stated root cause is right for each, and a healthy model gets none."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from collapse_detect.api import RunOptions, diagnose_files
from collapse_detect.checks import Severity


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _diagnose(path, eval_path, **kw):
    return diagnose_files(path, eval_path, RunOptions(**kw))


@pytest.fixture(scope="module")
def healthy(tiny_trained):
    return _diagnose(tiny_trained["dir"], tiny_trained["eval"])


def test_healthy_model_is_healthy_and_gets_no_cause(healthy):
    assert healthy.exit_code() == 0
    assert healthy.root_cause is None
    assert healthy.stats["balanced_accuracy"] >= 0.8
    assert [f for f in healthy.findings if f.severity.rank >= Severity.WARN.rank] == []


def _threshold_collapsed(tiny_trained):
    model = copy.deepcopy(tiny_trained["model"])
    with torch.no_grad():
        model.classifier.bias[0] += 12.0  # the majority class absorbs the decision; the ranking is untouched
    return _save(model, tiny_trained["tokenizer"], tiny_trained["root"] / "threshold")


def test_threshold_collapse_is_imbalance_and_the_measured_fix_restores_it(tiny_trained, tmp_path):
    path = _threshold_collapsed(tiny_trained)
    d = _diagnose(path, tiny_trained["eval"])
    assert d.exit_code() == 1
    assert d.stats["top_share"] >= 0.9
    assert d.stats["macro_roc_auc"] >= 0.9
    assert d.root_cause["cause"] == "class_imbalance"
    post = d.stats["posthoc"]
    best = post["methods"][post["best"]]
    assert best["balanced_accuracy"] >= 0.8 > post["before"]["balanced_accuracy"] + 0.3
    assert best["balanced_accuracy_ci"][0] <= best["balanced_accuracy"] <= best["balanced_accuracy_ci"][1]
    threshold = next(f for f in d.findings if f.check_id == "threshold_collapse")
    offsets = threshold.fix.values["offsets"]
    assert "macro ROC-AUC" in threshold.summary
    assert offsets["sports"] < min(offsets["politics"], offsets["business"])  # the absorbing class is pushed down


def test_write_fixed_produces_a_checkpoint_that_passes(tiny_trained, tmp_path):
    from collapse_detect.cli import main

    path = _threshold_collapsed(tiny_trained)
    fixed = tmp_path / "fixed"
    code = main([str(path), str(tiny_trained["eval"]), "--out", str(tmp_path / "out"), "--write-fixed",
                 str(fixed), "--quiet"])
    assert code == 1  # the original is still collapsed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    fixed_run = summary["metadata"]["fixed_checkpoint"]
    assert fixed_run["exit_code"] == 0 and fixed_run["verdict"] != "COLLAPSE"
    assert fixed_run["balanced_accuracy"] >= 0.8
    md = (tmp_path / "out" / "summary.md").read_text()
    method = fixed_run["method"].replace("_", " ")
    assert (f"Fixed checkpoint ({method}): {fixed}: {fixed_run['verdict']}, balanced accuracy "
            f"{fixed_run['balanced_accuracy']:.3f}, macro F1 {fixed_run['macro_f1']:.3f} on the same eval rows"
            ).replace("_", "\\_") in md
    assert main([str(fixed), str(tiny_trained["eval"]), "--out", str(tmp_path / "out2"), "--quiet"]) == 0


def test_constant_output_from_collapsed_features_is_representation_collapse(tiny_trained):
    model = copy.deepcopy(tiny_trained["model"])
    with torch.no_grad():
        # every token leaves the encoder as the same vector: the features carry nothing
        model.bert.encoder.layer[-1].output.LayerNorm.weight.zero_()
    path = _save(model, tiny_trained["tokenizer"], tiny_trained["root"] / "constant")
    d = _diagnose(path, tiny_trained["eval"])
    ids = {f.check_id for f in d.findings}
    assert {"constant_output", "representation_collapse", "input_ignored"} <= ids
    assert d.root_cause["cause"] == "representation_collapse"
    assert d.stats["evidence"]["geometry"]["anisotropy"] > 0.99


def test_diverged_training_record_names_the_learning_rate(tiny_trained):
    model = copy.deepcopy(tiny_trained["model"])
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.LayerNorm.weight.zero_()
    path = _save(model, tiny_trained["tokenizer"], tiny_trained["root"] / "diverged")
    history = [{"step": s, "loss": loss, "learning_rate": 5e-3, "grad_norm": g}
               for s, loss, g in [(10, 1.1, 3.0), (20, 0.7, 2.0), (30, 9.5, 40.0), (40, 1.09, 1e-5)]]
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 40,
                                                         "max_steps": 40}))
    d = _diagnose(path, tiny_trained["eval"])
    assert d.root_cause["cause"] == "diverged_optimization"
    assert any("peak learning rate 0.005" in e for e in d.root_cause["evidence_for"])
    record = next(f for f in d.findings if f.check_id == "training_record")
    assert "no evaluation during training" in record.summary
    assert record.fix.steps[0].startswith("The run peaked at a learning rate of 0.005, above the 1e-5 to 5e-5 "
                                          "that fine-tuning a pretrained encoder takes; retrain within that range")
    assert d.root_cause["fix"]["steps"][0] == record.fix.steps[0]


def test_untrained_head_is_named(tiny_trained):
    base = copy.deepcopy(tiny_trained["model"].bert)  # the encoder alone: loading adds a random head
    path = tiny_trained["root"] / "untrained"
    base.config.architectures = ["BertModel"]
    _save(base, tiny_trained["tokenizer"], path)
    d = _diagnose(path, tiny_trained["eval"])
    assert d.root_cause["cause"] == "untrained_head"
    assert d.root_cause["confidence"] == "high"
    head = d.stats["evidence"]["head"]
    assert "classifier.weight" in head["missing_head_keys"]


def test_permuted_id2label_is_named_with_the_mapping(tiny_trained):
    model = copy.deepcopy(tiny_trained["model"])
    names = ["politics", "business", "sports"]  # rotated against what the model learnt
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    path = _save(model, tiny_trained["tokenizer"], tiny_trained["root"] / "permuted")
    d = _diagnose(path, tiny_trained["eval"])
    assert d.root_cause["cause"] == "label_mapping_mismatch"
    finding = next(f for f in d.findings if f.check_id == "label_mapping_mismatch")
    assert "predicted 'politics' is gold 'sports'" in finding.summary
    assert d.stats["evidence"]["label_permutation"]["mapped_balanced_accuracy"] >= 0.8


def test_a_permutation_fitted_to_a_handful_of_rows_is_not_a_mapping_mismatch(tmp_path):
    # the bundled healthy model on its first 2 sports rows and first business row: it calls that business row
    # politics, so the best assignment swaps business and politics, on one gold row and none
    import pandas as pd

    root = Path(__file__).resolve().parents[1] / "samples"
    eval_df = pd.read_csv(root / "headlines_eval.csv")
    small = tmp_path / "small.csv"
    pd.concat([eval_df[eval_df.label == "sports"].head(2), eval_df[eval_df.label == "business"].head(1)]).to_csv(
        small, index=False)
    d = _diagnose(root / "models" / "healthy", small)
    perm = d.stats["evidence"]["label_permutation"]
    assert not perm["is_identity"] and perm["mapped_balanced_accuracy"] - perm["identity_balanced_accuracy"] >= 0.3
    assert not [f for f in d.findings if f.check_id == "label_mapping_mismatch"]
    scores = {c["cause"]: c["score"] for c in d.root_cause["candidates"]}
    assert scores["label_mapping_mismatch"] <= 0.1
    assert d.root_cause["cause"] != "label_mapping_mismatch"
    # with the check's threshold lowered, the check and the root cause agree again
    d = _diagnose(root / "models" / "healthy", small,
                  check_params={"label_mapping_mismatch": {"min_support": 0}})
    assert [f for f in d.findings if f.check_id == "label_mapping_mismatch"]
    assert d.root_cause["cause"] == "label_mapping_mismatch"


def test_a_cause_read_from_too_few_rows_has_low_confidence(tmp_path):
    # the bundled healthy model on 2 rows of each class: it gets 4 of 6 right, +0.33 over chance but p = 0.014,
    # so the eval set fails no_better_than_majority; whatever cause scores best rests on 6 rows
    import pandas as pd

    root = Path(__file__).resolve().parents[1] / "samples"
    eval_df = pd.read_csv(root / "headlines_eval.csv")
    small = tmp_path / "six.csv"
    pd.concat([eval_df[eval_df.label == c].head(2) for c in ("sports", "politics", "business")]).to_csv(
        small, index=False)
    d = _diagnose(root / "models" / "healthy", small)
    [f] = [f for f in d.findings if f.severity is Severity.FAIL]
    assert f.check_id == "no_better_than_majority" and f.evidence["underpowered"]
    assert d.root_cause["score"] >= 0.8  # the evidence alone would have said "high"
    assert d.root_cause["confidence"] == "low"
    p = d.stats["balanced_accuracy_test"]["p_value"]
    assert d.root_cause["evidence_against"][-1] == ("the eval set is too small to tell the model from chance: "
                                                    f"balanced accuracy is +0.33 above 1/k, but p = {p:.2g} on 6 rows")
    # a threshold the 6 rows do meet: no collapse, no cause
    d = _diagnose(root / "models" / "healthy", small, check_params={"no_better_than_majority": {"alpha": 0.05}})
    assert d.root_cause is None


def test_broken_tokenizer_is_named(tiny_trained):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    broken = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    path = _save(copy.deepcopy(tiny_trained["model"]), broken, tiny_trained["root"] / "broken_tok")
    d = _diagnose(path, tiny_trained["eval"])
    assert d.stats["tokenization"]["unknown_token_rate"] > 0.5
    assert d.root_cause["cause"] == "tokenizer_mismatch"
    finding = next(f for f in d.findings if f.check_id == "tokenizer_mismatch")
    assert finding.severity is Severity.FAIL
