"""The library entry points: everything the CLI does, callable from Python."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checks import checks_selected, run_checks
from .diagnosis import Diagnosis
from .errors import InputError
from .stats import compute_stats


@dataclass
class RunOptions:
    text_col: str | None = None
    text_pair_col: str | None = None
    label_col: str | None = None
    label_names: list[str] | None = None
    batch_size: int = 32
    max_length: int | None = None
    max_tokens_per_batch: int | None = None
    grad_sample: int = 0
    grad_layers: int | None = None
    seed: int = 0
    allow_pickle: bool = False
    progress: bool = False
    chunk_rows: int = 8192
    check_params: dict = field(default_factory=dict)
    only: list[str] | None = None
    skip: list[str] | None = None
    train_file: str | None = None
    write_fixed: str | None = None


def _train_counts(options: RunOptions, class_names: list[str]) -> list[int] | None:
    """Label counts of the training file (``--train-file``), for class weights and the training prior."""
    if not options.train_file:
        return None
    from .data import detect_columns, iter_frames, LabelMapper

    counts = np.zeros(len(class_names), dtype=np.int64)
    mapper = None
    start = 0
    for frame in iter_frames(options.train_file, options.chunk_rows):
        if mapper is None:
            columns = detect_columns(frame, options.train_file, text_col=options.text_col,
                                     label_col=options.label_col)
            mapper = LabelMapper(class_names, options.train_file, columns.label)
        ids = mapper(frame[columns.label], np.arange(start, start + len(frame)))
        counts += np.bincount(ids, minlength=len(class_names))
        start += len(frame)
    return counts.tolist()


def _versions() -> dict:
    import sklearn
    import torch
    import transformers

    from . import __version__

    return {"collapse_detect": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit_learn": sklearn.__version__, "python": platform.python_version()}


def judge(stats: dict, metadata: dict, options: RunOptions) -> Diagnosis:
    """Run the checks on computed statistics (re-judging a saved run needs nothing more)."""
    from .rootcause import infer_root_cause

    findings = run_checks(stats, only=options.only, skip=options.skip, params=options.check_params)
    metadata["checks_run"] = checks_selected(options.only, options.skip)
    diagnosis = Diagnosis(findings, stats, metadata)
    diagnosis.root_cause = infer_root_cause(stats, collapsed=bool(diagnosis.gating_findings("fail")))
    return diagnosis


@dataclass
class ProbeOutcome:
    """What probing one checkpoint over one eval file produced, before any judgement."""

    loaded: object
    class_names: list[str]
    columns: object
    run: object


def probe_files(model_dir, data_file, options: RunOptions, on_chunk=None, row_filter=None) -> ProbeOutcome:
    """Load a checkpoint and probe it over an eval file (or the rows ``row_filter`` keeps)."""
    from .checkpoint import load_checkpoint
    from .data import iter_chunks
    from .probe import ProbeOptions, run_probe

    loaded = load_checkpoint(model_dir, allow_pickle=options.allow_pickle)
    class_names = loaded.class_names
    if options.label_names:
        if len(options.label_names) != len(class_names):
            raise InputError(f"--label-names gives {len(options.label_names)} names but the model has "
                             f"{len(class_names)} classes")
        class_names = list(options.label_names)
    columns, chunks = iter_chunks(data_file, class_names, text_col=options.text_col,
                                  text_pair_col=options.text_pair_col, label_col=options.label_col,
                                  chunk_rows=options.chunk_rows, row_filter=row_filter)
    probe_options = ProbeOptions(batch_size=options.batch_size, max_length=options.max_length,
                                 max_tokens_per_batch=options.max_tokens_per_batch,
                                 grad_sample=options.grad_sample, grad_layers=options.grad_layers,
                                 seed=options.seed, progress=options.progress)
    callback = None if on_chunk is None else (lambda chunk, probs: on_chunk(chunk, probs, class_names))
    run = run_probe(loaded.model, loaded.tokenizer, chunks, class_names, probe_options, on_chunk=callback)
    return ProbeOutcome(loaded, class_names, columns, run)


def diagnosis_from_outcome(outcome: ProbeOutcome, model_dir, data_file, options: RunOptions) -> Diagnosis:
    """Statistics, evidence and checks for a finished probe (after any merge across processes)."""
    run, loaded, columns = outcome.run, outcome.loaded, outcome.columns
    if run.rows == 0:
        raise InputError(f"data file {str(data_file)!r} has no rows")
    stats = compute_stats(run.accumulator)
    stats["model"] = {"generic_label_names": loaded.generic_label_names and not options.label_names,
                      "train_counts": _train_counts(options, outcome.class_names)}
    stats["tokenization"] = {
        "max_length": run.max_length, "tokens": run.tokens, "padded_tokens": run.padded_tokens,
        "truncated_rows": run.truncated_rows, "truncation_rate": run.truncated_rows / run.rows,
        "unknown_tokens": run.unknown_tokens, "unknown_token_rate": run.unknown_tokens / max(run.tokens, 1),
    }
    metadata = {
        "model_dir": str(model_dir), "model_name": Path(model_dir).resolve().name,
        "checkpoint": str(loaded.resolved.path), "checkpoint_reason": loaded.resolved.reason,
        "weights_file": loaded.weights_file, "architecture": type(loaded.model).__name__,
        "data_file": str(data_file), "columns": {"text": columns.text, "text_pair": columns.text_pair,
                                                  "label": columns.label},
        "rows": run.rows, "seed": options.seed, "probe_seconds": round(run.seconds, 3),
        "grad_seconds": round(run.grad_seconds, 3),
        "versions": _versions(), "notes": list(loaded.notes) + run.notes,
    }
    stats["evidence"] = gather_evidence(outcome, stats, options)
    train_counts = stats["model"].get("train_counts")
    stats["posthoc"] = _posthoc(run.accumulator, options, train_counts)
    return judge(stats, metadata, options)


def gather_evidence(outcome: ProbeOutcome, stats: dict, options: RunOptions) -> dict:
    """Evidence for the root cause: features, label mapping, training record, and the model's own state."""
    from . import analysis, model_evidence

    acc, loaded = outcome.run.accumulator, outcome.loaded
    sample = acc.sample.arrays
    evidence: dict = {"label_permutation": analysis.label_permutation(stats["confusion"]),
                      "training_record": analysis.training_record(loaded.resolved.trainer_state)}
    if "features" in sample:
        evidence["linear_probe"] = analysis.linear_probe(sample["features"], sample["gold"], seed=options.seed)
        evidence["geometry"] = analysis.representation_geometry(sample["features"])
    evidence["null_input"] = model_evidence.null_input_probe(loaded.model, loaded.tokenizer, acc,
                                                             outcome.class_names, seed=options.seed)
    evidence["head"] = model_evidence.head_state(loaded.model, loaded.missing_keys, stats["label_prior"])
    evidence["tokenizer_fit"] = model_evidence.tokenizer_fit(loaded.model, loaded.tokenizer)
    return evidence


def _posthoc(acc, options: RunOptions, train_counts) -> dict | None:
    from .posthoc import evaluate_posthoc

    sample = acc.sample.arrays
    if not sample:
        return None
    prior = None
    if train_counts is not None:
        counts = np.asarray(train_counts, dtype=float)
        prior = counts / counts.sum()
    return evaluate_posthoc(sample["logits"], sample["gold"], train_prior=prior, seed=options.seed,
                            prior_source="the training labels (--train-file)" if prior is not None else "")


def diagnose_files(model_dir, data_file, options: RunOptions, on_chunk=None) -> Diagnosis:
    """Load a checkpoint, probe it over an eval file and judge the result."""
    outcome = probe_files(model_dir, data_file, options, on_chunk=on_chunk)
    return diagnosis_from_outcome(outcome, model_dir, data_file, options)


def write_fixed(outcome: ProbeOutcome, diagnosis: Diagnosis, data_file, options: RunOptions) -> dict:
    """Write the checkpoint with the measured post-hoc offsets in its classifier bias, then probe it again
    on the same data to confirm the fix (``--write-fixed``)."""
    from dataclasses import replace

    from .model_evidence import write_fixed_checkpoint

    post = diagnosis.stats.get("posthoc")
    if not post:
        raise InputError("--write-fixed needs post-hoc offsets, but the eval rows gave none "
                         "(fewer than two classes with two rows each)")
    out = Path(options.write_fixed)
    write_fixed_checkpoint(outcome.loaded.model, outcome.loaded.tokenizer, post["offsets"], out)
    again = diagnose_files(out, data_file, replace(options, write_fixed=None, progress=False))
    return {"path": str(out), "method": post["best"], "offsets": post["offsets"],
            "verdict": again.verdict(), "exit_code": again.exit_code(),
            "balanced_accuracy": again.stats["balanced_accuracy"], "macro_f1": again.stats["macro_f1"],
            "recall": {c["class"]: c["recall"] for c in again.stats["per_class"]},
            "note": "re-probed on the same eval rows the offsets were chosen on; confirm on held-out data"}
