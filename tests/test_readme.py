"""The README documents what the code does: its checks table matches the registry (ids, default thresholds,
severities) and its configuration table lists every configuration key."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from collapse_detect.checks import REGISTRY
from collapse_detect.cli import build_parser
from collapse_detect.config import configurable_actions

README = Path(__file__).resolve().parents[1] / "README.md"


def section(text: str, heading: str) -> str:
    """The body under the first Markdown heading (level 2 or 3) whose title starts with ``heading``, up to
    the next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#{2,3})\s+(.*?)\s*#*\s*$", line)
        if m and m.group(2).lower().startswith(heading.lower()):
            level = len(m.group(1))
            body = []
            for rest in lines[i + 1:]:
                n = re.match(r"^(#{1,6})\s", rest)
                if n and len(n.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"README.md has no '## {heading}' heading")


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def first_table(body: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the first pipe table in ``body``."""
    lines = body.splitlines()
    for i in range(len(lines) - 1):
        if "|" in lines[i] and re.match(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            for line in lines[i + 2:]:
                if "|" not in line or not line.strip():
                    break
                rows.append(_cells(line))
            return header, rows
    raise AssertionError("no Markdown table found under the heading")


def _column(header: list[str], *words: str) -> int:
    for i, name in enumerate(header):
        if any(w in name.lower() for w in words):
            return i
    raise AssertionError(f"the table has no column named like {words}; its columns: {header}")


def backticked(cell: str) -> str:
    m = re.search(r"`([^`]+)`", cell)
    assert m, f"expected a `code` id in the first column, got {cell!r}"
    return m.group(1)


def parse_defaults(cell: str) -> dict:
    """``min_support = 5``, ``floor: 0.5``, ``init_ratio=(0.5, 2.0)`` ... in any mix of backticks, commas,
    semicolons and <br>; "none", "-" or an empty cell mean no parameters."""
    text = re.sub(r"<br\s*/?>", ";", cell.replace("`", ""))
    if text.strip().lower() in ("", "-", "—", "–", "none", "n/a", "(none)"):
        return {}
    out = {}
    for name, raw in re.findall(r"([A-Za-z_]\w*)\s*[=:]\s*(\([^)]*\)|\[[^\]]*\]|[^\s,;]+)", text):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def test_the_checks_table_matches_the_registry():
    header, rows = first_table(section(README.read_text(encoding="utf-8"), "Checks"))
    defaults_col = _column(header, "default", "threshold")
    severity_col = _column(header, "severity")
    documented = {}
    for row in rows:
        check_id = backticked(row[0])
        assert check_id not in documented, f"{check_id} appears twice in the checks table"
        documented[check_id] = row
    assert sorted(documented) == sorted(REGISTRY), (
        f"README checks table vs registry: missing {sorted(set(REGISTRY) - set(documented))}, "
        f"unknown {sorted(set(documented) - set(REGISTRY))}")
    problems = []
    for check_id, spec in REGISTRY.items():
        row = documented[check_id]
        shown = parse_defaults(row[defaults_col])
        expected = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.defaults.items()}
        if shown != expected:
            problems.append(f"{check_id}: README defaults {shown} != code {expected}")
        severity = re.sub(r"\s+", "", row[severity_col].replace("`", "")).lower()
        if severity != spec.severity.replace(" ", "").lower():
            problems.append(f"{check_id}: README severity {row[severity_col]!r} != code {spec.severity!r}")
    assert not problems, "\n".join(problems)


def test_the_configuration_table_lists_every_key():
    header, rows = first_table(section(README.read_text(encoding="utf-8"), "Configuration"))
    keys = {backticked(row[0]).split(".")[0].split("<")[0].rstrip(".") for row in rows}
    expected = set(configurable_actions(build_parser())) | {"checks"}
    assert keys == expected, f"missing {sorted(expected - keys)}, unknown {sorted(keys - expected)}"


def test_the_parsers_read_what_a_person_writes():
    assert parse_defaults("`min_support=5`, `max_share_ratio=0.1`") == {"min_support": 5, "max_share_ratio": 0.1}
    assert parse_defaults("floor: 0.5<br>min_support: 5") == {"floor": 0.5, "min_support": 5}
    assert parse_defaults("max_bias = 1e-06; init_ratio = (0.5, 2.0)") == {"max_bias": 1e-6, "init_ratio": (0.5, 2.0)}
    assert parse_defaults("—") == {} and parse_defaults("") == {}
    header, rows = first_table("text\n\n| id | a \\| b |\n|---|:--:|\n| `x` | 1 |\n\nafter")
    assert header == ["id", "a | b"] and rows == [["`x`", "1"]]
