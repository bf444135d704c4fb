"""Suggested fixes with computed values, and code that runs on the installed transformers.

Every snippet here is executed by the test suite on a tiny model, so what a user copies works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Fix:
    title: str
    steps: list[str] = field(default_factory=list)
    code: str | None = None
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"title": self.title, "steps": list(self.steps), "code": self.code, "values": dict(self.values)}


IMBALANCE_FIX_TITLE = "Retrain with class-weighted loss, regularization and early stopping"


def class_weights(counts) -> np.ndarray:
    """Balanced class weights n / (k * count_c) (sklearn's "balanced"), k the number of classes (``len(counts)``,
    the model's classes, counted or not).

    A class with no rows gets a stand-in, the largest weight of the counted classes (as rare as the rarest class
    seen), never 0: a weight of 0 would train with no loss on it. With no rows at all every weight is 1.
    """
    counts = np.asarray(counts, dtype=float)
    present = counts > 0
    if not present.any():
        return np.ones_like(counts)
    weights = np.empty_like(counts)
    weights[present] = counts.sum() / (len(counts) * counts[present])
    weights[~present] = weights[present].max()
    return weights


def _weight_list(weights) -> str:
    """The weights as the snippets write them, so the loss and the sampler show the same list."""
    return ", ".join(f"{w:.4g}" for w in weights)


def weighted_trainer_code(class_names: list[str], weights, *, learning_rate: float = 2e-5,
                          weight_decay: float = 0.01, warmup: float = 0.1, epochs: int = 10,
                          patience: int = 2, stand_ins=()) -> str:
    """A complete Trainer set-up with class-weighted loss and early stopping on macro F1.

    Expects ``model``, ``train_dataset`` and ``eval_dataset`` to exist, and runs ``trainer.train()``.
    ``stand_ins`` names the classes whose weight is a stand-in (no rows to count); a comment says so.
    """
    weight_list = _weight_list(weights)
    names = ", ".join(repr(str(n)) for n in class_names)
    note = (f"# No rows to count of {', '.join(repr(str(n)) for n in stand_ins)}: a stand-in weight "
            f"(the largest of the counted classes)\n" if stand_ins else "")
    return f'''import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

# Class order: [{names}]
{note}CLASS_WEIGHTS = [{weight_list}]


class WeightedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        weight = torch.tensor(CLASS_WEIGHTS, dtype=logits.dtype, device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight)
        return (loss, outputs) if return_outputs else loss


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {{"macro_f1": f1_score(labels, np.argmax(logits, axis=-1), average="macro")}}


args = TrainingArguments(
    output_dir="out-weighted",
    learning_rate={learning_rate:g},
    weight_decay={weight_decay:g},
    warmup_steps={warmup:g},  # a float below 1 is a fraction of the training steps
    num_train_epochs={epochs},
    eval_strategy="epoch",
    save_strategy="epoch",
    load_best_model_at_end=True,
    metric_for_best_model="macro_f1",
    greater_is_better=True,
    save_total_limit=2,
    report_to="none",
)
trainer = WeightedLossTrainer(
    model=model,
    args=args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    compute_metrics=compute_metrics,
    callbacks=[EarlyStoppingCallback(early_stopping_patience={patience})],
)
trainer.train()
'''


def resampling_code(weights) -> str:
    """Balanced sampling with a WeightedRandomSampler, the alternative to a weighted loss (the same weights)."""
    weight_list = _weight_list(weights)
    return f'''import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

CLASS_WEIGHTS = torch.tensor([{weight_list}])
row_weights = CLASS_WEIGHTS[torch.as_tensor(train_labels)]  # train_labels: one class id per training row
sampler = WeightedRandomSampler(row_weights, num_samples=len(row_weights), replacement=True)
loader = DataLoader(train_dataset, batch_size=32, sampler=sampler)
'''


POSTHOC_METHODS = {"logit_adjustment": "logit adjustment (minus the log prior)",
                   "bias_tuning": "per-class biases tuned for balanced accuracy"}


def logit_adjustment_code(class_names: list[str], offsets, method: str = "logit_adjustment") -> str:
    """Post-hoc offsets (logit adjustment or tuned biases) added to a loaded model's classifier bias, saved
    with its tokenizer (no retraining)."""
    offset_list = ", ".join(f"{o:.4g}" for o in offsets)
    return f'''import torch

# Added to the logits of [{", ".join(repr(str(n)) for n in class_names)}]: {POSTHOC_METHODS.get(method, method)}, no retraining.
OFFSETS = torch.tensor([{offset_list}])
head = model.classifier.out_proj if hasattr(model.classifier, "out_proj") else model.classifier
with torch.no_grad():
    head.bias += OFFSETS.to(head.bias.dtype)
model.save_pretrained("model-logit-adjusted")
tokenizer.save_pretrained("model-logit-adjusted")  # one folder, as from_pretrained and collapse-detect load it
'''


def imbalance_fix(stats: dict, train_counts=None) -> Fix:
    """The retraining fix for a majority-class collapse, with class weights filled in."""
    names = stats["class_names"]
    if train_counts is not None:
        counts, source = np.asarray(train_counts, float), "the training labels (--train-file)"
    else:
        counts = np.asarray([c["support"] for c in stats["per_class"]], float)
        source = ("the eval set's label counts, as a stand-in for the training labels "
                  "(pass --train-file for weights from the real training distribution)")
    weights = class_weights(counts)
    shown = ", ".join(f"{n}={w:.3g}" for n, w in zip(names, weights))
    stand_ins = [n for n, c in zip(names, counts) if c <= 0]
    steps = [f"Weight the loss by class: n / (k * count_c), k = {len(names)} classes, from {source}: {shown}."]
    if stand_ins:
        which = ", ".join(stand_ins)
        its = "its weight is a stand-in" if len(stand_ins) == 1 else "their weights are stand-ins"
        if train_counts is not None:
            steps.append(f"No rows of {which} in the training labels to count: {its} (the largest weight of the "
                         "counted classes), and no weight teaches a class the model never sees; add training rows.")
        else:
            steps.append(f"No rows of {which} in the eval set to count: {its} (the largest weight of the counted "
                         "classes); replace with weights from the training labels (--train-file gives weights "
                         "from the real training labels).")
    return Fix(
        title=IMBALANCE_FIX_TITLE,
        steps=steps + [
            "Or resample the training set so every class is seen equally often (WeightedRandomSampler, "
            "each row weighted by its class's weight above).",
            "Keep weight decay at 0.01-0.1, a learning rate of 1e-5 to 5e-5 with about 10% warm-up.",
            "Evaluate every epoch on a stratified validation split and stop early on macro F1 "
            "(eval_strategy, load_best_model_at_end, EarlyStoppingCallback), not on accuracy or loss.",
        ],
        code=weighted_trainer_code(names, weights, stand_ins=stand_ins),
        values={"class_weights": dict(zip(names, [float(w) for w in weights])), "weights_from": source,
                "stand_in_weights": stand_ins},
    )


USUAL_LEARNING_RATES = (1e-5, 5e-5)  # fine-tuning BERT-size encoders (Devlin et al. 2019: 2e-5 to 5e-5)


def _rate(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 1e-5, as the rest of the advice writes it


def optimization_fix(peak_learning_rate: float | None = None) -> Fix:
    low, high = map(_rate, USUAL_LEARNING_RATES)
    seen = ""
    if peak_learning_rate and peak_learning_rate > USUAL_LEARNING_RATES[1]:
        seen = (f"The run peaked at a learning rate of {peak_learning_rate:.2g}, above the {low} to {high} "
                "that fine-tuning a pretrained encoder takes; retrain within that range (2e-5 is a safe start). ")
    elif peak_learning_rate:
        seen = (f"The run peaked at a learning rate of {peak_learning_rate:.2g}, within the usual {low} to "
                f"{high}; if it still diverged, try {low} with warm-up and gradient clipping. ")
    return Fix(
        title="Retrain with a smaller learning rate and warm-up",
        steps=[
            seen + "A pretrained encoder whose outputs no longer depend on the input usually diverged: lower the "
            "learning rate (1e-5 to 5e-5 for BERT-size models), warm up over ~10% of the steps, clip gradients "
            "(max_grad_norm=1.0).",
            "Check that the classification head was trained at all (saved after training, not before) and that "
            "the tokenizer saved with the model is the one it was trained with.",
        ],
        values={"peak_learning_rate": peak_learning_rate} if peak_learning_rate else {},
    )


def evaluation_fix() -> Fix:
    """For a run that never evaluated: nothing chose the checkpoint or stopped the training."""
    return Fix(
        title="Evaluate during training and keep the best checkpoint",
        steps=["Evaluate every epoch on a stratified validation split (eval_strategy=\"epoch\", "
               "save_strategy=\"epoch\"), keep the best checkpoint by macro F1 (load_best_model_at_end=True, "
               "metric_for_best_model=\"macro_f1\" with a compute_metrics that returns it) and stop early "
               "(EarlyStoppingCallback(early_stopping_patience=2)): loss and accuracy reward the majority class."],
    )


def fix_for_cause(cause: str, stats: dict) -> Fix | None:
    """The first fix to try for a named root cause."""
    record = (stats.get("evidence") or {}).get("training_record") or {}
    if cause in ("diverged_optimization", "representation_collapse", "input_ignored"):
        return optimization_fix(record.get("max_learning_rate"))
    if cause == "class_imbalance":
        return imbalance_fix(stats, (stats.get("model") or {}).get("train_counts"))
    if cause == "untrained_head":
        return Fix("Save the fine-tuned model, head included",
                   ["Call trainer.save_model() / model.save_pretrained() after training, and check that "
                    "from_pretrained() reports no newly initialised classifier weights."])
    if cause == "label_mapping_mismatch":
        return Fix("Fix id2label / label2id", ["See the label_mapping_mismatch finding for the mapping that fits."])
    if cause == "tokenizer_mismatch":
        return Fix("Use the training tokenizer", ["Save the tokenizer next to the model "
                                                  "(tokenizer.save_pretrained(output_dir)) and load both from "
                                                  "the same folder."])
    return None
