"""Configuration: built-in defaults < ``[tool.collapse-detect]`` in pyproject.toml < command-line flags.

The global keys are the command line's long options (``batch-size``, ``fail-on``, ``out``, ...), read from the
argument parser itself, so a new flag is configurable the day it is added and the two cannot drift apart. Values
go through the flag's own converter, so a key accepts exactly what its flag accepts. Per-check thresholds live
in ``[tool.collapse-detect.checks.<check id>]`` and are checked against the keyword arguments of the registered
check function. Key names are normalised: ``batch_size`` and ``batch-size`` are the same key.

Explicit flags win because the file's values become the parser's defaults (``set_defaults``) before the command
line is parsed. Every problem is a ``ConfigError``: one line naming the file, the key, what arrived and what is
valid.
"""

from __future__ import annotations

import argparse
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .checks import REGISTRY
from .errors import ConfigError

TOOL = "collapse-detect"
CHECKS_KEY = "checks"
# Options that choose what to read, or one-off actions (--write-fixed refuses a folder that exists, so a file
# setting it would break the second run): never taken from a file.
NOT_CONFIGURABLE = frozenset({"config", "set", "help", "version", "predictions", "write-fixed"})


@dataclass
class Config:
    """What a configuration file contributes: parser defaults (by argparse dest) and check thresholds."""

    path: Path | None = None
    defaults: dict = field(default_factory=dict)
    check_params: dict = field(default_factory=dict)


# ---------------------------------------------------------------- names


def normalise_key(key: str) -> str:
    """The spelling used for global keys: ``batch_size`` -> ``batch-size``."""
    return str(key).strip().replace("_", "-")


def normalise_check_id(name: str) -> str:
    """Check ids and parameter names are Python identifiers: ``low-recall`` -> ``low_recall``."""
    return str(name).strip().replace("-", "_")


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


# ---------------------------------------------------------------- finding and reading the file


def _has_table(data: dict) -> bool:
    tool = data.get("tool")
    return isinstance(tool, dict) and any(normalise_key(k) == TOOL for k in tool)


def _table(data: dict) -> dict:
    tool = data.get("tool", {})
    tables = [v for k, v in tool.items() if normalise_key(k) == TOOL]
    if len(tables) > 1:
        raise ConfigError("both [tool.collapse-detect] and [tool.collapse_detect] are set; keep one")
    return tables[0]


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text (TOML files are UTF-8): byte {exc.start}") from exc


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml with a [tool.collapse-detect] table, from ``start`` (the working directory)
    upward. A pyproject.toml without the table is passed over, as ruff and black do for theirs."""
    here = Path.cwd() if start is None else Path(start)
    for folder in (here, *here.resolve().parents):
        candidate = folder / "pyproject.toml"
        if not candidate.is_file():
            continue
        try:
            text = candidate.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if "collapse-detect" not in text and "collapse_detect" not in text:
            continue  # cheap test first: an unrelated (even broken) pyproject.toml is none of our business
        if _has_table(_read_toml(candidate)):
            return candidate
    return None


def read_table(path: Path, explicit: bool) -> tuple[dict, str]:
    """The collapse-detect table of ``path`` and its TOML header (``tool.collapse-detect``, or ``""`` for a
    file passed with --config that is not a pyproject.toml and holds the keys at its top level)."""
    data = _read_toml(path)
    if _has_table(data):
        table, header = _table(data), f"tool.{TOOL}"
    elif explicit and path.name != "pyproject.toml":
        table, header = data, ""
    else:
        raise ConfigError(f"{str(path)!r} has no [tool.collapse-detect] table (--config)")
    if not isinstance(table, dict):
        raise ConfigError(f"{str(path)!r}: tool.collapse-detect must be a table, got {_show(table)}")
    return table, header


def _where(path: Path, header: str) -> str:
    return f"{path} [{header}]" if header else str(path)


# ---------------------------------------------------------------- global keys, from the parser


def configurable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Normalised key -> argparse action, for every long option a file may set."""
    out = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs:
            continue
        key = normalise_key(longs[0][2:])
        if key in NOT_CONFIGURABLE or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out[key] = action
    return out


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0


def _kind(action: argparse.Action) -> str:
    """What TOML type a key takes, from its flag: a switch takes a boolean, a flag whose converter turns "1"
    into an int takes an integer, and so on; a converter that refuses "1" takes strings (or arrays of them,
    joined with commas as on the command line)."""
    if _is_switch(action):
        return "boolean"
    if action.choices is not None:
        return "string"
    convert = action.type
    if convert is None or convert is str:
        return "string"
    try:
        sample = convert("1")
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return "string or array"
    if isinstance(sample, bool):
        return "boolean"
    if isinstance(sample, int):
        return "integer"
    if isinstance(sample, float):
        return "number"
    if isinstance(sample, (list, tuple, set, frozenset)):
        return "string or array"
    return "string"


def _global_value(key: str, action: argparse.Action, value, where: str):
    kind = _kind(action)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {_show(value)}")
        return action.const if value else action.default
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: {key} must be an integer, got {_show(value)}")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}: {key} must be a number, got {_show(value)}")
    if kind == "string" and not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {_show(value)}")
    if kind == "string or array":
        if value == [] and key == "skip":  # skip nothing
            return action.default
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string or an array of strings, got {_show(value)}")
    text = str(value)
    if action.choices is not None and text not in action.choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, action.choices))}, "
                          f"got {_show(value)}")
    if action.type is None:
        return text
    try:
        return action.type(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {key} = {value!r}: {exc}") from None


# ---------------------------------------------------------------- check thresholds


def _param_kind(default) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    if isinstance(default, (tuple, list)):
        return f"array of {len(default)} numbers"
    return "any"


# Thresholds that are shares, probabilities or gains on a 0-1 scale; every other number must be finite and >= 0.
UNIT_INTERVAL = frozenset({"warn_excess", "fail_excess", "floor", "min_gain", "min_auc", "min_agreement",
                           "min_mapped", "warn_unknown", "fail_unknown", "warn_truncated", "min_mass_share",
                           "min_error_rate", "min_probe_gain", "min_measured_gain", "max_auc"})


def _check_range(param: str, value, shown: str, where: str) -> None:
    """Numbers must be finite and >= 0 (a NaN would switch a check off without a word); shares lie in [0, 1],
    significance levels in (0, 1], and a (low, high) pair is ordered."""
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if not isinstance(values[0], (int, float)) or isinstance(values[0], bool):
        return
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"{where}: {shown} must be finite and >= 0, got {value!r}")
    if param == "alpha" and not 0 < value <= 1:  # 1 asks for no significance at all
        raise ConfigError(f"{where}: {shown} is a significance level: more than 0 and at most 1, got {value!r}")
    if param in UNIT_INTERVAL and value > 1:
        raise ConfigError(f"{where}: {shown} is a share between 0 and 1, got {value!r}")
    if len(values) == 2 and values[0] > values[1]:
        raise ConfigError(f"{where}: {shown} is a (low, high) range; got low {values[0]!r} > high {values[1]!r}")


def check_param(check_id: str, param: str, value, where: str):
    """Validate one threshold against the registered check's keyword argument; returns the value to pass."""
    check_id = normalise_check_id(check_id)
    if check_id not in REGISTRY:
        raise ConfigError(f"{where}: unknown check {check_id!r}{_suggest(check_id, REGISTRY)}; "
                          f"valid checks: {', '.join(REGISTRY)}")
    defaults = REGISTRY[check_id].defaults
    param = normalise_check_id(param)
    if param not in defaults:
        takes = ", ".join(f"{p} (default {d!r})" for p, d in defaults.items()) or "no parameters"
        raise ConfigError(f"{where}: {check_id} has no parameter {param!r}{_suggest(param, defaults)}; "
                          f"it takes: {takes}")
    default = defaults[param]
    kind = _param_kind(default)
    if kind.startswith("array"):
        ok = (isinstance(value, list) and len(value) == len(default)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    else:
        ok = {"boolean": isinstance(value, bool),
              "integer": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "string": isinstance(value, str), "any": True}[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{where}: {check_id}.{param} must be {article} {kind}, got {_show(value)}")
    value = tuple(float(v) for v in value) if kind.startswith("array") else (
        float(value) if kind == "number" else value)
    _check_range(param, value, f"{check_id}.{param}", where)
    return value


def _check_tables(checks, path: Path, header: str) -> dict:
    checks_header = f"{header}.{CHECKS_KEY}" if header else CHECKS_KEY
    if not isinstance(checks, dict):
        raise ConfigError(f"{_where(path, checks_header)}: must be a table of check ids, got {_show(checks)}")
    out: dict[str, dict] = {}
    for raw_id, params in checks.items():
        check_id = normalise_check_id(raw_id)
        where = _where(path, f"{checks_header}.{raw_id}")
        if check_id not in REGISTRY:
            raise ConfigError(f"{where}: unknown check {check_id!r}{_suggest(check_id, REGISTRY)}; "
                              f"valid checks: {', '.join(REGISTRY)}")
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: must be a table of parameters, got {_show(params)}")
        for param, value in params.items():
            out.setdefault(check_id, {})[normalise_check_id(param)] = check_param(check_id, param, value, where)
    return out


def parse_check_list(text) -> list[str]:
    """``--only``/``--skip`` (and the ``only``/``skip`` keys): comma-separated check ids, each one registered."""
    ids = [normalise_check_id(x) for x in str(text).split(",") if x.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"no check ids given; valid checks: {', '.join(REGISTRY)}")
    unknown = [x for x in ids if x not in REGISTRY]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check {unknown[0]!r}{_suggest(unknown[0], REGISTRY)}; "
                                         f"valid checks: {', '.join(REGISTRY)}")
    return ids


def parse_set(items: list[str] | None) -> dict:
    """``--set CHECK.PARAM=VALUE`` (repeatable). VALUE is read as a TOML value (``0.6``, ``5``, ``true``,
    ``"text"``); anything TOML cannot read is taken as a string."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, sep, raw = str(item).partition("=")
        check_id, dot, param = name.strip().partition(".")
        if not sep or not dot or not check_id or not param or not raw.strip():
            raise ConfigError(f"--set expects CHECK.PARAM=VALUE (for example low_recall.floor=0.6), got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        where = f"--set {item}"
        out.setdefault(normalise_check_id(check_id), {})[normalise_check_id(param)] = \
            check_param(check_id, param, value, where)
    return out


def merge_check_params(*layers: dict) -> dict:
    """Later layers win, parameter by parameter."""
    out: dict[str, dict] = {}
    for layer in layers:
        for check_id, params in (layer or {}).items():
            out.setdefault(check_id, {}).update(params)
    return out


# ---------------------------------------------------------------- entry point


def config_path_from_argv(argv: list[str]) -> str | None:
    """The value of --config, read before the full parse (which needs the file's values as defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return known.config


def load_config(parser: argparse.ArgumentParser, argv: list[str], cwd: Path | None = None) -> Config:
    """Read the configuration that applies to this command line and validate every key."""
    explicit = config_path_from_argv(argv)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {explicit!r} does not exist (--config)")
    else:
        path = find_pyproject(cwd)
        if path is None:
            return Config()
    table, header = read_table(path, explicit is not None)
    where = _where(path, header)
    actions = configurable_actions(parser)
    config = Config(path=path)
    seen: dict[str, str] = {}
    for raw_key, value in table.items():
        key = normalise_key(raw_key)
        if key in seen:
            raise ConfigError(f"{where}: {raw_key!r} and {seen[key]!r} are the same key; keep one")
        seen[key] = raw_key
        if key == CHECKS_KEY:
            config.check_params = _check_tables(value, path, header)
            continue
        if key not in actions:
            valid = sorted([*actions, CHECKS_KEY])
            raise ConfigError(f"{where}: unknown key {raw_key!r}{_suggest(key, valid)}; valid keys: "
                              f"{', '.join(valid)}")
        action = actions[key]
        config.defaults[action.dest] = _global_value(key, action, value, where)
    return config
