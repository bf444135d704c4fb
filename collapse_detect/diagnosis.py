"""The Diagnosis: findings + statistics + metadata, the one object every renderer reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .checks import REGISTRY, Finding, Severity

SCHEMA_VERSION = "1.0"


@dataclass
class Diagnosis:
    findings: list[Finding]
    stats: dict
    metadata: dict = field(default_factory=dict)
    root_cause: dict | None = None
    # per-row predictions of a Python-API run (row_id, gold, predicted, prob_<class>): what predictions.csv holds
    predictions: object = field(default=None, repr=False, compare=False)

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)

    def effective_fail_on(self, fail_on: str | None = None) -> str:
        """The threshold asked for, else the run's own (``diagnose(fail_on=...)``, ``--fail-on``), else fail."""
        return fail_on or (self.metadata or {}).get("fail_on") or "fail"

    def gating_findings(self, fail_on: str | None = None) -> list[Finding]:
        """Findings of collapse checks at or over ``fail_on``; a crashed check gates too, since a gate that
        could not look must not pass."""
        threshold = Severity(self.effective_fail_on(fail_on)).rank
        return [f for f in self.findings
                if f.severity is Severity.ERROR
                or (f.severity.rank >= threshold and REGISTRY.get(f.check_id) is not None
                    and REGISTRY[f.check_id].collapse)]

    def verdict(self, fail_on: str | None = None) -> str:
        if self.gating_findings(fail_on):
            return "COLLAPSE"
        if any(f.severity.rank >= Severity.WARN.rank for f in self.findings):
            return "WARNINGS"
        return "HEALTHY"

    def exit_code(self, fail_on: str | None = None) -> int:
        return 1 if self.gating_findings(fail_on) else 0

    @property
    def collapsed_classes(self) -> list[str]:
        seen: list[str] = []
        for f in self.findings:
            if f.check_id == "class_never_predicted":
                seen.extend(c for c in f.classes if c not in seen)
        return seen

    def worst_class(self) -> dict | None:
        present = [c for c in self.stats["per_class"] if c["support"] > 0]
        return min(present, key=lambda c: (c["recall"], -c["support"])) if present else None

    def to_dict(self, fail_on: str | None = None) -> dict:
        worst = self.worst_class()
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict(fail_on),
            "exit_code": self.exit_code(fail_on),
            "fail_on": self.effective_fail_on(fail_on),
            "collapsed_classes": self.collapsed_classes,
            "root_cause": self.root_cause,
            "worst_class": None if worst is None else {k: worst[k] for k in ("class", "recall", "support")},
            "findings": [f.to_dict() for f in self.findings],
            "metadata": self.metadata,
            "stats": {k: v for k, v in self.stats.items() if not k.startswith("_")},
        }

    def to_json(self, fail_on: str | None = None) -> str:
        return json.dumps(_finite(self.to_dict(fail_on)), indent=2, default=_jsonable, allow_nan=False)

    def _repr_html_(self) -> str:
        from .report.render import render_compact_html

        return render_compact_html(self)

    def save(self, out_dir, formats=None, fail_on: str | None = None):
        """Write the report files the CLI writes (report.html, summary.json, summary.md, the PNGs and, for a
        Python-API run, predictions.csv) into ``out_dir``; returns the folder."""
        from .report.write import save_report

        return save_report(self, out_dir, formats, self.effective_fail_on(fail_on))


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _finite(value):
    """NaN and infinity are not JSON: an undefined number is written as null."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return _finite(value.to_dict())
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _finite(value.item())
        if isinstance(value, np.ndarray):
            return _finite(value.tolist())
    except ImportError:
        pass
    return value
