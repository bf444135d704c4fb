"""Write the report files into a private temporary folder and move them into place only when the whole run
succeeded, so a failed run leaves nothing half-written."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError

FORMATS = ("html", "json", "md", "png", "csv")
MANIFEST = ".collapse-detect-files"  # the names the last run wrote into its folder, one per line
REPORT_FILES = frozenset({"report.html", "summary.json", "summary.md", "predictions.csv"})


def _read_manifest(path: Path) -> set[str]:
    """File names from an earlier run's manifest; only plain names (no folders), so nothing outside the report
    folder can be named."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    return {n for n in (x.strip() for x in lines) if n and n == Path(n).name and n not in ("..", MANIFEST)}


def _is_report_file(name: str) -> bool:
    """Names a run can write: the fixed report files and the plots."""
    return name in REPORT_FILES or (name.endswith(".png") and "/" not in name)


def _remove_stale(path: Path) -> None:
    """Remove a report file an earlier run wrote; a folder, or a name no run writes, is left alone, and a file
    that cannot be removed only stays behind."""
    if not _is_report_file(path.name):
        return
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
    except OSError:
        pass


def check_inputs_outside(out_dir, inputs: dict) -> None:
    """Refuse a report folder where a report file this tool writes (or removes as stale) would be one of the
    run's own input files, e.g. ``--predictions out/predictions.csv --out out``: by the path as given and by
    the file it leads to through symlinks, either of which the report would replace or remove."""
    try:
        outs = {Path(os.path.abspath(out_dir)), Path(out_dir).resolve()}
    except OSError:
        return
    for flag, path in inputs.items():
        if not path:
            continue
        try:
            given, real = Path(os.path.abspath(path)), Path(path).resolve()
        except OSError:
            continue
        if any(p.parent in outs and _is_report_file(p.name) for p in (given, real)):
            raise InputError(f"{flag} {str(path)!r} is in the report folder --out {str(out_dir)!r} under a name the "
                             "report writes; pass another --out, or move the file")


def check_writable(flag: str, path, *, folder: bool) -> None:
    """Before any work: ``path`` (a folder, or a file when ``folder`` is False) can be created or replaced.
    Raises InputError naming the flag."""
    path = Path(path)
    try:
        _check_writable(flag, path, folder)
    except OSError as exc:  # a parent that cannot be searched, a name too long
        raise InputError(f"{flag} {str(path)!r} cannot be used: {exc.strerror or exc}") from None


def _check_writable(flag: str, path: Path, folder: bool) -> None:
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(f"{flag} {str(path)!r} is a file; pass a folder")
        if not folder and path.is_dir():
            raise InputError(f"{flag} {str(path)!r} is a folder; pass a file name")
        target = path if folder else path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise InputError(f"{flag} {str(path)!r} cannot be created: {str(target)!r} is a file")
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(path)!r} cannot be written: no write permission in {str(target)!r}")


class OutputWriter:
    def __init__(self, out_dir: Path, formats: set[str]):
        self.out_dir = Path(out_dir)
        self.formats = formats
        self.tmp = Path(tempfile.mkdtemp(prefix="collapse-detect-"))
        self._pred_file = None
        self._pred_writer = None

    def write_predictions(self, row_ids: np.ndarray, gold: np.ndarray, probs: np.ndarray,
                          names: list[str]) -> None:
        """Append one chunk's rows to predictions.csv (written as the probe goes, not held in memory)."""
        if "csv" not in self.formats:
            return
        if self._pred_writer is None:
            self._pred_file = open(self.tmp / "predictions.csv", "w", newline="", encoding="utf-8")
            self._pred_writer = csv.writer(self._pred_file)
            self._pred_writer.writerow(["row_id", "gold", "predicted"] + [f"prob_{n}" for n in names])
        pred = probs.argmax(axis=1)
        # the shortest text that reads back as the same number in the probabilities' own precision, so a file
        # re-judged with --predictions gives the same statistics (a collapsed model's scores differ in the 7th
        # digit)
        for r, g, p, row in zip(row_ids.tolist(), gold.tolist(), pred.tolist(), probs.astype(str).tolist()):
            self._pred_writer.writerow([r, names[g], names[p]] + row)

    def write_text(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def commit(self) -> Path:
        """Move every file into ``out_dir``, replacing files of an earlier run of the same name and removing the
        report files an earlier run wrote there that this run does not (listed in ``MANIFEST``), so the folder
        always holds one run. Nothing else in the folder is touched."""
        if self._pred_file is not None:
            self._pred_file.close()
        names = sorted(p.name for p in self.tmp.iterdir())
        (self.tmp / MANIFEST).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            earlier = _read_manifest(self.out_dir / MANIFEST)
            for name in [*names, MANIFEST]:
                target = self.out_dir / name
                if target.is_symlink():  # replace a link, never write through it
                    target.unlink()
                shutil.move(str(self.tmp / name), str(target))
        except OSError as exc:
            self.abort()
            raise InputError(f"cannot write the report into {str(self.out_dir)!r}: {exc.strerror or exc}") from exc
        for name in sorted(earlier - set(names)):
            _remove_stale(self.out_dir / name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        if self._pred_file is not None:
            self._pred_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
