"""Shared fixtures: tiny real models, trained here in seconds with the sample builder's functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LABELS = ["sports", "politics", "business"]

try:  # the same examples on every run, and no example database in the checkout
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("collapse-detect", derandomize=True, database=None)
    _hypothesis_settings.load_profile("collapse-detect")
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    """Runs in the tests write no report into a real CI job's step summary (subprocesses inherit os.environ);
    the tests of that summary set the variable themselves."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """A small healthy model trained on balanced headlines, and an eval CSV with a 60/20/20 prior."""
    import build_samples as B

    B.set_determinism()
    train = B.make_headlines({"sports": 120, "politics": 120, "business": 120}, seed=101)
    eval_df = B.make_headlines({"sports": 120, "politics": 40, "business": 40}, seed=202,
                               exclude=set(train["text"]))
    tokenizer = B.train_tokenizer(train["text"])
    model = B.make_tiny_bert(tokenizer, LABELS, seed=3)
    label2id = {name: i for i, name in enumerate(LABELS)}
    B.fine_tune(model, tokenizer, train["text"].tolist(), train["label"].map(label2id).tolist(),
                epochs=12, lr=2e-3, weight_decay=0.01, seed=3)
    root = tmp_path_factory.mktemp("tiny")
    B.save_checkpoint(model, tokenizer, root / "healthy")
    eval_path = root / "eval.csv"
    eval_df.to_csv(eval_path, index=False)
    return {"model": model, "tokenizer": tokenizer, "dir": root / "healthy", "eval": eval_path,
            "root": root, "train": train, "eval_df": eval_df}


@pytest.fixture(scope="session")
def tiny_collapsed(tmp_path_factory):
    """An untrained tiny BERT whose head bias sends every row to 'sports' (no training: built in about a second),
    saved as a checkpoint, with a 60/20/20 eval CSV of 100 headlines. Its verdict is COLLAPSE by construction."""
    import build_samples as B
    import torch

    eval_df = B.make_headlines({"sports": 60, "politics": 20, "business": 20}, seed=505)
    tokenizer = B.train_tokenizer(eval_df["text"], vocab_size=400)
    model = B.make_tiny_bert(tokenizer, LABELS, seed=5, intermediate_size=37)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([6.0, 0.0, 0.0]))
    root = tmp_path_factory.mktemp("collapsed")
    B.save_checkpoint(model, tokenizer, root / "model")
    eval_path = root / "eval.csv"
    eval_df.to_csv(eval_path, index=False)
    return {"model": model, "tokenizer": tokenizer, "dir": root / "model", "eval": eval_path, "root": root,
            "eval_df": eval_df}


@pytest.fixture(scope="session")
def collapsed_report(tiny_collapsed, tmp_path_factory):
    """One full CLI run on ``tiny_collapsed`` (every format, plus --junit): its exit code and output folder."""
    from collapse_detect.cli import main

    out = tmp_path_factory.mktemp("collapsed_report")
    here = os.getcwd()
    os.chdir(out)  # away from any pyproject.toml with a [tool.collapse-detect] table
    try:
        code = main([str(tiny_collapsed["dir"]), str(tiny_collapsed["eval"]), "--out", str(out / "report"),
                     "--junit", str(out / "junit.xml"), "--quiet"])
    finally:
        os.chdir(here)
    return {"code": code, "out": out / "report", "junit": out / "junit.xml"}
