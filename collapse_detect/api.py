"""The library entry points: everything the CLI does, callable from Python."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from .checks import checks_selected, run_checks
from .diagnosis import Diagnosis
from .errors import InputError
from .runtime import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, SEED_MAX
from .stats import compute_stats


@dataclass
class RunOptions:
    text_col: str | None = None
    text_pair_col: str | None = None
    label_col: str | None = None
    label_names: list[str] | None = None
    batch_size: int = DEFAULT_BATCH_ROWS
    max_length: int | None = None
    max_tokens_per_batch: int | None = DEFAULT_BATCH_TOKENS
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
    threads: int | None = None      # None: chosen by runtime.choose_threads
    dtype: str = "fp32"             # or "bf16"
    fail_on: str = "fail"           # the gate's threshold: which checks can fail it
    selection: str = "only/skip"    # where only/skip came from, for messages (a flag, a config file)


def _train_counts(options: RunOptions, class_names: list[str]) -> list[int] | None:
    """Label counts of the training file (``--train-file``), for class weights and the training prior."""
    if not options.train_file:
        return None
    from .data import detect_columns, first_frame, LabelMapper

    counts = np.zeros(len(class_names), dtype=np.int64)
    first, frames = first_frame(options.train_file, options.chunk_rows, "training file (--train-file)")
    columns = detect_columns(first, options.train_file, text_col=options.text_col, label_col=options.label_col)
    mapper = LabelMapper(class_names, options.train_file, columns.label)
    start = 0
    for frame in (first, *frames):
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


def require_two_classes(stats: dict, source) -> None:
    """Refuse an eval set whose gold labels are all one class (checked as soon as the statistics exist, before
    the evidence passes): there the majority baseline is perfect and collapse cannot be judged."""
    present = [c for c in stats["per_class"] if c["support"] > 0]
    if len(present) >= 2:
        return
    only = f"is {present[0]['class']!r}" if present else "is missing"
    rows = f"{stats['n']} row" + ("s" if stats["n"] != 1 else "")
    raise InputError(f"{str(source)!r}: every gold label {only} ({rows}): on one class a model that always "
                     "predicts it cannot be told from a correct one; use an eval set with rows of at least two "
                     "classes")


def require_a_gate(only, skip, fail_on: str = "fail", not_run: dict | None = None,
                   selection: str = "only/skip") -> None:
    """Refuse a selection of checks in which none can fail the gate at ``fail_on`` (a collapse check whose
    strongest finding reaches it; with predictions, only the checks the file can feed): such a run would pass
    whatever the model does."""
    from .checks import REGISTRY, Severity, checks_selected

    threshold = Severity(fail_on).rank
    ran = checks_selected(only, skip)
    if any(REGISTRY[c].collapse and REGISTRY[c].strongest.rank >= threshold for c in ran):
        return
    cannot = [c for c in (only or []) if c in (not_run or {})]
    why = f"; {', '.join(cannot)} cannot run here ({not_run[cannot[0]]})" if cannot else ""
    raise InputError(f"{selection} leave no check that can fail the gate at --fail-on {fail_on} (running: "
                     f"{', '.join(ran) or 'none'}{why}); a gate that cannot look must not pass: select at least one "
                     "collapse check that can report at that level")


def judge(stats: dict, metadata: dict, options: RunOptions) -> Diagnosis:
    """Run the checks on computed statistics (re-judging a saved run needs nothing more)."""
    from .rootcause import infer_root_cause

    require_a_gate(options.only, options.skip, options.fail_on, metadata.get("not_run"), options.selection)
    findings = run_checks(stats, only=options.only, skip=options.skip, params=options.check_params)
    metadata["checks_run"] = checks_selected(options.only, options.skip)
    diagnosis = Diagnosis(findings, stats, metadata)
    diagnosis.root_cause = infer_root_cause(stats, collapsed=bool(diagnosis.gating_findings("fail")),
                                            params=options.check_params)
    return diagnosis


@dataclass
class ProbeOutcome:
    """What probing one checkpoint over one eval file produced, before any judgement."""

    loaded: object
    class_names: list[str]
    columns: object
    run: object
    train_counts: list[int] | None = None  # --train-file's label counts, read before the probe


def probe_files(model_dir, data_file, options: RunOptions, on_chunk=None, row_filter=None,
                sample_sync=None) -> ProbeOutcome:
    """Load a checkpoint and probe it over an eval file (or the rows ``row_filter`` keeps; ``sample_sync``:
    see ProbeOptions, for runs spread over several processes)."""
    from .checkpoint import load_checkpoint
    from .data import check_label_names, iter_chunks
    from .probe import run_probe

    import torch

    # weights missing from a checkpoint are initialised at random on load: seed it so reports repeat
    torch.manual_seed(options.seed)
    loaded = load_checkpoint(model_dir, allow_pickle=options.allow_pickle)
    class_names = loaded.class_names
    if options.label_names:
        class_names = check_label_names(options.label_names, "--label-names", len(class_names))
    columns, chunks = iter_chunks(data_file, class_names, text_col=options.text_col,
                                  text_pair_col=options.text_pair_col, label_col=options.label_col,
                                  chunk_rows=options.chunk_rows, row_filter=row_filter)
    train_counts = _train_counts(options, class_names)  # a bad training file fails before the probe
    callback = None if on_chunk is None else (lambda chunk, probs: on_chunk(chunk, probs, class_names))
    from .runtime import apply_threads

    runtime = apply_threads(options.threads)
    probe_options = probe_options_for(options)
    probe_options.sample_sync = sample_sync
    probe_options.workers = runtime["threads"]  # one batch per chosen thread (probe.BatchRunner)
    run = run_probe(loaded.model, loaded.tokenizer, chunks, class_names, probe_options, on_chunk=callback)
    run.runtime.update(runtime)
    return ProbeOutcome(loaded, class_names, columns, run, train_counts)


def probe_options_for(options: RunOptions):
    """The probe's share of the run options (one place, for files and for in-memory models)."""
    from .probe import ProbeOptions

    return ProbeOptions(batch_size=options.batch_size, max_length=options.max_length,
                        max_tokens_per_batch=options.max_tokens_per_batch,
                        grad_sample=options.grad_sample, grad_layers=options.grad_layers,
                        seed=options.seed, progress=options.progress, dtype=options.dtype)


def diagnosis_from_outcome(outcome: ProbeOutcome, model_dir, data_file, options: RunOptions) -> Diagnosis:
    """Statistics, evidence and checks for a finished probe (after any merge across processes)."""
    from .runtime import one_blas_thread

    with one_blas_thread():  # small matrices from here on (runtime.one_blas_thread)
        return _diagnosis_from_outcome(outcome, model_dir, data_file, options)


def _diagnosis_from_outcome(outcome: ProbeOutcome, model_dir, data_file, options: RunOptions) -> Diagnosis:
    run, loaded, columns = outcome.run, outcome.loaded, outcome.columns
    if run.rows == 0:
        raise InputError(f"data file {str(data_file)!r} has no rows")
    stats = compute_stats(run.accumulator)
    require_two_classes(stats, data_file)
    stats["model"] = {"generic_label_names": loaded.generic_label_names and not options.label_names,
                      "train_counts": outcome.train_counts}
    from .probe import model_max_length

    stats["tokenization"] = {
        "max_length": run.max_length, "model_max_length": model_max_length(loaded.model, loaded.tokenizer, None),
        "requested_max_length": options.max_length, "tokens": run.tokens, "padded_tokens": run.padded_tokens,
        "truncated_rows": run.truncated_rows, "truncation_rate": run.truncated_rows / run.rows,
        "unknown_tokens": run.unknown_tokens, "unknown_token_rate": run.unknown_tokens / max(run.tokens, 1),
    }
    metadata = {
        "model_dir": str(model_dir), "model_name": Path(model_dir).resolve().name,
        "checkpoint": str(loaded.resolved.path) if loaded.resolved.path else None,
        "checkpoint_reason": loaded.resolved.reason,
        "weights_file": loaded.weights_file, "architecture": type(loaded.model).__name__,
        "data_file": str(data_file), "train_file": str(options.train_file) if options.train_file else None,
        "columns": {"text": columns.text, "text_pair": columns.text_pair, "label": columns.label},
        "rows": run.rows, "seed": options.seed, "probe_seconds": round(run.seconds, 3),
        "grad_seconds": round(run.grad_seconds, 3),
        "versions": _versions(), "notes": list(loaded.notes) + run.notes,
        **run.runtime, "dtype": run.dtype,
    }
    if options.max_length and options.max_length > run.max_length:
        metadata["notes"].append(f"--max-length {options.max_length} is above what the model reads: inputs were cut "
                                 f"at {run.max_length} tokens (its position embeddings or its tokenizer's limit).")
    if run.drift is not None:
        from .probe import drift_summary
        from .report.render import drift_sentence

        drift = drift_summary(run.drift, len(outcome.class_names))
        metadata["dtype_drift"] = drift
        if drift:
            metadata["notes"].append(drift_sentence(run.dtype, drift))
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
    args_file = loaded.resolved.path / "training_args.bin" if loaded.resolved.path else None
    if args_file is not None and args_file.is_file():
        evidence["training_args"] = _training_args(args_file, options.allow_pickle)
    threads = outcome.run.runtime.get("threads", 1)  # as the probe ran (BatchRunner's workers)
    if "features" in sample:
        evidence["linear_probe"] = analysis.linear_probe(sample["features"], sample["gold"], seed=options.seed,
                                                         threads=threads)
        evidence["geometry"] = analysis.representation_geometry(sample["features"])
    batching = {"batch_size": options.batch_size, "max_tokens": options.max_tokens_per_batch, "workers": threads}
    evidence["null_input"] = model_evidence.null_input_probe(loaded.model, loaded.tokenizer, acc,
                                                             outcome.class_names, seed=options.seed,
                                                             batching=batching,
                                                             reuse_probe=outcome.run.dtype == "fp32")
    evidence["head"] = model_evidence.head_state(loaded.model, loaded.missing_keys, stats["label_prior"])
    evidence["tokenizer_fit"] = model_evidence.tokenizer_fit(loaded.model, loaded.tokenizer)
    return evidence


TRAINING_ARG_FIELDS = ("learning_rate", "weight_decay", "warmup_steps", "warmup_ratio", "num_train_epochs",
                       "max_steps", "per_device_train_batch_size", "eval_strategy", "evaluation_strategy",
                       "save_strategy", "load_best_model_at_end", "metric_for_best_model", "max_grad_norm",
                       "lr_scheduler_type", "seed")


def _training_args(path: Path, allow_pickle: bool) -> dict:
    """The training arguments Trainer saved. The file is a pickle: it is read only with --allow-pickle, and then
    without importing or running anything it names (checkpoint.read_saved_object)."""
    if not allow_pickle:
        return {"read": False, "file": str(path),
                "note": "training_args.bin is a pickle and was not read; pass --allow-pickle to read it"}
    from .checkpoint import read_saved_object

    try:
        saved = read_saved_object(path)
    except (OSError, ValueError) as exc:  # a foreign or damaged file is evidence we lack, not a reason to stop
        return {"read": False, "file": str(path), "note": f"could not read training_args.bin: {exc}"}
    if not isinstance(saved, dict):
        return {"read": False, "file": str(path), "note": "training_args.bin does not hold an object with fields"}
    return {"read": True, "file": str(path),
            **{name: _saved_scalar(saved[name]) for name in TRAINING_ARG_FIELDS if name in saved}}


def _saved_scalar(value):
    """A field of training_args.bin as the report shows it: finite numbers below 2**53 as numbers, the rest as
    (short) text, so a crafted value cannot break the JSON or the arithmetic that reads it."""
    import math

    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if not isinstance(value, str):  # a list or dict: its repr can be gigabytes (one long string referred to often)
        import reprlib

        short = reprlib.Repr()
        short.maxstring = short.maxother = 60
        value = short.repr(value)
    return value if len(value) <= 200 else value[:200] + "..."


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
    existed = out.exists()  # checked beforehand to be new or empty
    before = set(out.iterdir()) if out.is_dir() else set()  # whatever appeared there since is left alone
    try:
        write_fixed_checkpoint(outcome.loaded.model, outcome.loaded.tokenizer, post["offsets"], out)
    except BaseException as exc:  # a full disk (safetensors' own error type), a refusing file system, Ctrl-C
        _remove_written(out, before, remove_folder=not existed)
        if not isinstance(exc, Exception):
            raise
        text = str(exc).strip()
        reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
        raise InputError(f"cannot write --write-fixed {str(out)!r}: {reason}") from exc
    again = diagnose_files(out, data_file, replace(options, write_fixed=None, progress=False))
    return {"path": str(out), "method": post["best"], "offsets": post["offsets"],
            "verdict": again.verdict(), "exit_code": again.exit_code(),
            "balanced_accuracy": again.stats["balanced_accuracy"], "macro_f1": again.stats["macro_f1"],
            "recall": {c["class"]: c["recall"] for c in again.stats["per_class"]},
            "note": "re-probed on the same eval rows the offsets were chosen on; confirm on held-out data"}


def _remove_written(folder: Path, before: set, *, remove_folder: bool) -> None:
    """Leave nothing of a half-written folder: what this run wrote in it, and the folder when the run made it."""
    import shutil

    if remove_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in set(folder.iterdir() if folder.is_dir() else ()) - before:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _trainer_state(value) -> tuple[dict | None, Path | None]:
    """diagnose()'s ``trainer_state``: None, a path to trainer_state.json, a dict, or a transformers
    TrainerState (anything with ``log_history``)."""
    import json

    if value is None:
        return None, None
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            return json.loads(path.read_text(encoding="utf-8")), path
        except (OSError, ValueError) as exc:
            raise InputError(f"trainer_state {str(path)!r} cannot be read as JSON: {exc}") from None
    if isinstance(value, dict):
        return value, None
    if is_dataclass(value) and hasattr(value, "log_history"):  # transformers' TrainerState
        return asdict(value), None
    raise InputError(f"trainer_state must be a path, a dict or a TrainerState, got {type(value).__name__}")


def _check_api_numbers(**values) -> None:
    """diagnose()'s numeric keywords: integers at or above a floor (``None`` where allowed), as the command
    line checks its flags."""
    for name, (value, floor, optional) in values.items():
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < floor:
            allowed = " or None" if optional else ""
            raise InputError(f"{name} must be an integer >= {floor}{allowed}, got {value!r}")


def diagnose(model, tokenizer, texts, labels=None, *, text_pairs=None, text_col=None, text_pair_col=None,
             label_col=None, label_names=None, batch_size: int = DEFAULT_BATCH_ROWS, max_length: int | None = None,
             max_tokens_per_batch: int | None = DEFAULT_BATCH_TOKENS, grad_sample: int = 0,
             grad_layers: int | None = None, seed: int = 0, check_params: dict | None = None, only=None, skip=None,
             fail_on: str = "fail", keep_predictions: bool = True, progress: bool = False,
             threads: int | None = None, trainer_state=None) -> Diagnosis:
    """Probe an in-memory model on in-memory rows and judge it: the same ``Diagnosis`` the CLI renders.

    ``texts`` is a list of strings (with ``labels``: class names or ids, and optionally ``text_pairs``), or a
    pandas DataFrame whose text and label columns are detected as in a data file (or named by ``text_col``,
    ``text_pair_col``, ``label_col``). ``check_params`` maps check id to thresholds, as in
    ``[tool.collapse-detect.checks]``; ``only``/``skip`` are check ids. The model's training mode is restored
    afterwards. ``threads``: batches probed at once, one thread each, for a model on the CPU (default: as the
    CLI chooses, see runtime.choose_threads); torch's thread setting is back afterwards. ``trainer_state``: the
    run's ``trainer_state.json`` (a path, or ``trainer.state`` / a dict), read as the CLI reads the one beside
    a checkpoint (learning rate, divergence, evaluation).
    ``Diagnosis.save(folder)`` writes the CLI's files; in a notebook the result shows as a compact HTML summary.

    >>> diagnosis = collapse_detect.diagnose(model, tokenizer, ["a great match", "shares fall"],
    ...                                      ["sports", "business"])          # doctest: +SKIP
    >>> diagnosis.verdict(), diagnosis.exit_code()                           # doctest: +SKIP
    """
    import pandas as pd

    from .checkpoint import GENERIC_LABEL, LoadedCheckpoint, ResolvedCheckpoint
    from .config import check_param, parse_check_list
    from .data import Chunk, Columns, LabelMapper, check_label_names, column_texts, detect_columns, split_names
    from .errors import ConfigError
    from .probe import run_probe
    from .runtime import choose_threads

    if fail_on not in ("warn", "fail"):
        raise ValueError(f"fail_on must be 'warn' or 'fail', got {fail_on!r}")
    _check_api_numbers(batch_size=(batch_size, 1, False), max_length=(max_length, 1, True),
                       max_tokens_per_batch=(max_tokens_per_batch, 1, True), grad_sample=(grad_sample, 0, False),
                       grad_layers=(grad_layers, 1, True), threads=(threads, 1, True), seed=(seed, 0, False))
    if seed > SEED_MAX:
        raise InputError(f"seed must be in 0..{SEED_MAX}, got {seed}")
    if not hasattr(model, "config") or not callable(model):
        raise InputError(f"model must be a loaded transformers model, got {type(model).__name__} (for a folder, "
                         "run the collapse-detect command or load it with from_pretrained)")
    if tokenizer is None or not callable(tokenizer):
        raise InputError(f"tokenizer must be a loaded tokenizer, got {type(tokenizer).__name__}")
    from .checkpoint import check_judgeable
    from .gradnorm import find_head

    try:
        head = find_head(model)
    except ValueError as exc:
        raise InputError(f"cannot find the model's classification head: {exc}") from None
    check_judgeable(model, head, f"the model ({type(model).__name__})")
    if isinstance(label_names, str):  # "a,b,c", as the command line takes it
        label_names = split_names(label_names)
    if labels is not None and hasattr(labels, "tolist") and not isinstance(labels, pd.Series):
        labels = labels.tolist()  # a torch tensor or numpy array of ids
    source = "DataFrame" if isinstance(texts, pd.DataFrame) else "texts"
    if isinstance(texts, pd.DataFrame):
        if labels is not None or text_pairs is not None:
            raise InputError("pass either a DataFrame (its columns hold texts and labels) or texts with labels, "
                             "not both")
        frame = texts.reset_index(drop=True)
        columns = detect_columns(frame, "DataFrame", text_col=text_col, text_pair_col=text_pair_col,
                                 label_col=label_col)
    else:
        if labels is None:
            raise InputError("diagnose() needs the gold labels: diagnose(model, tokenizer, texts, labels)")
        if isinstance(texts, str):
            raise InputError("texts must be a list of strings or a DataFrame, got one string")
        try:
            texts = list(texts)
        except TypeError:
            raise InputError(f"texts must be a list of strings or a DataFrame, got {type(texts).__name__}") from None
        data = {"text": texts, "label": list(labels)}
        if len(data["label"]) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(data['label'])} labels; pass one label per text")
        if text_pairs is not None:
            data["text_pair"] = list(text_pairs)
            if len(data["text_pair"]) != len(texts):
                raise InputError(f"{len(texts)} texts but {len(data['text_pair'])} text pairs")
        frame = pd.DataFrame(data)
        columns = Columns(text="text", label="label", text_pair="text_pair" if text_pairs is not None else None)
    if len(frame) == 0:
        raise InputError(f"no rows to diagnose (empty {source})")

    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    num_labels = int(getattr(model.config, "num_labels", len(id2label)))
    class_names = [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)]
    generic = all(GENERIC_LABEL.match(n) for n in class_names)
    if label_names:
        class_names = check_label_names(label_names, "label_names", len(class_names))

    params: dict = {}
    for check_id, values in (check_params or {}).items():
        for param, value in values.items():
            params.setdefault(check_id.replace("-", "_"), {})[param.replace("-", "_")] = \
                check_param(check_id, param, value, "check_params")
    selected = {}
    for name, value in (("only", only), ("skip", skip)):
        if value is None:
            continue
        try:
            selected[name] = parse_check_list(value if isinstance(value, str) else ",".join(value))
        except Exception as exc:  # argparse's type error, here for a keyword argument
            raise ConfigError(f"{name}: {exc}") from None

    require_a_gate(selected.get("only"), selected.get("skip"), fail_on)  # before any probing
    options = RunOptions(text_col=columns.text, text_pair_col=columns.text_pair, label_col=columns.label,
                         label_names=label_names, batch_size=batch_size, max_length=max_length,
                         max_tokens_per_batch=max_tokens_per_batch, grad_sample=grad_sample,
                         grad_layers=grad_layers, seed=seed, progress=progress, check_params=params,
                         only=selected.get("only"), skip=selected.get("skip"), fail_on=fail_on)
    mapper = LabelMapper(class_names, source, columns.label)
    row_ids = np.arange(len(frame), dtype=np.int64)
    gold = mapper(frame[columns.label], row_ids)

    all_texts = column_texts(frame, columns.text, source, row_ids, "text_col")
    all_pairs = (column_texts(frame, columns.text_pair, source, row_ids, "text_pair_col")
                 if columns.text_pair else None)
    step = options.chunk_rows
    chunks = [Chunk(row_ids[i:i + step], all_texts[i:i + step], None if all_pairs is None else all_pairs[i:i + step],
                    gold[i:i + step]) for i in range(0, len(frame), step)]
    kept: list = []

    def keep(chunk, probs):
        if keep_predictions:
            kept.append((chunk.row_ids, chunk.gold, np.asarray(probs)))

    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    state, state_path = _trainer_state(trainer_state)
    resolved = ResolvedCheckpoint(None, None, "in-memory model passed to collapse_detect.diagnose()",
                                  trainer_state=state, trainer_state_path=state_path)
    loaded = LoadedCheckpoint(model, tokenizer, class_names, generic, resolved, weights_file=None)
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    try:  # the probe and the model evidence run in eval mode; a notebook's training loop gets its mode back
        probe_options = probe_options_for(options)
        runtime = {"threads": 1, "threads_reason": "model not on the CPU"}
        if all(p.device.type == "cpu" for p in model.parameters()):
            n, why = choose_threads(threads)
            runtime = {"threads": n, "threads_reason": "diagnose(threads=...)" if threads else why}
        probe_options.workers = runtime["threads"]  # one batch per thread (probe.BatchRunner)
        run = run_probe(model, tokenizer, chunks, class_names, probe_options, on_chunk=keep)
        run.runtime.update(runtime)
        outcome = ProbeOutcome(loaded, class_names, columns, run)
        diagnosis = diagnosis_from_outcome(outcome, name, f"({source}, {len(frame)} rows)", options)
    finally:  # every submodule's own mode (a notebook may hold part of the model in eval mode)
        for module, training in modes:
            module.training = training
    diagnosis.metadata.update({
        "mode": "python-api", "model_dir": name, "model_name": Path(name).name or name, "fail_on": fail_on,
        "check_params": params,
    })
    if kept:
        ids = np.concatenate([k[0] for k in kept])
        gold_ids = np.concatenate([k[1] for k in kept])
        probs = np.concatenate([k[2] for k in kept])
        pred = probs.argmax(axis=1)
        table = {"row_id": ids, "gold": [class_names[g] for g in gold_ids],
                 "predicted": [class_names[p] for p in pred]}
        table.update({f"prob_{n}": probs[:, c] for c, n in enumerate(class_names)})
        diagnosis.predictions = pd.DataFrame(table)
    return diagnosis
