"""Write the report files into a private temporary folder and move them into place only when the whole run
succeeded, so a failed run leaves nothing half-written."""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMATS = ("html", "json", "md", "png", "csv")


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
        for r, g, p, row in zip(row_ids.tolist(), gold.tolist(), pred.tolist(), probs.tolist()):
            self._pred_writer.writerow([r, names[g], names[p]] + [f"{x:.6g}" for x in row])

    def write_text(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def commit(self) -> Path:
        """Move every file into ``out_dir`` (replacing files of an earlier run of the same name)."""
        if self._pred_file is not None:
            self._pred_file.close()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.tmp.iterdir()):
            shutil.move(str(path), str(self.out_dir / path.name))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        if self._pred_file is not None:
            self._pred_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
