"""Write a Diagnosis's files: the report folder (shared by the CLI and ``Diagnosis.save``), the JUnit file and the
GitHub step summary."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..outputs import FORMATS, OutputWriter


def write_report_files(writer: OutputWriter, diagnosis, fail_on: str | None = None) -> None:
    """Render every format in ``writer.formats`` (except the streamed predictions.csv) into the writer."""
    from . import plots as plotting
    from .render import render_html, render_json, render_markdown

    formats = writer.formats
    plots = plotting.all_plots(diagnosis.stats) if {"html", "png"} & formats else {}
    if "json" in formats:
        writer.write_text("summary.json", render_json(diagnosis, fail_on))
    if "md" in formats:
        writer.write_text("summary.md", render_markdown(diagnosis, fail_on))
    if "png" in formats:
        for name, png in plots.items():
            writer.write_bytes(name, png)
    if "html" in formats:
        writer.write_text("report.html", render_html(diagnosis, plots, fail_on))


def _write_predictions_frame(writer: OutputWriter, frame, class_names: list[str]) -> None:
    """predictions.csv from the rows a Python-API run kept, through the same writer the CLI streams into."""
    index = {name: i for i, name in enumerate(class_names)}
    gold = np.asarray([index[g] for g in frame["gold"]], dtype=np.int64)
    probs = frame[[f"prob_{n}" for n in class_names]].to_numpy()  # in the probe's own precision (float32)
    writer.write_predictions(frame["row_id"].to_numpy(), gold, probs, class_names)


def save_report(diagnosis, out_dir, formats=None, fail_on: str | None = None) -> Path:
    """Write the files ``collapse-detect MODEL DATA --out out_dir`` writes; all of them or none."""
    if isinstance(formats, str):
        formats = formats.split(",")
    formats = set(FORMATS) if formats is None else {str(f).strip().lower() for f in formats}
    unknown = sorted(formats - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{str(out_dir)!r} is a file; pass a folder")
    writer = OutputWriter(out_dir, formats)
    try:
        frame = getattr(diagnosis, "predictions", None)
        if frame is not None and "csv" in formats:
            _write_predictions_frame(writer, frame, diagnosis.stats["class_names"])
        write_report_files(writer, diagnosis, fail_on)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def stage_junit(path, diagnosis, fail_on: str | None = None) -> Path:
    """The JUnit file written beside ``path`` under a temporary name, to be moved into place (``os.replace``) once
    the report is: a folder where it cannot be written is found before the report lands, and a report that
    cannot land leaves no JUnit file claiming a verdict."""
    from .junit import render_junit

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render_junit(diagnosis, fail_on))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def append_step_summary(diagnosis, fail_on: str | None = None, environ=None) -> Path | None:
    """Append the Markdown summary to $GITHUB_STEP_SUMMARY when the runner sets it (GitHub Actions shows the file
    on the run's page). A summary that cannot be written is a warning: it must not change the gate's verdict."""
    from .render import render_markdown

    target = (os.environ if environ is None else environ).get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(render_markdown(diagnosis, fail_on) + "\n")
    except OSError as exc:
        print(f"Warning: cannot append to GITHUB_STEP_SUMMARY {target!r}: {exc.strerror or exc}", file=sys.stderr)
        return None
    return Path(target)
