"""Read an eval file in chunks and map its labels onto the model's class ids.

Every problem with the file is an ``InputError`` whose one line names the file, the column, a few offending
values and the flag that fixes it.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import InputError

TEXT_COLUMN_NAMES = ("text", "sentence", "content", "review", "document", "body", "headline", "title",
                     "question", "premise", "sentence1", "text_a", "input", "utterance", "tweet")
PAIR_COLUMN_NAMES = ("text_pair", "sentence2", "hypothesis", "text_b", "context", "passage")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "category", "target", "gold", "y", "topic")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}


@dataclass
class Columns:
    text: str
    label: str
    text_pair: str | None = None


@dataclass
class Chunk:
    """Rows of one chunk: ``row_ids`` are positions in the file (0-based, data rows only)."""

    row_ids: np.ndarray
    texts: list[str]
    text_pairs: list[str] | None
    gold: np.ndarray


def file_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{str(path)!r}: unknown file type {suffix or '(none)'!r}; expected one of "
                         f"{', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def tsv_quoting(path: str | os.PathLike) -> int:
    """How to read a TSV file's double quotes. Files written by pandas or the csv module quote a field only
    when it holds a tab, a newline or a quote, so every quoted field closes right before a tab or the line's
    end. Many TSV files (GLUE and most corpus dumps) hold raw text instead, where ``"Quoted" headline`` is
    text: read as CSV, it would lose its quotes or swallow the rows up to the next quote. Quotes are taken as
    quoting when every quoted field is well-formed (a strict CSV parse of the file succeeds), else as text.
    A raw file whose stray quotes happen to pair up as well-formed fields still reads as quoted."""
    p = Path(path)
    with p.open("rb") as f:
        if not any(b'"' in block for block in iter(lambda: f.read(1 << 20), b"")):
            return csv.QUOTE_MINIMAL
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a long text is no sign of raw quotes
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            for _ in csv.reader(f, delimiter="\t", strict=True):
                pass
    except (csv.Error, UnicodeDecodeError):
        return csv.QUOTE_NONE
    finally:
        csv.field_size_limit(limit)
    return csv.QUOTE_MINIMAL


def iter_frames(path: str | os.PathLike, chunk_rows: int = 8192, what: str = "data file") -> Iterator[pd.DataFrame]:
    """Yield the file as DataFrames of at most ``chunk_rows`` rows, without reading it whole.

    CSV and TSV cells are read as the strings they are (a label ``01`` stays ``01``, ``NA`` and ``None`` are
    text): only an empty cell is missing. JSON lines and Parquet keep their own types."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder, not a file")
    fmt = file_format(path)
    if not p.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist")
    if p.stat().st_size == 0:
        raise InputError(f"{what} {str(path)!r} is empty")
    try:
        if fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            quoting = csv.QUOTE_MINIMAL if fmt == "csv" else tsv_quoting(p)
            _check_header(p, sep, quoting)
            reader = pd.read_csv(p, sep=sep, chunksize=chunk_rows, dtype=str, keep_default_na=False,
                                 na_values=[""], quoting=quoting, encoding="utf-8-sig")
            yield from reader
        elif fmt == "jsonl":
            yield from pd.read_json(p, lines=True, chunksize=chunk_rows, dtype=False, encoding="utf-8-sig")
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(p) as pf:
                for batch in pf.iter_batches(batch_size=chunk_rows):
                    yield batch.to_pandas()
    except InputError:
        raise
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {str(path)!r} as {fmt}: {str(exc).splitlines()[0][:200]}") from exc
    except Exception as exc:  # pyarrow raises its own error types for a broken parquet file
        raise InputError(f"cannot read {str(path)!r} as {fmt}: {str(exc).splitlines()[0][:200]}") from exc


def _check_header(path: Path, sep: str, quoting: int) -> None:
    """Refuse a header that names a column twice (pandas would rename the second copy and read the first)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter=sep, quoting=quoting), [])
    seen: set[str] = set()
    for name in header:
        if name in seen and name:  # empty names (an index column, trailing commas) are pandas' "Unnamed: i"
            raise InputError(f"{str(path)!r}: the header names column {name!r} twice; rename one of them")
        seen.add(name)


def _is_text(series: pd.Series) -> bool:
    """Strings that are not all numbers (a CSV's id column is read as strings too)."""
    values = series.dropna()
    if values.empty:
        return False
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return False
    if not values.map(lambda v: isinstance(v, str)).all():
        return False
    return bool(pd.to_numeric(values, errors="coerce").isna().any())


def detect_columns(frame: pd.DataFrame, path, *, text_col=None, text_pair_col=None, label_col=None) -> Columns:
    """Pick the text, pair and label columns, honouring explicit choices."""
    columns = [str(c) for c in frame.columns]
    lower = {c.lower(): c for c in columns}
    listed = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")

    def named(name, flag):
        if name is None:
            return None
        if name not in columns:
            raise InputError(f"{str(path)!r} has no column {name!r} ({flag}); its columns are: {listed}")
        return name

    text = named(text_col, "--text-col")
    pair = named(text_pair_col, "--text-pair-col")
    label = named(label_col, "--label-col")
    if label is None:
        label = next((lower[n] for n in LABEL_COLUMN_NAMES if n in lower), None)
        if label is None:
            raise InputError(f"{str(path)!r}: no label column found (looked for {', '.join(LABEL_COLUMN_NAMES[:6])}, "
                             f"...); its columns are: {listed}; pass --label-col")
    if text is None:
        text = next((lower[n] for n in TEXT_COLUMN_NAMES if n in lower and lower[n] not in (label, pair)), None)
    if text is None and pair is not None and pair.lower() in TEXT_COLUMN_NAMES:
        raise InputError(f"{str(path)!r}: column {pair!r} is the text pair (--text-pair-col), so the first text "
                         "is not known; pass --text-col")
    if text is None:
        string_cols = [c for c in columns if c not in (label, pair) and _is_text(frame[c])]
        if len(string_cols) == 1:
            text = string_cols[0]
        else:
            found = ", ".join(string_cols) if string_cols else "none"
            raise InputError(f"{str(path)!r}: cannot tell which column holds the text (string columns: {found}); "
                             "pass --text-col")
    if pair is None and text_pair_col is None:
        candidates = [lower[n] for n in PAIR_COLUMN_NAMES if n in lower and lower[n] not in (text, label)]
        if candidates and text.lower() in ("sentence1", "premise", "text_a", "question", "text"):
            pair = candidates[0]
    roles = [("text", text, "--text-col"), ("text pair", pair, "--text-pair-col"), ("label", label, "--label-col")]
    for i, (role, column, flag) in enumerate(roles):
        for other, other_column, other_flag in roles[i + 1:]:
            if column is not None and column == other_column:
                raise InputError(f"{str(path)!r}: column {column!r} cannot be both the {role} column ({flag}) and "
                                 f"the {other} column ({other_flag}); pass a different {flag} or {other_flag}")
    return Columns(text=text, label=label, text_pair=pair)


def split_names(text: str) -> list[str]:
    """``--label-names sports,politics,business`` (and the same string given to diagnose()) as a list."""
    return [x.strip() for x in str(text).split(",")]


def check_label_names(names, flag: str = "--label-names", classes: int | None = None) -> list[str]:
    """The class names given for the model's ids, stripped; refuses an empty or a repeated name, and a count
    other than the model's ``classes``."""
    names = [str(n).strip() for n in names]
    if classes is not None and len(names) != classes:
        raise InputError(f"{flag} gives {len(names)} name{'s' if len(names) != 1 else ''} but the model has "
                         f"{classes} classes")
    seen: set[str] = set()
    for position, name in enumerate(names, 1):
        if not name:
            separated = ", separated by commas" if flag.startswith("--") else ""
            raise InputError(f"{flag} has an empty name (name {position} of {len(names)}); give one name per "
                             f"class, in the order of the model's ids{separated}")
        if name in seen:
            raise InputError(f"{flag} gives the name {name!r} more than once; each of the model's classes needs "
                             "its own name")
        seen.add(name)
    return names


_INTEGER = re.compile(r"-?[0-9]+(?:\.0*)?")


def integer_label(value) -> int | None:
    """The integer id a label spells ('3', '-1', '2.0', 3, 3.0, but not '--1', '²' or 3.5), else None: the one
    reading of ids for eval, training and predictions files alike."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip().split(".")[0])
    return None


def _integer_name(name: str) -> int | None:
    """The integer a class name spells canonically ('3', '-1'; not '03', '+1' or '3.0'), else None."""
    try:
        value = int(name)
    except (TypeError, ValueError):
        return None
    return value if str(value) == str(name).strip() else None


class LabelMapper:
    """Map gold labels (class names or integer ids) onto the model's class ids.

    When class names are integers ("1", "2", "3": star ratings, -1/0/1 sentiment; or only some of them),
    integer labels are matched to those names and are never read as ids, so one column cannot mix the two
    readings. Otherwise a label is a class name first, then an id 0..k-1. True/false labels are matched to the
    names "true"/"false" (any case), never taken as ids 1/0.
    """

    def __init__(self, class_names: list[str], path, column: str):
        self.class_names = list(class_names)
        self.by_name = {name: i for i, name in enumerate(self.class_names)}
        self.by_bool: dict[bool, int] = {}  # True/False -> the class named "true"/"false" (any case)
        for i, name in reversed(list(enumerate(self.class_names))):  # the first such name wins
            if str(name).strip().lower() in ("true", "false"):
                self.by_bool[str(name).strip().lower() == "true"] = i
        numbers = [_integer_name(name) for name in self.class_names]
        self.by_number = {n: i for i, n in enumerate(numbers) if n is not None} or None
        self.path = path
        self.column = column

    def _lookup(self, v, k: int) -> int | None:
        if isinstance(v, (bool, np.bool_)):
            return self.by_bool.get(bool(v))
        if isinstance(v, str):
            key = v.strip()
            if key in self.by_name:
                return self.by_name[key]
            if key.lower() in ("true", "false"):  # a CSV's True/False, read as text
                return self.by_bool.get(key.lower() == "true")
        iv = integer_label(v)  # "2.0": an id column written as floats
        if iv is None:
            return None
        if self.by_number is not None:  # class names are numbers: an integer label is a name
            return self.by_number.get(iv)
        return iv if 0 <= iv < k else None

    def _unknown(self, bad: list[str], any_bool: bool) -> str:
        k = len(self.class_names)
        names = ", ".join(self.class_names[:10]) + (" ..." if k > 10 else "")
        ids = ",".join(map(str, range(k))) if k <= 10 else f"0,1,...,{k - 1}"
        if self.by_number is not None:
            classes = (f"the model's classes are: {names} (its class names include numbers, so integer labels "
                       f"are matched by name, not as ids); pass --label-names to rename the model's ids in order (e.g. "
                       f"--label-names {ids} when the data holds ids), or --label-col")
        else:
            classes = (f"the model's classes are: {names} (or ids 0..{k - 1}); pass --label-names to name the "
                       "model's ids in order, or --label-col")
        if any_bool:
            classes = "true/false labels are matched to class names, never taken as ids; " + classes
        return (f"{str(self.path)!r}: column {self.column!r} has labels the model does not know: "
                f"{', '.join(bad)}; {classes}")

    def __call__(self, values: pd.Series, row_ids: np.ndarray) -> np.ndarray:
        k = len(self.class_names)
        out = np.empty(len(values), dtype=np.int64)
        bad: list[str] = []
        any_bool = False
        missing_rows: list[int] = []
        for i, v in enumerate(values.tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or (isinstance(v, str)
                                                                                    and not v.strip()):
                missing_rows.append(int(row_ids[i]))
                continue
            found = self._lookup(v, k)
            if found is not None:
                out[i] = found
                continue
            any_bool = any_bool or isinstance(v, (bool, np.bool_)) or str(v).strip().lower() in ("true", "false")
            if len(bad) < 5 and repr(v) not in bad:
                bad.append(repr(v))
            out[i] = -1
        if missing_rows:
            raise InputError(f"{str(self.path)!r}: column {self.column!r} is empty at {row_id_text(missing_rows)}; "
                             "every row needs a label")
        if bad:
            raise InputError(self._unknown(bad, any_bool))
        return out


def row_id_text(rows) -> str:
    """Row numbers as the messages give them: 0-based data rows (the header is not a row), as in the row_id
    column of predictions.csv."""
    rows = [int(r) for r in rows]
    if len(rows) == 1:
        return f"row_id {rows[0]} (a 0-based data row, as in predictions.csv)"
    return (f"row_ids {', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''} "
            "(0-based data rows, as in predictions.csv)")


def column_texts(frame: pd.DataFrame, column: str, path, row_ids: np.ndarray, flag: str) -> list[str]:
    """The column's texts; a missing, empty or blank text is refused in every format (the model would see
    only its special tokens)."""
    series = frame[column]
    missing = series.isna().to_numpy() | series.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(bool)
    if missing.any():
        rows = row_ids[np.flatnonzero(missing)].tolist()
        raise InputError(f"{str(path)!r}: column {column!r} ({flag}) is empty at {row_id_text(rows)}; "
                         "drop or fill those rows")
    return [v if isinstance(v, str) else str(v) for v in series.tolist()]


def first_frame(path, chunk_rows: int, what: str = "data file") -> tuple[pd.DataFrame, Iterator[pd.DataFrame]]:
    """The first chunk of a file (it decides the columns) and an iterator over the rest."""
    frames = iter_frames(path, chunk_rows, what)
    first = next(frames, None)
    if first is None or len(first) == 0:
        raise InputError(f"{what} {str(path)!r} has no rows")
    return first, frames


def iter_chunks(path, class_names: list[str], *, text_col=None, text_pair_col=None, label_col=None,
                chunk_rows: int = 8192, row_filter=None) -> tuple[Columns, Iterator[Chunk]]:
    """Detect the columns from the first chunk and return them with an iterator over all chunks.

    ``row_filter(row_ids) -> bool mask`` keeps a subset (used to shard rows across processes).
    """
    first, frames = first_frame(path, chunk_rows)
    columns = detect_columns(first, path, text_col=text_col, text_pair_col=text_pair_col, label_col=label_col)
    mapper = LabelMapper(class_names, path, columns.label)

    def generate() -> Iterator[Chunk]:
        start = 0
        frame = first
        while frame is not None:
            for needed in (columns.text, columns.label, columns.text_pair):
                if needed is not None and needed not in frame.columns:
                    raise InputError(f"{str(path)!r}: column {needed!r} is missing from row_id {start} on "
                                      "(0-based data rows, as in predictions.csv)")
            n = len(frame)
            row_ids = np.arange(start, start + n, dtype=np.int64)
            keep = np.ones(n, dtype=bool) if row_filter is None else row_filter(row_ids)
            sub = frame.iloc[np.flatnonzero(keep)]
            kept = row_ids[keep]
            texts = column_texts(sub, columns.text, path, kept, "--text-col")
            pairs = (column_texts(sub, columns.text_pair, path, kept, "--text-pair-col")
                     if columns.text_pair else None)
            gold = mapper(sub[columns.label], kept)
            yield Chunk(kept, texts, pairs, gold)
            start += n
            frame = next(frames, None)

    return columns, generate()
