"""Command line: parse, run, write, exit. Thin: the work is in api, probe, stats, checks and report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CollapseDetectError, InputError, describe
from .outputs import FORMATS
from .runtime import DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS, SEED_MAX

EXIT_OK, EXIT_COLLAPSE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other user mistake
        self.exit(EXIT_USAGE, f"Error: {message} (see collapse-detect --help)\n")


def _int_at_least(flag, minimum: int, expected: str, maximum: int | None = None):
    """An argparse type for an integer flag with a lower (and optional upper) bound; the message says what was
    expected."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{flag} expects {expected}, got {text!r}")
        return value
    return parse


def _positive_int(flag):
    return _int_at_least(flag, 1, "a positive integer")


def _non_negative_int(flag):
    return _int_at_least(flag, 0, "an integer >= 0")


def _formats(text):
    items = {x.strip().lower() for x in text.split(",") if x.strip()}
    unknown = sorted(items - set(FORMATS))
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"--format got {', '.join(unknown) or 'nothing'}; choose from "
                                         f"{','.join(FORMATS)}")
    return items


def _check_list(text):
    from .config import parse_check_list

    return parse_check_list(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="collapse-detect",
                description="Probe a fine-tuned classifier on an eval set and report majority-class collapse. "
                            "Exit code 0: no collapse finding at or over --fail-on; 1: collapse found; "
                            "2: bad input or usage.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"collapse-detect {__version__}")
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="folder written by save_pretrained(), or a "
                   "Trainer output_dir with checkpoint-* subfolders (not with --predictions)")
    p.add_argument("data", metavar="DATA", nargs="?", help="eval file: .csv, .tsv, .jsonl or .parquet with a text "
                   "and a label column (not with --predictions)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: reports/<model dir name>/, or "
                   "reports/<predictions file name>/)")
    p.add_argument("--text-col", metavar="C", help="text column (default: detected)")
    p.add_argument("--text-pair-col", metavar="C2", help="second text column for sentence pairs")
    p.add_argument("--label-col", metavar="L", help="gold label column (default: detected)")
    p.add_argument("--label-names", metavar="N0,N1,...",
                   help="class names for the model's ids in order, when id2label does not hold the data's names")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=DEFAULT_BATCH_ROWS, metavar="N",
                   help=f"at most N rows per batch (default {DEFAULT_BATCH_ROWS})")
    p.add_argument("--max-length", type=_positive_int("--max-length"), default=None, metavar="N",
                   help="truncate inputs to N tokens (default: the model's limit)")
    p.add_argument("--max-tokens-per-batch", type=_positive_int("--max-tokens-per-batch"),
                   default=DEFAULT_BATCH_TOKENS, metavar="N",
                   help=f"at most N padded tokens per batch, which bounds memory (default {DEFAULT_BATCH_TOKENS}; "
                        "a longer row runs alone)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None, metavar="N",
                   help="CPU threads for the model; the probe runs N batches at once, one thread each (default: "
                        "OMP_NUM_THREADS, else the physical cores available to this process, shared among "
                        "torchrun's processes on the node)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype; bf16 is faster on CPUs with AVX512-BF16/AMX and the report states its "
                        "probability drift against fp32 on a seeded sample of rows (default: fp32)")
    p.add_argument("--fail-on", choices=["warn", "fail"], default="fail",
                   help="lowest severity of a collapse finding that makes the exit code 1 (default: fail)")
    p.add_argument("--format", type=_formats, default=set(FORMATS), metavar="LIST",
                   help=f"outputs to write, comma-separated from {','.join(FORMATS)} (default: all)")
    p.add_argument("--grad-sample", type=_non_negative_int("--grad-sample"), default=0, metavar="N",
                   help="rows per class that get backward-based (ghost) gradient norms of the encoder "
                        "(default 0: head norms only, which cover every row)")
    p.add_argument("--grad-layers", type=_positive_int("--grad-layers"), default=None, metavar="N",
                   help="ghost norms over the last N encoder blocks only (default: all)")
    p.add_argument("--seed", type=_int_at_least("--seed", 0, f"an integer from 0 to {SEED_MAX}", SEED_MAX),
                   default=0, help="seed for every sample the report shows (default 0)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pytorch_model.bin checkpoints (loaded with weights_only=True) and read Trainer's "
                        "training_args.bin (without running anything it names)")
    p.add_argument("--train-file", metavar="FILE",
                   help="training data (same label column): class weights and the training prior come from its "
                        "labels instead of the eval set's")
    p.add_argument("--write-fixed", metavar="DIR",
                   help="write a copy of the checkpoint with the measured post-hoc bias offsets and re-probe it")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no verdict table")
    p.add_argument("--predictions", metavar="FILE",
                   help="judge precomputed predictions instead of a model: a file with a gold label column and "
                        "prob_<class> columns (or a predicted-label column); MODEL_DIR and DATA are then not given")
    p.add_argument("--pred-col", metavar="P", help="predicted-label column of --predictions (default: detected)")
    p.add_argument("--config", metavar="FILE", help="TOML file with the settings (default: the nearest "
                   "pyproject.toml with a [tool.collapse-detect] table, from the working directory upward)")
    p.add_argument("--set", action="append", metavar="CHECK.PARAM=VALUE", default=None,
                   help="override a check threshold, e.g. --set low_recall.floor=0.6 (repeatable)")
    p.add_argument("--only", type=_check_list, metavar="IDS", help="run only these checks (comma-separated)")
    p.add_argument("--skip", type=_check_list, metavar="IDS", help="skip these checks (comma-separated)")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML file: one test case per check that ran")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (usage errors and --help included, not raised)."""
    from .runtime import prepare_process_env

    prepare_process_env()  # before anything imports torch: OpenMP reads its wait policy once
    try:
        return _main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:  # before the run started (reading the configuration, importing torch)
        print("Error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .config import load_config, merge_check_params, parse_set

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        config = load_config(parser, argv)
    except CollapseDetectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser.set_defaults(**config.defaults)  # explicit flags still win: they replace defaults
    args = parser.parse_args(argv)
    if args.predictions is not None and (args.model_dir is not None or args.data is not None):
        parser.error(f"--predictions judges saved predictions without a model; drop MODEL_DIR and DATA "
                     f"(got {' '.join(x for x in (args.model_dir, args.data) if x)!r})")
    if args.predictions is None and (args.model_dir is None or args.data is None):
        parser.error("MODEL_DIR and DATA are required (or pass --predictions FILE to judge saved predictions "
                     "without a model)")
    try:
        args.check_params = merge_check_params(config.check_params, parse_set(args.set))
    except CollapseDetectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.config_file = str(config.path) if config.path else None
    # the values the file set (an explicit flag replaced the rest), so a message can name where a value came from
    args.from_config = {dest for dest, value in config.defaults.items() if getattr(args, dest, None) == value}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return _run(args)
    except CollapseDetectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        from .distributed import notify_failure

        notify_failure(str(exc))  # under torchrun: the other ranks stop too
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a defect of collapse-detect, not a verdict: never exit 1, which means collapse
        import traceback

        traceback.print_exc()
        message = describe(exc)[:300]
        print(f"Error: collapse-detect failed unexpectedly ({message}); nothing was judged. The traceback above "
              "is what a bug report needs", file=sys.stderr)
        from .distributed import notify_failure

        notify_failure(f"rank 0 failed unexpectedly: {message}")
        return EXIT_INTERNAL


def _run(args) -> int:
    from .api import RunOptions, diagnosis_from_outcome, probe_files, require_a_gate, write_fixed
    from . import distributed
    from .data import split_names
    from .outputs import OutputWriter, check_inputs_outside, check_writable
    from .report.render import render_terminal
    from .report.write import append_step_summary, stage_junit, write_report_files

    model_dir = Path(args.model_dir) if args.model_dir is not None else None
    default_name = model_dir.resolve().name if model_dir is not None else Path(args.predictions).stem
    out_dir = Path(args.out) if args.out else Path("reports") / (default_name or "model")
    label_names = split_names(args.label_names) if args.label_names is not None else None
    options = RunOptions(
        text_col=args.text_col, text_pair_col=args.text_pair_col, label_col=args.label_col, label_names=label_names,
        batch_size=args.batch_size, max_length=args.max_length, max_tokens_per_batch=args.max_tokens_per_batch,
        grad_sample=args.grad_sample, grad_layers=args.grad_layers, seed=args.seed,
        allow_pickle=args.allow_pickle, progress=(not args.quiet) and sys.stderr.isatty(),
        train_file=args.train_file, write_fixed=args.write_fixed,
        check_params=args.check_params, only=args.only, skip=args.skip,
        threads=args.threads, dtype=args.dtype, fail_on=args.fail_on,
        selection=(f"only/skip in {args.config_file}" if {"only", "skip"} & getattr(args, "from_config", set())
                   and args.config_file else "--only/--skip"),
    )
    # under torchrun: ranks > 0 probe their shard and hand it to rank 0, which alone checks and writes outputs
    dist = distributed.from_env()
    if dist is not None and args.predictions is not None:  # nothing to spread: rank 0 judges the file alone
        if dist.rank != 0:
            return EXIT_OK
        dist = None
    if dist is not None and dist.rank != 0:
        return distributed.follow(dist, model_dir, args.data, options, keep_predictions="csv" in args.format)
    distributed.expect_followers(dist)  # so that an error below still stops them (see notify_failure)
    # every output path is checked before any work, so a mistake costs no probe and leaves nothing behind
    def named(dest: str, flag: str) -> str:
        """A flag as the user set it: on the command line, or as a key of the config file."""
        if dest in getattr(args, "from_config", ()) and args.config_file:
            return f"{flag[2:]} (in {args.config_file}; relative paths start from the working directory)"
        return flag

    require_a_gate(args.only, args.skip, args.fail_on, selection=options.selection)
    check_writable(named("out", "--out"), out_dir, folder=True)
    check_inputs_outside(out_dir, {"--predictions": args.predictions, "DATA": args.data,
                                   "--train-file": args.train_file})
    if args.junit:
        check_writable(named("junit", "--junit"), args.junit, folder=False)
    if args.write_fixed:
        check_writable("--write-fixed", args.write_fixed, folder=True)
        if Path(args.write_fixed).is_dir() and any(Path(args.write_fixed).iterdir()):
            raise InputError(f"--write-fixed {args.write_fixed!r} exists and is not an empty folder; pass a new "
                             "folder")
    if args.train_file and not Path(args.train_file).is_file():
        raise InputError(f"{named('train_file', '--train-file')} {args.train_file!r} does not exist")
    if args.predictions is not None and args.write_fixed:
        raise InputError("--write-fixed needs a model; it cannot be used with --predictions")
    if args.predictions is not None and set(args.format) <= {"csv"}:
        raise InputError("--format csv writes predictions.csv, which a --predictions run reads instead of writing; "
                         "add html, json or md to --format")
    writer = OutputWriter(out_dir, args.format)
    try:
        if args.predictions is not None:
            from .predictions import diagnose_predictions

            # the input already is a predictions file: no predictions.csv is written again
            diagnosis = diagnose_predictions(args.predictions, options, pred_col=args.pred_col)
        elif dist is not None:
            outcome = distributed.lead(dist, model_dir, args.data, options, writer,
                                       keep_predictions="csv" in args.format)
        else:
            outcome = probe_files(
                model_dir, args.data, options,
                on_chunk=lambda chunk, probs, names: writer.write_predictions(chunk.row_ids, chunk.gold, probs,
                                                                              names))
        if args.predictions is None:
            diagnosis = diagnosis_from_outcome(outcome, model_dir, args.data, options)
            if args.write_fixed:
                diagnosis.metadata["fixed_checkpoint"] = write_fixed(outcome, diagnosis, args.data, options)
        diagnosis.metadata["fail_on"] = args.fail_on
        diagnosis.metadata["config"] = args.config_file
        diagnosis.metadata["check_params"] = args.check_params
        write_report_files(writer, diagnosis, args.fail_on)
        if args.junit:  # staged before the report lands, moved into place after it
            try:
                junit_staged = stage_junit(args.junit, diagnosis, args.fail_on)
            except OSError as exc:
                raise InputError(f"cannot write --junit {args.junit!r}: {exc.strerror or exc}") from exc
    except BaseException:
        writer.abort()
        raise
    try:
        writer.commit()
    except BaseException:
        if args.junit:
            junit_staged.unlink(missing_ok=True)
        raise
    if args.junit:
        try:
            os.replace(junit_staged, args.junit)
        except OSError as exc:
            junit_staged.unlink(missing_ok=True)
            raise InputError(f"cannot write --junit {args.junit!r}: {exc.strerror or exc}") from exc
    append_step_summary(diagnosis, args.fail_on)
    report = out_dir / "report.html" if "html" in args.format else out_dir
    if not args.quiet:
        try:
            print(render_terminal(diagnosis, report, args.fail_on), flush=True)
        except BrokenPipeError:  # piped into head & co.: the reader left; the report is written
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as exc:  # stdout full or gone: the verdict stands, the report is written
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print(f"warning: could not print the summary ({exc.strerror or exc}); the report is in "
                  f"{str(report)!r}", file=sys.stderr)
    return diagnosis.exit_code(args.fail_on)
