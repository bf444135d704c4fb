"""Fix snippets shown to users run on the installed transformers: executed here on a tiny model."""

from __future__ import annotations

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


def test_resampling_snippet_draws_balanced_batches():
    code = fixes.resampling_code(fixes.class_weights([90, 5, 5]))
    labels = [0] * 90 + [1] * 5 + [2] * 5
    data = torch.utils.data.TensorDataset(torch.tensor(labels))
    ns = {"train_labels": labels, "train_dataset": data}
    torch.manual_seed(0)
    exec(compile(code, "resampling_snippet", "exec"), ns)
    drawn = torch.cat([torch.cat([b[0] for b in ns["loader"]]) for _ in range(20)])
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert share.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.05)


def test_logit_adjustment_snippet_shifts_the_bias(tiny_trained, tmp_path, monkeypatch):
    import copy

    monkeypatch.chdir(tmp_path)
    model = copy.deepcopy(tiny_trained["model"])
    before = model.classifier.bias.detach().clone()
    code = fixes.logit_adjustment_code(["sports", "politics", "business"], [-1.5, 0.75, 0.75])
    exec(compile(code, "logit_adjustment_snippet", "exec"), {"model": model})
    assert (model.classifier.bias.detach() - before).tolist() == pytest.approx([-1.5, 0.75, 0.75])
    assert (tmp_path / "model-logit-adjusted" / "model.safetensors").exists()
