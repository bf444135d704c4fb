"""Plots as PNG bytes (matplotlib, Agg backend, no global state left behind)."""

from __future__ import annotations

import io
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..stats import MAX_CLASSES, classes_to_show  # noqa: E402
from .render import visible  # noqa: E402

COLORS = {"prior": "#9aa5b1", "pred": "#d64545", "ok": "#3f8f5a", "bad": "#d64545", "base": "#555"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _labels(names: list[str], width: int = 18) -> list[str]:
    """Class names as tick labels: control characters escaped, cut to ``width``, and ``$`` kept literal (two
    of them would start matplotlib's math mode, which can fail to parse)."""
    names = [visible(n) for n in names]
    return [(n if len(n) <= width else n[: width - 1] + "…").replace("$", r"\$") for n in names]


def _shown(stats: dict, limit: int = MAX_CLASSES, by: str = "gold or predicted") -> tuple[np.ndarray, str]:
    """The classes a plot draws and a title line saying so (stats.classes_to_show)."""
    ids = classes_to_show(stats, limit, by)
    k = len(stats["per_class"])
    return ids, "" if len(ids) == k else f"\n{limit} of {k} classes, largest by {by} rows"


def _width(n: int) -> float:
    return max(5.0, 0.7 * n + 2)


def _class_ticks(ax, positions, names: list[str]) -> None:
    """Class names under a bar or box plot, slanted once there are more than four."""
    slant = len(names) > 4
    ax.set_xticks(positions, names, rotation=30 if slant else 0, ha="right" if slant else "center")


def prior_vs_predicted(stats: dict) -> bytes:
    ids, note = _shown(stats)
    names = _labels([stats["class_names"][i] for i in ids])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(_width(len(names)), 3.4))
    ax.bar(x - 0.2, np.asarray(stats["label_prior"])[ids], 0.4, label="label prior (gold)", color=COLORS["prior"])
    ax.bar(x + 0.2, np.asarray(stats["prediction_share"])[ids], 0.4, label="predicted share", color=COLORS["pred"])
    _class_ticks(ax, x, names)
    ax.set_ylabel("share of rows")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Predicted vs gold distribution (total variation {stats['total_variation']:.2f}){note}")
    ax.legend(frameon=False)
    return _png(fig)


def recall_by_class(stats: dict, floor: float = 0.5) -> bytes:
    ids, note = _shown(stats)
    per = [stats["per_class"][i] for i in ids]
    names = _labels([c["class"] for c in per])
    recall = [c["recall"] for c in per]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(_width(len(names)), 3.4))
    ax.bar(x, recall, 0.6, color=[COLORS["ok"] if r >= floor else COLORS["bad"] for r in recall])
    ax.axhline(floor, color=COLORS["base"], ls="--", lw=1, label=f"floor {floor:.2f}")
    for i, c in enumerate(per):
        ax.text(i, recall[i] + 0.02, f"{recall[i]:.2f}\nn={c['support']}", ha="center", va="bottom", fontsize=8)
    _class_ticks(ax, x, names)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("recall")
    ax.set_title(f"Recall by class (balanced accuracy {stats['balanced_accuracy']:.2f}){note}")
    ax.legend(frameon=False, loc="upper right")
    return _png(fig)


def confusion_matrix(stats: dict) -> bytes:
    full = np.asarray(stats["confusion"], dtype=float)
    ids, note = _shown(stats)
    names = _labels([stats["class_names"][i] for i in ids], 14)
    cm = full[np.ix_(ids, ids)]
    if len(ids) < len(full):  # the classes not drawn, summed into one row and one column
        rest = np.setdiff1d(np.arange(len(full)), ids)
        cm = np.block([[cm, full[np.ix_(ids, rest)].sum(axis=1, keepdims=True)],
                       [full[np.ix_(rest, ids)].sum(axis=0, keepdims=True), full[np.ix_(rest, rest)].sum()]])
        names.append(f"({len(rest)} others)")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * k + 2.5), max(3.5, 0.6 * k + 2)))
    im = ax.imshow(norm, cmap="Reds", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion matrix (colour: share of the gold row){note}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def confidence_histogram(stats: dict) -> bytes:
    counts = np.asarray(stats["confidence_histogram"]["counts"], dtype=float)
    bins = stats["confidence_histogram"]["bins"]
    edges = np.linspace(0, 1, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ids, note = _shown(stats, limit=12, by="predicted")
    for c in ids:
        if counts[c].sum() == 0:
            continue
        ax.step(edges[:-1], counts[c], where="post", label=_labels([stats["class_names"][c]])[0])
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("rows")
    ax.set_xlim(0, 1)
    ax.set_title(f"Confidence by predicted class{note}")
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def gradient_norms(stats: dict, group: str) -> bytes | None:
    """Box plot of per-example gradient norms by gold class (log scale), from the stored sample."""
    grad = stats.get("gradients", {}).get(group)
    samples = stats.get("_grad_samples", {}).get(group)
    if not grad or not samples:
        return None
    names, data = [], []
    ids, note = _shown(stats)
    for c in ids:
        name = stats["class_names"][c]
        values = np.asarray(samples[c], dtype=float)
        values = values[values > 0]
        if len(values):
            names.append(_labels([name])[0])
            data.append(values)
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(_width(len(names)), 3.4))
    ax.boxplot(data, showfliers=True)
    _class_ticks(ax, range(1, len(names) + 1), names)
    ax.set_yscale("log")
    ax.set_ylabel("per-example gradient norm")
    ax.set_title(f"Gradient norm by gold class ({group}){note}")
    return _png(fig)


def gradient_mass(stats: dict, group: str) -> bytes | None:
    grad = stats.get("gradients", {}).get(group)
    if not grad:
        return None
    ids, note = _shown(stats)
    per = [grad["per_class"][i] for i in ids]
    names = _labels([c["class"] for c in per])
    mass = [c["mass_share"] or 0 for c in per]
    share = [c["example_share"] or 0 for c in per]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(_width(len(names)), 3.4))
    ax.bar(x - 0.2, share, 0.4, label="share of examples", color=COLORS["prior"])
    ax.bar(x + 0.2, mass, 0.4, label="share of gradient mass", color=COLORS["pred"])
    _class_ticks(ax, x, names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Who drives training: gradient mass vs examples ({group}){note}")
    ax.legend(frameon=False)
    return _png(fig)


def reliability_diagram(stats: dict) -> bytes | None:
    """Accuracy against confidence per bin: equal-width bins (every row; bar width = bin) and equal-mass bins
    (the seeded sample; dots), with the diagonal of perfect calibration."""
    cal = stats.get("calibration") or {}
    if cal.get("available") is False or not cal.get("bins"):
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color=COLORS["base"], ls="--", lw=1, label="perfect calibration")
    for b in cal["bins"]:
        ax.bar(b["lo"], b["accuracy"], width=b["hi"] - b["lo"], align="edge", color=COLORS["prior"],
               edgecolor="white", alpha=0.9)
        ax.bar(b["lo"], b["confidence"] - b["accuracy"], bottom=b["accuracy"], width=b["hi"] - b["lo"],
               align="edge", color=COLORS["pred"], alpha=0.25, edgecolor="none")
    mass = cal.get("bins_equal_mass") or []
    if mass:
        ax.plot([b["confidence"] for b in mass], [b["accuracy"] for b in mass], "o-", color=COLORS["pred"],
                ms=4, lw=1, label=f"equal-mass bins (ECE {cal['ece_equal_mass']:.3f})")
    ax.bar([0], [0], color=COLORS["prior"], label=f"equal-width bins (ECE {cal['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    temp = cal.get("temperature")
    ax.set_title("Reliability" + (f" (fitted temperature {temp['value']:.2f})" if temp else ""))
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return _png(fig)


def all_plots(stats: dict) -> dict[str, bytes]:
    """Every plot the report shows, by file name. A class name in a script the font lacks is drawn as boxes
    (the report's tables show it whole), without matplotlib's warning on stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        return _all_plots(stats)


def _all_plots(stats: dict) -> dict[str, bytes]:
    plots = {
        "prior_vs_predicted.png": prior_vs_predicted(stats),
        "recall_by_class.png": recall_by_class(stats),
        "confusion_matrix.png": confusion_matrix(stats),
    }
    if stats.get("confidence_histogram"):  # None when only predicted labels were given
        plots["confidence_by_class.png"] = confidence_histogram(stats)
    reliability = reliability_diagram(stats)
    if reliability:
        plots["reliability.png"] = reliability
    for group in ("head", "ghost:total"):
        box = gradient_norms(stats, group)
        mass = gradient_mass(stats, group)
        slug = group.replace(":", "_")
        if box:
            plots[f"gradient_norms_{slug}.png"] = box
        if mass:
            plots[f"gradient_mass_{slug}.png"] = mass
    return plots
