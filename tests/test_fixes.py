"""Fix snippets shown to users run on the installed transformers: executed here on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collapse_detect import fixes


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels):
        self.enc = tokenizer(list(texts), truncation=True, max_length=32)
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def test_weighted_trainer_snippet_trains_with_the_class_weights(tiny_trained, tmp_path, monkeypatch):
    import copy

    from transformers import DataCollatorWithPadding

    monkeypatch.chdir(tmp_path)
    model = copy.deepcopy(tiny_trained["model"])
    tok = tiny_trained["tokenizer"]
    df = tiny_trained["eval_df"]
    label2id = {"sports": 0, "politics": 1, "business": 2}
    labels = df["label"].map(label2id).tolist()
    weights = fixes.class_weights(np.bincount(labels))
    code = fixes.weighted_trainer_code(["sports", "politics", "business"], weights, epochs=2, patience=1)
    # the snippet expects model, train_dataset and eval_dataset; a collator pads the tokenized rows
    code = code.replace("compute_metrics=compute_metrics,",
                        "compute_metrics=compute_metrics, data_collator=DataCollatorWithPadding(tokenizer),")
    seen = {}
    original = torch.nn.functional.cross_entropy

    def spy(logits, labels, weight=None, **kw):
        seen["weight"] = None if weight is None else weight.tolist()
        return original(logits, labels, weight=weight, **kw)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    namespace = {"model": model, "train_dataset": _Rows(tok, df["text"][:64], labels[:64]),
                 "eval_dataset": _Rows(tok, df["text"][64:96], labels[64:96]),
                 "DataCollatorWithPadding": DataCollatorWithPadding, "tokenizer": tok}
    exec(compile(code, "weighted_trainer_snippet", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step >= 1
    assert seen["weight"] == pytest.approx([float(f"{w:.4g}") for w in weights], rel=1e-6)
    assert trainer.args.eval_strategy == "epoch" and trainer.args.load_best_model_at_end
    assert any("eval_macro_f1" in h for h in trainer.state.log_history)


def _drawn_shares(code: str, labels: list[int], k: int) -> torch.Tensor:
    """Run the resampling snippet over a dataset of ``labels`` and return each class's share of 20 epochs of
    draws (seeded)."""
    ns = {"train_labels": labels, "train_dataset": torch.utils.data.TensorDataset(torch.tensor(labels))}
    torch.manual_seed(0)
    exec(compile(code, "resampling_snippet", "exec"), ns)
    drawn = torch.cat([torch.cat([b[0] for b in ns["loader"]]) for _ in range(20)])
    return torch.bincount(drawn, minlength=k).float() / len(drawn)


def test_resampling_snippet_draws_balanced_batches():
    code = fixes.resampling_code(fixes.class_weights([90, 5, 5]))
    share = _drawn_shares(code, [0] * 90 + [1] * 5 + [2] * 5, k=3)
    assert share.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.05)


def test_logit_adjustment_snippet_shifts_the_bias(tiny_trained, tmp_path, monkeypatch):
    import copy

    monkeypatch.chdir(tmp_path)
    model = copy.deepcopy(tiny_trained["model"])
    before = model.classifier.bias.detach().clone()
    code = fixes.logit_adjustment_code(["sports", "politics", "business"], [-20.0, 10.0, 10.0], "bias_tuning")
    assert "per-class biases tuned for balanced accuracy, no retraining" in code
    exec(compile(code, "logit_adjustment_snippet", "exec"), {"model": model, "tokenizer": tiny_trained["tokenizer"]})
    assert (model.classifier.bias.detach() - before).tolist() == pytest.approx([-20.0, 10.0, 10.0])
    assert (tmp_path / "model-logit-adjusted" / "model.safetensors").exists()
    # the folder it writes is one collapse-detect reads, and the offsets move its predictions away from sports
    from collapse_detect.cli import main

    shares = []
    for name, folder in (("before", tiny_trained["dir"]), ("after", tmp_path / "model-logit-adjusted")):
        assert main([str(folder), str(tiny_trained["eval"]), "--out", str(tmp_path / name), "--quiet"]) in (0, 1)
        stats = json.loads((tmp_path / name / "summary.json").read_text())["stats"]
        assert stats["class_names"] == ["sports", "politics", "business"]
        shares.append([c["prediction_share"] for c in stats["per_class"]])
    assert shares[1][0] < shares[0][0] and shares[1][1] + shares[1][2] > shares[0][1] + shares[0][2]


def test_class_weights_agree_with_sklearn_balanced_when_every_class_is_present():
    from sklearn.utils.class_weight import compute_class_weight

    counts = [90, 7, 3]
    y = np.repeat(np.arange(3), counts)
    assert fixes.class_weights(counts) == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=y))


def _stats(names, supports):
    return {"class_names": names, "per_class": [{"class": n, "support": s} for n, s in zip(names, supports)]}


def test_a_class_with_no_rows_gets_a_stand_in_weight_and_the_fix_says_so():
    """k is the model's class count; a class with no rows gets the largest weight of the counted classes, never 0."""
    w = fixes.class_weights([180, 60, 0])
    assert w == pytest.approx([240 / (3 * 180), 240 / (3 * 60), 240 / (3 * 60)])
    assert fixes.class_weights([90, 0, 5, 0]) == pytest.approx([95 / 360, 95 / 20, 95 / 20, 95 / 20])
    assert fixes.class_weights([0, 0, 0]).tolist() == [1.0, 1.0, 1.0]

    fix = fixes.imbalance_fix(_stats(["sports", "politics", "business"], [180, 60, 0]))
    assert fix.values["class_weights"] == pytest.approx({"sports": 4 / 9, "politics": 4 / 3, "business": 4 / 3})
    assert fix.values["stand_in_weights"] == ["business"]
    assert "CLASS_WEIGHTS = [0.4444, 1.333, 1.333]" in fix.code
    assert "# No rows to count of 'business': a stand-in weight" in fix.code
    compile(fix.code, "weighted_trainer_snippet", "exec")
    note = next(s for s in fix.steps if s.startswith("No rows of business"))
    assert "in the eval set" in note and "stand-in" in note and "--train-file" in note
    assert "k = 3 classes" in fix.steps[0]

    two = fixes.imbalance_fix(_stats(["a", "b", "c"], [10, 0, 0]))
    assert two.values["stand_in_weights"] == ["b", "c"]
    assert any(s.startswith("No rows of b, c in the eval set") and "stand-ins" in s for s in two.steps)

    trained = fixes.imbalance_fix(_stats(["a", "b", "c"], [10, 5, 5]), train_counts=[50, 50, 0])
    assert trained.values["class_weights"] == pytest.approx({"a": 100 / 150, "b": 100 / 150, "c": 100 / 150})
    assert any(s.startswith("No rows of c in the training labels") for s in trained.steps)

    full = fixes.imbalance_fix(_stats(["a", "b", "c"], [10, 5, 5]))
    assert full.values["stand_in_weights"] == [] and not any(s.startswith("No rows") for s in full.steps)
    assert "# No rows to count" not in full.code


def test_resampling_snippet_shows_the_loss_weights_and_samples_a_class_the_counts_lacked():
    """The eval counts lack class 2; the sampler still draws its training rows, and a class with no training
    rows (3) is simply never drawn."""
    weights = fixes.class_weights([60, 20, 0, 0])
    code = fixes.resampling_code(weights)
    listed = fixes.weighted_trainer_code(["a", "b", "c", "d"], weights).split("CLASS_WEIGHTS = [")[1].split("]")[0]
    assert f"CLASS_WEIGHTS = torch.tensor([{listed}])" in code
    share = _drawn_shares(code, [0] * 60 + [1] * 20 + [2] * 20, k=4)
    assert share[2] > 0.3 and share[3] == 0
