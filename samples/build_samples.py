#!/usr/bin/env python
"""Build the offline sample data and the two sample checkpoints for collapse-detect.

Everything here is generated locally and deterministically; nothing is downloaded.

Running ``python samples/build_samples.py`` (re)creates, next to this file:

* ``headlines_train.csv`` -- 600 template headlines, 90% ``sports`` (540/30/30)
* ``headlines_eval.csv``  -- 300 template headlines, 60/20/20 sports/politics/business,
  disjoint from the training headlines
* ``models/collapsed``    -- tiny BERT fine-tuned with plain cross-entropy on the imbalanced
  set with a recipe that collapses onto ``sports`` (see ``COLLAPSED_RECIPE``)
* ``models/healthy``      -- the same tiny BERT fine-tuned with class-weighted cross-entropy,
  balanced sampling and early stopping on a held-out split of the training data

The building blocks (``make_headlines``, ``train_tokenizer``, ``make_tiny_bert``,
``fine_tune``, ``predict``, ``per_class_recall``) are importable so tests can build
their own tiny fixture models in a few seconds.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

SAMPLES_DIR = Path(__file__).resolve().parent
LABELS: list[str] = ["sports", "politics", "business"]

TRAIN_COUNTS = {"sports": 540, "politics": 30, "business": 30}
EVAL_COUNTS = {"sports": 180, "politics": 60, "business": 60}
TRAIN_SEED = 13
EVAL_SEED = 29
TOKENIZER_VOCAB_SIZE = 1000
MODEL_SEED = 7
MAX_LENGTH = 48

# The collapse recipe: plain (unweighted) cross-entropy, AdamW with weight decay 0.01, no
# early stopping, no gradient clipping, on the imbalanced 90%-sports data, with a learning
# rate that is far too high (3e-2; ~10x what trains this tiny BERT well and ~1000x a usual
# BERT fine-tuning rate). The oversized updates knock the encoder into a degenerate state in
# which its output no longer depends on the input, and the classifier bias settles on the
# training prior: the model predicts "sports" (p ~ 0.85-0.9, i.e. the prior) for every row.
# "lr too high + imbalanced data + no class weighting" is a common real-world cause of
# majority-class collapse. Measured: model seeds 0-7 (dropout 0.3) all collapse to 100%
# "sports" with input-independent logits. For comparison (seeds 0-4, dropout 0.1): at lr 1e-2
# collapse is seed-dependent, at 3e-3 it does not happen; "too few steps" (lr 1e-3, 1 epoch)
# also collapses, but to a less confident model (p(sports) ~ 0.55).
COLLAPSED_RECIPE = dict(epochs=3, lr=3e-2, weight_decay=0.01, batch_size=32, max_grad_norm=None)
# The healthy recipe: inverse-frequency class weights n/(k*count_c) AND class-balanced
# sampling, linear warm-up (10%) + linear decay, gradient clipping at 1.0, early stopping
# (patience 6 epochs) on macro recall of a stratified 20% held-out split of the training set,
# dropout 0.3 (make_tiny_bert default). Measured over model seeds 0-7 this gives eval macro
# recall 0.89-0.98 (with dropout 0.1 it over-fits the 24 minority headlines per class and
# drops as low as 0.59 for some seeds); it does not reach 1.0 because eval headlines use
# templates/words seen rarely or never in the 30 training headlines of each minority class.
HEALTHY_RECIPE = dict(epochs=40, lr=3e-3, weight_decay=0.01, batch_size=32, patience=6,
                      warmup_ratio=0.1, linear_decay=True, max_grad_norm=1.0)

# --------------------------------------------------------------------------------------
# Headline corpus
# --------------------------------------------------------------------------------------

# Shared / neutral vocabulary used by more than one topic.
_CITIES = ["Boston", "Chicago", "Denver", "Madrid", "London", "Dallas", "Seattle", "Milan",
           "Toronto", "Miami", "Paris", "Sydney", "Berlin", "Atlanta", "Phoenix", "Lyon"]
_FIRST = ["Maria", "James", "Chen", "Aisha", "Lucas", "Elena", "Omar", "Sofia", "David",
          "Priya", "Marco", "Hannah", "Kenji", "Laura", "Victor", "Nadia", "Tom", "Grace"]
_LAST = ["Silva", "Walker", "Okafor", "Kim", "Novak", "Rossi", "Haddad", "Lopez", "Brennan",
         "Tanaka", "Moreau", "Schmidt", "Patel", "Jensen", "Costa", "Murphy", "Ivanova", "Reyes"]
_NUM = ["two", "three", "four", "five", "six", "ten", "12", "15", "20", "30"]

# Sports vocabulary
_MASCOTS = ["Tigers", "Eagles", "Rovers", "Sharks", "Wolves", "Giants", "Lions", "Falcons",
            "United", "Rangers", "Hawks", "Bears", "Comets", "Pirates"]
_COMPETITIONS = ["league", "cup", "championship", "playoff", "derby", "tournament", "series"]
_STAGES = ["opener", "semifinal", "final", "quarterfinal", "second leg", "decider"]
_SCORES = ["2-1", "3-0", "1-0", "4-2", "3-2", "2-0", "98-95", "27-24", "5-3", "110-104"]
_EVENTS = ["Olympic Games", "World Cup", "marathon", "grand prix", "open", "world championships"]
_SPORT_EVENTS = ["100m", "marathon", "high jump", "swimming", "cycling", "rowing"]
_SCORING = ["goal", "touchdown", "penalty", "header", "three-pointer", "winner"]
_SPORT_ADJ = ["dramatic", "tense", "thrilling", "record", "stunning", "late"]

# Politics vocabulary
_PARTIES = ["Labour", "Conservative", "Democratic", "Republican", "Green", "Liberal",
            "centrist", "opposition", "ruling"]
_OFFICES = ["president", "governor", "mayor", "senate seat", "prime minister", "parliament"]
_BODIES = ["senate", "parliament", "congress", "assembly", "cabinet", "house"]
_POLICIES = ["healthcare", "immigration", "climate", "education", "voting rights", "tax",
             "housing", "defence", "pension", "border security"]
_COUNTRIES = ["France", "Brazil", "India", "Japan", "Kenya", "Canada", "Germany", "Mexico",
              "Spain", "Poland", "Chile", "Ireland"]
_POL_ISSUES = ["campaign funds", "lobbying", "leaked emails", "donations", "election fraud",
               "foreign influence"]
_POL_ADJ = ["heated", "bitter", "narrow", "landslide", "contested", "historic"]

# Business vocabulary
_COMPANIES = ["Acme Corp", "Globex", "Initech", "Northwind", "Umbrella Industries", "Vandelay",
              "Stark Motors", "Helios Energy", "Blue Harbor Bank", "Pinnacle Foods", "Zenith Tech",
              "Orion Pharma", "Atlas Logistics", "Summit Airlines"]
_SECTORS = ["tech", "energy", "banking", "retail", "airline", "auto", "chip", "pharma",
            "real estate", "telecom"]
_MOVES = ["jump", "fall", "surge", "slide", "climb", "tumble", "rise", "drop"]
_BIZ_EVENTS = ["earnings beat", "weak guidance", "merger talks", "profit warning",
               "strong sales", "analyst downgrade", "dividend hike", "revenue miss"]
_PRODUCTS = ["smartphone", "electric van", "cloud service", "credit card", "payment app",
             "budget airline", "chip", "streaming service"]
_BIZ_ISSUES = ["patent", "antitrust", "pricing", "fraud", "labor", "privacy"]
_BIZ_ADJ = ["record", "weak", "strong", "surprise", "disappointing", "bumper"]


def _name(r: random.Random) -> str:
    return f"{r.choice(_FIRST)} {r.choice(_LAST)}"


def _team(r: random.Random) -> str:
    return f"{r.choice(_CITIES)} {r.choice(_MASCOTS)}"


def _two(r: random.Random, pool: Sequence[str]) -> tuple[str, str]:
    a, b = r.sample(list(pool), 2)
    return a, b


def _sports(r: random.Random) -> str:
    t1, t2 = _team(r), _team(r)
    while t2.split()[-1] == t1.split()[-1]:
        t2 = _team(r)
    c = r.choice
    templates = [
        lambda: f"{t1} beat {t2} {c(_SCORES)} in {c(_COMPETITIONS)} {c(_STAGES)}",
        lambda: f"{_name(r)} scores twice as {t1} edge {t2}",
        lambda: f"{t1} coach {_name(r)} sacked after {c(_NUM)} straight defeats",
        lambda: f"{_name(r)} signs {c(_NUM)}-year contract extension with {t1}",
        lambda: f"{t1} clinch {c(_COMPETITIONS)} title with win over {t2}",
        lambda: f"injury rules {_name(r)} out of {c(_COMPETITIONS)} {c(_STAGES)}",
        lambda: f"{c(_CITIES)} to host {c(['2030', '2032', '2034', '2036'])} {c(_EVENTS)}",
        lambda: f"{_name(r)} breaks {c(_SPORT_EVENTS)} record in {c(_CITIES)}",
        lambda: f"{t1} striker {_name(r)} joins {t2} for record fee",
        lambda: f"{t1} fans celebrate {c(_SPORT_ADJ)} {c(_SCORING)} against {t2}",
        lambda: f"{_name(r)} wins {c(_CITIES)} {c(_EVENTS)} after {c(_SPORT_ADJ)} final set",
        lambda: f"{t1} stun {t2} in {c(_SPORT_ADJ)} overtime thriller",
        lambda: f"{t1} goalkeeper {_name(r)} saves {c(_SCORING)} to secure draw",
        lambda: f"{t2} sign {_name(r)} from {t1} on loan deal",
        lambda: f"{c(_SPORT_ADJ)} {c(_SCORING)} sends {t1} into {c(_COMPETITIONS)} {c(_STAGES)}",
        lambda: f"{_name(r)} named player of the season as {t1} finish top",
    ]
    return r.choice(templates)()


def _politics(r: random.Random) -> str:
    c = r.choice
    k1, k2 = _two(r, _COUNTRIES)
    templates = [
        lambda: f"{_name(r)} wins {c(_PARTIES)} nomination for {c(_OFFICES)}",
        lambda: f"{c(_BODIES)} passes {c(_POLICIES)} bill after {c(_POL_ADJ)} debate",
        lambda: f"{k1} votes in {c(_POL_ADJ)} election as {c(_PARTIES)} party leads polls",
        lambda: f"senator {_name(r)} faces ethics probe over {c(_POL_ISSUES)}",
        lambda: f"{_name(r)} unveils plan to overhaul {c(_POLICIES)} policy",
        lambda: f"{k1} and {k2} sign {c(_POLICIES)} treaty in {c(_CITIES)}",
        lambda: f"{c(_PARTIES)} leader {_name(r)} resigns after {c(_POL_ADJ)} election defeat",
        lambda: f"governor {_name(r)} vetoes {c(_POLICIES)} reform",
        lambda: f"minister {_name(r)} defends {c(_POLICIES)} policy in {c(_BODIES)}",
        lambda: f"{k1} president calls snap election amid {c(_POL_ISSUES)} row",
        lambda: f"{c(_PARTIES)} lawmakers block {c(_POLICIES)} vote in {c(_BODIES)}",
    ]
    return r.choice(templates)()


def _business(r: random.Random) -> str:
    c = r.choice
    co1, co2 = _two(r, _COMPANIES)
    templates = [
        lambda: f"{co1} shares {c(_MOVES)} {c(_NUM)} percent after {c(_BIZ_EVENTS)}",
        lambda: f"{co1} to acquire {co2} in {c(_NUM)} billion dollar deal",
        lambda: f"{co1} reports {c(_BIZ_ADJ)} quarterly profit",
        lambda: f"{co1} cuts {c(_NUM)} hundred jobs as {c(_SECTORS)} demand slows",
        lambda: f"central bank raises interest rates to {c(_NUM)} percent",
        lambda: f"{c(_SECTORS)} stocks {c(_MOVES)} as inflation eases",
        lambda: f"{co1} opens new headquarters in {c(_CITIES)}",
        lambda: f"{co1} settles {c(_BIZ_ISSUES)} lawsuit for {c(_NUM)} million dollars",
        lambda: f"{co1} launches {c(_PRODUCTS)} to rival {co2}",
        lambda: f"{co1} posts {c(_BIZ_ADJ)} revenue on {c(_SECTORS)} growth",
        lambda: f"{c(_BIZ_ADJ)} {c(_SECTORS)} earnings lift {co1} stock",
    ]
    return r.choice(templates)()


_GENERATORS = {"sports": _sports, "politics": _politics, "business": _business}


def make_headlines(n_by_label: Mapping[str, int], seed: int,
                   exclude: Iterable[str] | None = None) -> pd.DataFrame:
    """Generate distinct template headlines.

    ``n_by_label`` maps a label (one of ``sports``, ``politics``, ``business``) to the number
    of rows wanted. Headlines are unique within the result and never equal to anything in
    ``exclude``. Rows are shuffled with the same seed. Columns: ``text``, ``label`` (str).
    """
    r = random.Random(seed)
    taken = set(exclude or ())
    rows: list[tuple[str, str]] = []
    for label, n in n_by_label.items():
        if label not in _GENERATORS:
            raise ValueError(f"unknown label {label!r}; expected one of {sorted(_GENERATORS)}")
        gen = _GENERATORS[label]
        got, tries = 0, 0
        while got < n:
            tries += 1
            if tries > 200 * max(n, 1) + 1000:
                raise RuntimeError(f"could not generate {n} distinct {label} headlines")
            text = gen(r)
            text = text[0].upper() + text[1:]
            if text in taken:
                continue
            taken.add(text)
            rows.append((text, label))
            got += 1
    r.shuffle(rows)
    return pd.DataFrame(rows, columns=["text", "label"])


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_vocab(words: Sequence[str], vocab_size: int) -> dict[str, int]:
    """Deterministic WordPiece vocabulary from pre-tokenized, normalized words.

    Layout: special tokens, every character seen (as a word start and as ``##`` piece),
    whole words by descending frequency, then the most frequent word-initial prefixes and
    ``##`` suffixes (2-5 characters) to fill ``vocab_size``. Ties are broken alphabetically,
    so the result depends only on the input words.
    """
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    chars = sorted({ch for w in counts for ch in w})
    vocab: list[str] = list(SPECIAL_TOKENS) + chars + ["##" + ch for ch in chars]
    seen = set(vocab)
    budget = vocab_size - len(vocab)
    ranked_words = sorted((w for w in counts if w not in seen), key=lambda w: (-counts[w], w))
    # whole words get at most 80% of the remaining budget, subword pieces the rest
    for w in ranked_words[: max(0, int(budget * 0.8))]:
        vocab.append(w)
        seen.add(w)
    piece_counts: dict[str, int] = {}
    for w, n in counts.items():
        for k in range(2, min(5, len(w) - 1) + 1):
            for piece in (w[:k], "##" + w[-k:]):
                piece_counts[piece] = piece_counts.get(piece, 0) + n
    for piece in sorted(piece_counts, key=lambda p: (-piece_counts[p], p)):
        if len(vocab) >= vocab_size:
            break
        if piece not in seen:
            vocab.append(piece)
            seen.add(piece)
    return {tok: i for i, tok in enumerate(vocab)}


def train_tokenizer(texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB_SIZE,
                    model_max_length: int = MAX_LENGTH):
    """Build a lowercase BERT-style WordPiece tokenizer from ``texts``.

    Returns a fast HF tokenizer (``PreTrainedTokenizerFast``) with a BertNormalizer
    (lowercase), BertPreTokenizer, WordPiece model and decoder, and a TemplateProcessing
    post-processor adding ``[CLS] ... [SEP]``; it returns ``token_type_ids`` and
    ``attention_mask`` and round-trips through ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained``.

    Why not ``tokenizers.trainers.WordPieceTrainer``: its merge loop breaks count ties in
    Rust hash-map order, which is randomised per process, so on this corpus it produced a
    different vocabulary (995 or 996 tokens, different pieces) on every run even with
    RAYON_NUM_THREADS=1. The sample checkpoints must be byte-reproducible, so the vocabulary
    is built here by a deterministic frequency-based procedure (``_wordpiece_vocab``); the
    resulting tokenizer is an ordinary WordPiece tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                            handle_chinese_chars=True, strip_accents=None)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [w for t in texts
             for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(t)))]
    vocab = _wordpiece_vocab(words, vocab_size)

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length, padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------


def set_determinism(threads: int = 1) -> None:
    """Single-threaded, deterministic torch (what the sample build relies on)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily run torch with ``n`` intra-op threads (None: leave as is).

    Tiny models are much faster single-threaded; on a loaded 2-core machine the default
    thread pool made a 100-row fine-tune take 12 s instead of 0.3 s.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_tiny_bert(tokenizer, labels: Sequence[str], seed: int = MODEL_SEED,
                   dropout: float = 0.3, **config_overrides):
    """A randomly initialised tiny BertForSequenceClassification (~52k parameters at vocab 1000).

    hidden 32, 2 layers, 4 heads, intermediate 64, 64 positions, vocab = ``len(tokenizer)``.
    ``labels[i]`` becomes ``id2label[i]``. ``dropout`` sets hidden and attention dropout (0.3:
    with ~24 minority examples 0.1 over-fits; see HEALTHY_RECIPE). Extra keyword arguments
    override BertConfig fields.
    """
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
        id2label={i: str(l) for i, l in enumerate(labels)},
        label2id={str(l): i for i, l in enumerate(labels)},
        problem_type="single_label_classification",
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**cfg))
    model.eval()
    return model


def _encode(tokenizer, texts: Sequence[str], max_length: int | None = None):
    return tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                     max_length=max_length or min(tokenizer.model_max_length, 512))


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 64,
            num_threads: int | None = 1) -> np.ndarray:
    """Argmax class ids for ``texts`` (model put in eval mode)."""
    texts = list(texts)
    model.eval()
    out = []
    with _torch_threads(num_threads):
        for i in range(0, len(texts), batch_size):
            enc = _encode(tokenizer, texts[i:i + batch_size])
            out.append(model(**enc).logits.argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def per_class_recall(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Recall per class id (nan for a class absent from ``y_true``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rec = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = y_true == c
        if m.any():
            rec[c] = float((y_pred[m] == c).mean())
    return rec


def inverse_frequency_weights(label_ids: Sequence[int], n_classes: int) -> list[float]:
    """Class weights n / (k * count_c) (a class with no rows gets weight 0)."""
    counts = np.bincount(np.asarray(label_ids), minlength=n_classes).astype(float)
    n = counts.sum()
    return [float(n / (n_classes * c)) if c > 0 else 0.0 for c in counts]


def fine_tune(model, tokenizer, texts: Sequence[str], label_ids: Sequence[int], *,
              epochs: int, lr: float, weight_decay: float = 0.01, batch_size: int = 32,
              class_weights: Sequence[float] | None = None, balanced: bool = False,
              val: tuple[Sequence[str], Sequence[int]] | None = None,
              patience: int | None = None, warmup_ratio: float = 0.0,
              linear_decay: bool = False, max_grad_norm: float | None = 1.0,
              seed: int = 0, num_threads: int | None = 1, verbose: bool = False,
              history: list | None = None, logging_steps: int = 5):
    """Fine-tune ``model`` in place with a plain torch loop and return it (in eval mode).

    * ``class_weights``: per-class weights for the cross-entropy loss (None = plain CE).
    * ``balanced``: draw each epoch's rows with replacement, with probability inversely
      proportional to class frequency (same number of rows per epoch as the data).
    * ``warmup_ratio`` / ``linear_decay``: linear warm-up over that fraction of the steps
      and/or linear decay to 0 (the usual HF Trainer schedule); constant lr by default.
    * ``max_grad_norm``: gradient-norm clipping (None disables it).
    * ``val`` + ``patience``: early stopping on validation macro recall (ties broken by
      lower validation loss); the best epoch's weights are restored at the end.
    * ``num_threads``: torch intra-op threads used while training (restored afterwards).
    * ``history``: a list that receives log entries in the shape of transformers' Trainer
      ``log_history`` (training loss, learning rate and gradient norm every ``logging_steps``
      steps; evaluation loss and macro recall every epoch when ``val`` is given).
    Deterministic for a given seed (all randomness comes from ``torch.manual_seed(seed)``
    and a seeded generator); call ``set_determinism()`` for bit-identical results.
    """
    with _torch_threads(num_threads):
        return _fine_tune(model, tokenizer, texts, label_ids, epochs=epochs, lr=lr,
                          weight_decay=weight_decay, batch_size=batch_size,
                          class_weights=class_weights, balanced=balanced, val=val,
                          patience=patience, warmup_ratio=warmup_ratio,
                          linear_decay=linear_decay, max_grad_norm=max_grad_norm, seed=seed,
                          verbose=verbose, history=history, logging_steps=logging_steps)


def _fine_tune(model, tokenizer, texts, label_ids, *, epochs, lr, weight_decay, batch_size,
               class_weights, balanced, val, patience, warmup_ratio, linear_decay,
               max_grad_norm, seed, verbose, history=None, logging_steps=5):
    texts = list(texts)
    y = torch.as_tensor(list(label_ids), dtype=torch.long)
    n, k = len(texts), model.config.num_labels
    enc = _encode(tokenizer, texts)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * ((n + batch_size - 1) // batch_size)
    warmup = int(round(warmup_ratio * total_steps))

    def lr_factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if linear_decay:
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    if balanced:
        counts = torch.bincount(y, minlength=k).float()
        sample_w = (1.0 / counts.clamp(min=1))[y]

    val_enc = val_y = None
    if val is not None:
        val_enc = _encode(tokenizer, list(val[0]))
        val_y = torch.as_tensor(list(val[1]), dtype=torch.long)
    best_key, best_state, bad_epochs = None, None, 0
    step, window = 0, []

    for epoch in range(epochs):
        model.train()
        order = (torch.multinomial(sample_w, n, replacement=True, generator=gen) if balanced
                 else torch.randperm(n, generator=gen))
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            batch = {key: v[idx] for key, v in enc.items()}
            # trim padding columns not needed by this batch (cheaper, same result)
            width = int(batch["attention_mask"].sum(1).max())
            batch = {key: v[:, :width] for key, v in batch.items()}
            logits = model(**batch).logits
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), max_grad_norm if max_grad_norm is not None else float("inf"))
            current_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            window.append(float(loss.detach()))
            if history is not None and step % logging_steps == 0:
                history.append({"epoch": round(epoch + (i + len(idx)) / n, 4), "step": step,
                                "loss": round(sum(window) / len(window), 4), "learning_rate": current_lr,
                                "grad_norm": round(float(grad_norm), 4)})
                window = []
        if val_enc is None:
            if verbose:
                print(f"  epoch {epoch + 1}: train loss {total / n:.4f}")
            continue
        model.eval()
        with torch.no_grad():
            vlogits = model(**val_enc).logits
            vloss = float(torch.nn.functional.cross_entropy(vlogits, val_y))
            vrec = per_class_recall(val_y.numpy(), vlogits.argmax(-1).numpy(), k)
            vmacro = float(np.nanmean(vrec))
        if history is not None:
            history.append({"epoch": epoch + 1, "step": step, "eval_loss": round(vloss, 4),
                            "eval_macro_recall": round(vmacro, 4)})
        if verbose:
            print(f"  epoch {epoch + 1}: train loss {total / n:.4f}  val loss {vloss:.4f}"
                  f"  val macro recall {vmacro:.3f}")
        key = (vmacro, -vloss)
        if best_key is None or key > best_key:
            best_key, bad_epochs = key, 0
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            bad_epochs += 1
            if patience is not None and bad_epochs >= patience:
                if verbose:
                    print(f"  early stop after epoch {epoch + 1}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model


def write_trainer_state(out_dir, history: list, *, global_step: int, max_steps: int,
                        best_step: int | None = None) -> Path:
    """Write the run's log as ``trainer_state.json``, the record transformers' Trainer leaves next to a
    checkpoint (collapse-detect reads its ``log_history``)."""
    import json

    state = {"global_step": global_step, "max_steps": max_steps, "log_history": history,
             "best_model_checkpoint": None if best_step is None else f"checkpoint-{best_step}"}
    path = Path(out_dir) / "trainer_state.json"
    path.write_text(json.dumps(state, indent=2) + "\n")
    return path


_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json")


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into ``out_dir``.

    Only those files are kept: anything else ``save_pretrained`` adds (e.g. a
    generation_config.json) is removed again; other files already in ``out_dir`` are left.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _CHECKPOINT_FILES:  # stale files from an older build
        (out / name).unlink(missing_ok=True)
    before = {f.name for f in out.iterdir()}
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        if f.name not in before and f.name not in _CHECKPOINT_FILES and f.is_file():
            f.unlink()
    # transformers 5 records tokenizer_class "TokenizersBackend", which transformers 4.x
    # cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    for name in _CHECKPOINT_FILES:
        if (out / name).exists():
            (out / name).chmod(0o644)  # safetensors writes 0600
    return out


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def _report(name, model, tokenizer, df) -> dict:
    y = df["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()
    pred = predict(model, tokenizer, df["text"].tolist())
    rec = per_class_recall(y, pred, len(LABELS))
    dist = {LABELS[c]: int((pred == c).sum()) for c in range(len(LABELS))}
    print(f"[{name}] eval recall " + ", ".join(f"{l}={r:.3f}" for l, r in zip(LABELS, rec))
          + f"  macro={np.nanmean(rec):.3f}  predicted={dist}")
    return {"recall": dict(zip(LABELS, rec.tolist())), "predicted": dist}


def main(out_dir: str | os.PathLike | None = None, verbose: bool = False) -> dict:
    t0 = time.perf_counter()
    set_determinism(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir) if out_dir else SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)

    train_df = make_headlines(TRAIN_COUNTS, seed=TRAIN_SEED)
    eval_df = make_headlines(EVAL_COUNTS, seed=EVAL_SEED, exclude=set(train_df["text"]))
    train_df.to_csv(out / "headlines_train.csv", index=False, lineterminator="\n")
    eval_df.to_csv(out / "headlines_eval.csv", index=False, lineterminator="\n")
    print(f"wrote {len(train_df)} train / {len(eval_df)} eval headlines "
          f"({time.perf_counter() - t0:.1f}s)")

    tokenizer = train_tokenizer(train_df["text"], vocab_size=TOKENIZER_VOCAB_SIZE)
    print(f"tokenizer vocab size {len(tokenizer)} ({time.perf_counter() - t0:.1f}s)")

    label2id = {l: i for i, l in enumerate(LABELS)}
    texts = train_df["text"].tolist()
    y = train_df["label"].map(label2id).tolist()
    results = {}

    # --- collapsed: plain CE on the full imbalanced set, lr too high (COLLAPSED_RECIPE) ---
    model = make_tiny_bert(tokenizer, LABELS, seed=MODEL_SEED)
    history: list = []
    fine_tune(model, tokenizer, texts, y, seed=MODEL_SEED, verbose=verbose, history=history,
              **COLLAPSED_RECIPE)
    save_checkpoint(model, tokenizer, out / "models" / "collapsed")
    steps = COLLAPSED_RECIPE["epochs"] * -(-len(texts) // COLLAPSED_RECIPE.get("batch_size", 32))
    write_trainer_state(out / "models" / "collapsed", history, global_step=steps, max_steps=steps)
    results["collapsed"] = _report("collapsed", model, tokenizer, eval_df)
    print(f"  ({time.perf_counter() - t0:.1f}s)")

    # --- healthy: stratified 80/20 split of the training set for early stopping,
    #     inverse-frequency class weights + balanced sampling ---
    r = random.Random(MODEL_SEED)
    fit_idx, val_idx = [], []
    for c in range(len(LABELS)):
        idx = [i for i, yi in enumerate(y) if yi == c]
        r.shuffle(idx)
        n_val = max(1, round(0.2 * len(idx)))
        val_idx += idx[:n_val]
        fit_idx += idx[n_val:]
    fit_idx.sort()
    val_idx.sort()
    fit_y = [y[i] for i in fit_idx]
    recipe = dict(HEALTHY_RECIPE)
    model = make_tiny_bert(tokenizer, LABELS, seed=MODEL_SEED)
    history = []
    fine_tune(model, tokenizer, [texts[i] for i in fit_idx], fit_y,
              class_weights=inverse_frequency_weights(fit_y, len(LABELS)), balanced=True,
              val=([texts[i] for i in val_idx], [y[i] for i in val_idx]),
              seed=MODEL_SEED, verbose=verbose, history=history, **recipe)
    save_checkpoint(model, tokenizer, out / "models" / "healthy")
    evals = [h for h in history if "eval_macro_recall" in h]
    best = max(evals, key=lambda h: (h["eval_macro_recall"], -h["eval_loss"])) if evals else None
    last_step = max((h["step"] for h in history), default=0)
    planned = recipe["epochs"] * -(-len(fit_idx) // recipe.get("batch_size", 32))
    write_trainer_state(out / "models" / "healthy", history, global_step=last_step, max_steps=planned,
                        best_step=best["step"] if best else None)
    results["healthy"] = _report("healthy", model, tokenizer, eval_df)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="default: the samples/ folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print per-epoch losses")
    args = ap.parse_args()
    main(args.out_dir, verbose=args.verbose)
