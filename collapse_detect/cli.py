"""Command line: parse, run, write, exit. Thin: the work is in api, probe, stats, checks and report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CollapseDetectError, InputError
from .outputs import FORMATS

EXIT_OK, EXIT_COLLAPSE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other user mistake
        self.exit(EXIT_USAGE, f"Error: {message} (see collapse-detect --help)\n")


def _positive_int(flag):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} expects a positive integer, got {text!r}")
        return value
    return parse


def _non_negative_int(flag):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer >= 0, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer >= 0, got {text!r}")
        return value
    return parse


def _formats(text):
    items = {x.strip().lower() for x in text.split(",") if x.strip()}
    unknown = sorted(items - set(FORMATS))
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"--format got {', '.join(unknown) or 'nothing'}; choose from "
                                         f"{','.join(FORMATS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="collapse-detect",
                description="Probe a fine-tuned classifier on an eval set and report majority-class collapse. "
                            "Exit code 0: no collapse finding at or over --fail-on; 1: collapse found; "
                            "2: bad input or usage.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained(), or a Trainer "
                   "output_dir with checkpoint-* subfolders")
    p.add_argument("data", metavar="DATA", help="eval file: .csv, .tsv, .jsonl or .parquet with a text and a "
                   "label column")
    p.add_argument("--out", metavar="DIR", help="report folder (default: reports/<model dir name>/)")
    p.add_argument("--text-col", metavar="C", help="text column (default: detected)")
    p.add_argument("--text-pair-col", metavar="C2", help="second text column for sentence pairs")
    p.add_argument("--label-col", metavar="L", help="gold label column (default: detected)")
    p.add_argument("--label-names", metavar="N0,N1,...",
                   help="class names for the model's ids in order, when id2label does not hold the data's names")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32, metavar="N")
    p.add_argument("--max-length", type=_positive_int("--max-length"), default=None, metavar="N",
                   help="truncate inputs to N tokens (default: the model's limit)")
    p.add_argument("--max-tokens-per-batch", type=_positive_int("--max-tokens-per-batch"), default=None,
                   metavar="N", help="cap padded tokens per batch (bounds memory)")
    p.add_argument("--fail-on", choices=["warn", "fail"], default="fail",
                   help="lowest severity of a collapse finding that makes the exit code 1 (default: fail)")
    p.add_argument("--format", type=_formats, default=set(FORMATS), metavar="LIST",
                   help=f"outputs to write, comma-separated from {','.join(FORMATS)} (default: all)")
    p.add_argument("--grad-sample", type=_non_negative_int("--grad-sample"), default=0, metavar="N",
                   help="rows per class that get backward-based (ghost) gradient norms of the encoder "
                        "(default 0: head norms only, which cover every row)")
    p.add_argument("--grad-layers", type=_positive_int("--grad-layers"), default=None, metavar="N",
                   help="ghost norms over the last N encoder blocks only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed for every sample the report shows (default 0)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pytorch_model.bin checkpoints (loaded with weights_only=True)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no verdict table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return _run(args)
    except CollapseDetectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from .api import RunOptions, diagnose_files
    from .outputs import OutputWriter
    from .report import plots as plotting
    from .report.render import render_html, render_json, render_markdown, render_terminal

    model_dir = Path(args.model_dir)
    out_dir = Path(args.out) if args.out else Path("reports") / (model_dir.resolve().name or "model")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {str(out_dir)!r} is a file; pass a folder")
    label_names = [x.strip() for x in args.label_names.split(",")] if args.label_names else None
    options = RunOptions(
        text_col=args.text_col, text_pair_col=args.text_pair_col, label_col=args.label_col, label_names=label_names,
        batch_size=args.batch_size, max_length=args.max_length, max_tokens_per_batch=args.max_tokens_per_batch,
        grad_sample=args.grad_sample, grad_layers=args.grad_layers, seed=args.seed,
        allow_pickle=args.allow_pickle, progress=(not args.quiet) and sys.stderr.isatty(),
    )
    writer = OutputWriter(out_dir, args.format)
    try:
        diagnosis = diagnose_files(
            model_dir, args.data, options,
            on_chunk=lambda chunk, probs, names: writer.write_predictions(chunk.row_ids, chunk.gold, probs, names))
        diagnosis.metadata["fail_on"] = args.fail_on
        plots = plotting.all_plots(diagnosis.stats) if {"html", "png"} & args.format else {}
        if "json" in args.format:
            writer.write_text("summary.json", render_json(diagnosis, args.fail_on))
        if "md" in args.format:
            writer.write_text("summary.md", render_markdown(diagnosis, args.fail_on))
        if "png" in args.format:
            for name, png in plots.items():
                writer.write_bytes(name, png)
        if "html" in args.format:
            writer.write_text("report.html", render_html(diagnosis, plots, args.fail_on))
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    report = out_dir / "report.html" if "html" in args.format else out_dir
    if not args.quiet:
        print(render_terminal(diagnosis, report, args.fail_on))
    return diagnosis.exit_code(args.fail_on)
