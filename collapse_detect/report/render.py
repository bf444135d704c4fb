"""Renderers: JSON, Markdown, HTML (Jinja2, autoescaped, plots embedded), terminal table. They read a
Diagnosis and nothing else."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from ..checks import REGISTRY, Severity, listed
from ..diagnosis import Diagnosis
from ..stats import classes_to_show

_env = Environment(loader=PackageLoader("collapse_detect", "report/templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True,
                   lstrip_blocks=True)
_env.filters["pct"] = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
_env.filters["num"] = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"


def _plain_value(value) -> str:
    """A metadata value as a reader writes it: none for None, a list as its items, a table as key: value pairs
    (its unset entries left out), not Python's repr."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain_value(v)}" for k, v in value.items() if v is not None) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain_value(v) for v in value) or "none"
    return str(value)


_env.filters["plain"] = _plain_value

SEVERITY_ICON = {"error": "ERROR", "fail": "FAIL", "warn": "WARN", "info": "INFO"}


def render_json(diagnosis: Diagnosis, fail_on: str | None = None) -> str:
    return diagnosis.to_json(fail_on) + "\n"


# Control characters (newlines, ESC, ...) from a class name or a data file would start a new Markdown block or
# drive the terminal: they are shown as escapes instead.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Markdown's inline syntax: a class name like "[x](javascript:...)" or "![i](http://...)" must stay text
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~<>&])")


def visible(text) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``), for the terminal and Markdown."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _md_escape(text: str) -> str:
    """Text for Markdown: no HTML, no links or images, no emphasis, code spans or table cells from the data;
    every such character is backslash-escaped (CommonMark), so the plain text stays readable ("-\\>")."""
    return _MD_SPECIAL.sub(r"\\\1", visible(text))  # backslash escapes: "\<" shows "<" and starts no HTML


def _md_code(text) -> str:
    """An inline code span (paths): backslash escapes do not work inside one, so the fence outgrows the text's
    own backticks instead."""
    text = visible(text)
    longest = max((len(m) for m in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_code_block(code: str, lang: str = "python") -> list[str]:
    """A fenced block whose fence is longer than any backtick run inside the code, so the code cannot end it."""
    longest = max((len(m) for m in re.findall("`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{lang}", code, fence]


def render_markdown(diagnosis: Diagnosis, fail_on: str | None = None) -> str:
    s = diagnosis.stats
    d = diagnosis.to_dict(fail_on)
    meta = diagnosis.metadata
    lines = [f"# collapse-detect: {d['verdict']}", ""]
    if meta.get("predictions_file"):
        lines.append(f"- Predictions: {_md_code(meta['predictions_file'])} ({s['n']} rows, {s['k']} classes; "
                     f"{_md_escape(meta.get('scores', ''))}; no model was run)  ")
    else:
        lines.append(f"- Model: {_md_code(meta.get('model_dir', '?'))}  ")
        lines.append(f"- Data: {_md_code(meta.get('data_file', '?'))} ({s['n']} rows, {s['k']} classes)  ")
    worst = d["worst_class"]
    if worst:
        lines.append(f"- Worst class: **{_md_escape(worst['class'])}** (recall {worst['recall']:.2f}, "
                     f"n={worst['support']})  ")
    lines.append(f"- Accuracy {s['accuracy']:.3f} (majority baseline {s['majority_baseline']['accuracy']:.3f}), "
                 f"balanced accuracy {s['balanced_accuracy']:.3f}, macro F1 {s['macro_f1']:.3f}, "
                 f"MCC {s['mcc']:.3f}")
    cal = s.get("calibration") or {}
    if cal.get("ece") is not None:
        temp = cal.get("temperature")
        mass = cal.get("ece_equal_mass")
        lines.append(f"- Calibration: ECE {cal['ece']:.3f} (equal-width bins)"
                     + (f", {mass:.3f} (equal-mass bins)" if mass is not None else "")
                     + (f"; fitted temperature {temp['value']:.2f}" if temp else ""))
    if diagnosis.root_cause:
        rc = diagnosis.root_cause
        lines.append(f"- Likely cause: **{_md_escape(rc['label'])}** (confidence {rc['confidence']})")
        lines += [f"  - for: {_md_escape(e)}" for e in rc.get("evidence_for", [])]
        lines += [f"  - against: {_md_escape(e)}" for e in rc.get("evidence_against", [])]
    if meta.get("fixed_checkpoint"):
        lines.append(f"- {_md_escape(fixed_checkpoint_line(meta['fixed_checkpoint']))}")
    precision = precision_line(meta)
    if precision:
        lines.append(f"- {_md_escape(precision)}")
    lines += ["", "## Findings", ""]
    if not diagnosis.findings:
        lines.append("No findings.")
    for f in diagnosis.findings:
        lines.append(f"- **{SEVERITY_ICON[f.severity.value]}** `{f.check_id}`: {_md_escape(f.summary)}")
        if f.cause:
            lines.append(f"  - Likely cause: {_md_escape(f.cause)}")
        if f.fix:
            lines.append(f"  - Fix: {_md_escape(f.fix.title)}")
    lines += ["", "## Per class", "",
              "| class | support | prior | predicted share | precision | recall | F1 | ROC-AUC |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in s["per_class"]:
        auc = "n/a" if c["roc_auc"] is None else f"{c['roc_auc']:.3f}"
        lines.append(f"| {_md_escape(c['class'])} | {c['support']} | {c['prior']:.3f} | "
                     f"{c['prediction_share']:.3f} | {c['precision']:.3f} | {c['recall']:.3f} | "
                     f"{c['f1']:.3f} | {auc} |")
    for fix in ordered_fixes(diagnosis):
        lines += ["", f"## Fix: {_md_escape(fix.title)}", ""]
        lines += [f"- {_md_escape(step)}" for step in fix.steps]
        if fix.code:
            lines += ["", *_md_code_block(fix.code.rstrip())]
    return "\n".join(lines) + "\n"


def ordered_fixes(diagnosis: Diagnosis) -> list:
    """Distinct fixes of the findings, the one for the likely root cause first. When another cause is named
    with high confidence, the class-weight retraining that the imbalance-shaped findings carry is left out:
    a diverged run, a random head or a permuted id2label looks imbalanced from outside, and weights do not
    mend it (each finding still names its own fix)."""
    from ..fixes import IMBALANCE_FIX_TITLE, Fix

    fixes = []
    rc = diagnosis.root_cause or {}
    rc_fix = rc.get("fix")
    if rc_fix:  # the root cause's own (it names the run's peak learning rate; a finding's copy may not)
        fixes.append(Fix(**rc_fix))
    other_cause = rc.get("confidence") == "high" and rc.get("cause") not in (None, "uncertain", "class_imbalance")
    for f in diagnosis.findings:
        if other_cause and f.fix and f.fix.title == IMBALANCE_FIX_TITLE:
            continue
        if f.fix and all(f.fix.title != x.title for x in fixes):
            fixes.append(f.fix)
    return fixes


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(diagnosis: Diagnosis, plots: dict[str, bytes], fail_on: str | None = None) -> str:
    d = diagnosis.to_dict(fail_on)
    fixes = ordered_fixes(diagnosis)
    template = _env.get_template("report.html.j2")
    return template.render(
        d=d, s=diagnosis.stats, meta=diagnosis.metadata, findings=diagnosis.findings, fixes=fixes,
        plots=[(name, _data_uri(png)) for name, png in plots.items()],
        checks=REGISTRY, icon=SEVERITY_ICON,
    )


def render_compact_html(diagnosis: Diagnosis) -> str:
    return _env.get_template("compact.html.j2").render(d=diagnosis.to_dict(), s=diagnosis.stats,
                                                       findings=diagnosis.findings, icon=SEVERITY_ICON)


def drift_sentence(dtype: str, drift: dict | None) -> str:
    """The reduced-precision run and its measured drift, as the report, the terminal and summary.md say it."""
    if not drift:
        return f"Probed in {dtype} (no fp32 rows to measure the drift)."
    return (f"Probed in {dtype}: on {drift['rows']} seeded rows probed in fp32 too, probabilities differ by at most "
            f"{drift['max_abs_prob_diff']:.2g} (mean {drift['mean_abs_prob_diff']:.2g}) and the predicted class "
            f"agrees on {100 * drift['prediction_agreement']:.1f}%.")


def precision_line(meta: dict) -> str | None:
    """The probe's reduced precision and its measured drift against fp32, or None for an fp32 run."""
    dtype = meta.get("dtype")
    return None if not dtype or dtype == "fp32" else drift_sentence(dtype, meta.get("dtype_drift"))


def fixed_checkpoint_line(fixed: dict) -> str:
    """What --write-fixed wrote and what its re-probe found."""
    return (f"Fixed checkpoint ({fixed['method'].replace('_', ' ')}): {fixed['path']}: {fixed['verdict']}, "
            f"balanced accuracy {fixed['balanced_accuracy']:.3f}, macro F1 {fixed['macro_f1']:.3f} on the same "
            "eval rows the offsets were chosen on; confirm on held-out data.")


def render_terminal(diagnosis: Diagnosis, report_path: Path | None, fail_on: str | None = None) -> str:
    """The short verdict the terminal shows."""
    d = diagnosis.to_dict(fail_on)
    s = diagnosis.stats
    out = [f"collapse-detect: {d['verdict']}  ({s['n']} rows, {s['k']} classes; accuracy {s['accuracy']:.3f}, "
           f"balanced accuracy {s['balanced_accuracy']:.3f}, majority baseline {s['majority_baseline']['accuracy']:.3f})"]
    if d["collapsed_classes"]:
        out.append("collapsed class(es): " + listed(d["collapsed_classes"], ", "))
    rc = diagnosis.root_cause
    precision = precision_line(diagnosis.metadata)
    if precision:
        out.append(precision)
    if rc:
        best = (f"; best scored: {rc['candidates'][0]['label']} ({rc['candidates'][0]['score']:.2f})"
                if rc["cause"] == "uncertain" and rc.get("candidates") else "")
        out.append(f"likely cause: {rc['label']} (confidence {rc['confidence']}{best})")
    shown = classes_to_show(s)
    names = {i: visible(s["per_class"][i]["class"]) for i in shown}  # widths as printed, escapes included
    width = min(max([len(n) for n in names.values()] + [5]), 24)
    out.append("")
    out.append(f"  {'class':<{width}}  {'support':>7}  {'prior':>6}  {'pred':>6}  {'recall':>6}  {'F1':>5}")
    for i in shown:
        c, name = s["per_class"][i], names[i]
        name = name if len(name) <= width else name[: width - 1] + "~"
        out.append(f"  {name:<{width}}  {c['support']:>7}  {c['prior']:>6.3f}  {c['prediction_share']:>6.3f}  "
                   f"{c['recall']:>6.3f}  {c['f1']:>5.3f}")
    if len(shown) < s["k"]:
        out.append(f"  ({len(shown)} of {s['k']} classes, the largest by gold or predicted rows; every class is in "
                   "summary.md and report.html)")
    out.append("")
    for f in diagnosis.findings:
        out.append(f"  [{SEVERITY_ICON[f.severity.value]:<5}] {f.check_id}: {f.summary}")
    if not diagnosis.findings:
        out.append("  no findings")
    if diagnosis.metadata.get("fixed_checkpoint"):
        out.append("")
        out.append(fixed_checkpoint_line(diagnosis.metadata["fixed_checkpoint"]))
    if report_path is not None:
        out.append("")
        out.append(f"report: {report_path}")
    return "\n".join(visible(line) for line in out)


def severity_rank(name: str) -> int:
    return Severity(name).rank
