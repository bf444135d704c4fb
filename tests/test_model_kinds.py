"""Checkpoints other than a plain fp32 BERT: the model kinds collapse-detect cannot read as one softmax per row are
refused before probing (exit 2, one line), half-precision weights are probed in fp32, and RoBERTa-family models
are truncated to the positions their embeddings can number."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collapse_detect.checkpoint import load_checkpoint
from collapse_detect.cli import main

LABELS = ["sports", "politics", "business"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import build_samples as B

    root = tmp_path_factory.mktemp("kinds")
    df = B.make_headlines({"sports": 30, "politics": 15, "business": 15}, seed=7)
    tok = B.train_tokenizer(df["text"], vocab_size=300)
    df.to_csv(root / "eval.csv", index=False)
    return {"root": root, "tok": tok, "df": df, "eval": root / "eval.csv", "B": B}


def _refused(capsys, model_dir, data, tmp_path) -> str:
    out = tmp_path / "report"
    capsys.readouterr()  # what building the checkpoint printed
    code = main([str(model_dir), str(data), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("Error: ") and "Traceback" not in err
    assert not out.exists()
    return err


def test_a_multi_label_classifier_is_refused(base, tmp_path, capsys):
    """Softmax hides the multi-label failure (every sigmoid under 0.5): judged as single-label, such a model
    passed as HEALTHY."""
    model = base["B"].make_tiny_bert(base["tok"], LABELS, seed=1, problem_type="multi_label_classification")
    folder = base["B"].save_checkpoint(model, base["tok"], tmp_path / "multi")
    err = _refused(capsys, folder, base["eval"], tmp_path)
    assert "is a multi-label classifier" in err and str(folder) in err


def test_a_regression_head_is_refused(base, tmp_path, capsys):
    model = base["B"].make_tiny_bert(base["tok"], ["score"], seed=1, problem_type=None)
    folder = base["B"].save_checkpoint(model, base["tok"], tmp_path / "regression")
    err = _refused(capsys, folder, base["eval"], tmp_path)
    assert "has one output (a regression head, or a binary classifier" in err


@pytest.mark.parametrize("pad", [True, False])
def test_a_decoder_classifier_is_refused_with_one_line(base, tmp_path, capsys, pad):
    """GPT-2 applies its head to every token and picks the last real token's logits afterwards: with a pad id
    the probe crashed on the head's input shape, without one transformers refused batches (both exit 1)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = base["tok"]
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                        pad_token_id=tok.pad_token_id if pad else None)
    torch.manual_seed(0)
    folder = base["B"].save_checkpoint(GPT2ForSequenceClassification(config).eval(), tok, tmp_path / "gpt2")
    err = _refused(capsys, folder, base["eval"], tmp_path)
    assert "its classification head reads every token" in err


def test_half_precision_weights_are_probed_in_fp32(base, tmp_path):
    """transformers 5 loads weights in the dtype they were saved in: an fp16 checkpoint ran in fp16 while the
    report said fp32, and a bf16 one made --dtype bf16 measure its drift against bf16."""
    model = base["B"].make_tiny_bert(base["tok"], LABELS, seed=2)
    folder = base["B"].save_checkpoint(model.half(), base["tok"], tmp_path / "fp16")
    loaded = load_checkpoint(folder)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    expected = {k: v.float() for k, v in model.state_dict().items()}  # the fp16 values, widened
    for name, value in loaded.model.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
    assert main([str(folder), str(base["eval"]), "--out", str(tmp_path / "r"), "--quiet", "--format", "json"]) in (0, 1)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["metadata"]["dtype"] == "fp32"


def test_roberta_is_truncated_to_the_positions_it_can_number(base, tmp_path):
    """RoBERTa numbers positions from pad id + 1: with 34 position embeddings and pad id 1 it reads 32 tokens.
    A tokenizer without a limit made the probe truncate at 34 and crash on an index error for longer rows."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from collapse_detect.probe import model_max_length

    tok = base["tok"]
    tok.model_max_length = int(1e30)  # what a tokenizer saved without a limit reports
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37, max_position_embeddings=34, pad_token_id=1, num_labels=3,
                           id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config).eval()
    assert model_max_length(model, tok, None) == 32
    assert model_max_length(model, tok, 20) == 20
    bert = base["B"].make_tiny_bert(tok, LABELS, seed=2)
    assert model_max_length(bert, tok, None) == 64  # BERT numbers positions from 0: all 64
    folder = base["B"].save_checkpoint(model, tok, tmp_path / "roberta")
    df = base["df"].copy()
    df["text"] = [" ".join([t] * 6) for t in df["text"]]  # most rows well over 32 tokens
    df.to_csv(tmp_path / "long.csv", index=False)
    code = main([str(folder), str(tmp_path / "long.csv"), "--out", str(tmp_path / "r"), "--quiet", "--format",
                 "json"])
    assert code in (0, 1)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    tokenization = summary["stats"]["tokenization"]
    assert tokenization["max_length"] == tokenization["model_max_length"] == 32
    lengths = [len(ids) for ids in tok(df["text"].tolist())["input_ids"]]
    assert max(lengths) > 32
    assert tokenization["truncated_rows"] == sum(n > 32 for n in lengths)
    assert np.isclose(sum(map(sum, summary["stats"]["confusion"])), len(df))


def test_a_model_with_nan_weights_is_one_line_naming_the_weights(base, tmp_path, capsys):
    """A run that diverged into NaN weights outputs NaN for every row: sklearn's ROC-AUC raised on it (exit 3,
    'failed unexpectedly'); the message now says which weights hold NaN and what to change in training."""
    model = base["B"].make_tiny_bert(base["tok"], LABELS, seed=4)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.LayerNorm.weight[0] = float("nan")
    folder = base["B"].save_checkpoint(model, base["tok"], tmp_path / "nan")
    err = _refused(capsys, folder, base["eval"], tmp_path)
    rows = len(base["df"])
    assert f"outputs NaN or infinite logits for {rows} of {rows} rows read so far (rows 0, 1, 2, ...)" in err
    assert "1 weight tensor(s) hold NaN or inf (bert.encoder.layer.1.output.LayerNorm.weight)" in err


@pytest.mark.parametrize("kind", ["mpnet", "bert"])
def test_the_position_limit_of_models_with_a_padding_position(base, kind):
    """MPNet (like Longformer, ESM and I-BERT) numbers positions from pad id + 1 too, with no RoBERTa-named
    helper to find: the offset comes from the position table's padding row; BERT's table has none."""
    from transformers import BertConfig, BertForSequenceClassification, MPNetConfig, MPNetForSequenceClassification

    from collapse_detect.probe import model_max_length

    tok = base["tok"]
    tok.model_max_length = int(1e30)
    shared = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=20, pad_token_id=1, num_labels=3)
    model = (MPNetForSequenceClassification(MPNetConfig(**shared)) if kind == "mpnet"
             else BertForSequenceClassification(BertConfig(**shared))).eval()
    limit = model_max_length(model, tok, None)
    assert limit == (18 if kind == "mpnet" else 20)
    with torch.no_grad():  # the longest input the limit allows runs, one more token does not fit (MPNet)
        model(input_ids=torch.full((1, limit), 5))
        if kind == "mpnet":
            with pytest.raises(IndexError):
                model(input_ids=torch.full((1, limit + 1), 5))
