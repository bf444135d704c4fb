"""The errors a user sees. Each message names what arrived, what was expected and the flag that fixes it."""


def describe(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class CollapseDetectError(Exception):
    """Base class: a user-facing problem reported as one line, exit code 2."""

    exit_code = 2


class InputError(CollapseDetectError):
    """The eval data or a command-line value cannot be used as given."""


class ConfigError(CollapseDetectError):
    """A configuration key or value is unknown or of the wrong type."""


class CheckpointError(CollapseDetectError):
    """The model directory cannot be loaded."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs pickle (or remote code) to load and the user has not allowed it."""
