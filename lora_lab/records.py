"""A user's data as rows (one dict per example): CSV or TSV with a header, JSON lines, a JSON list of
objects, and Hugging Face `datasets` (a folder written by `save_to_disk`, data files, or a hub name
where there is a network). `data.py` makes classification or instruction sets of them."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

TABLES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSON_LINES = (".jsonl", ".ndjson")
KINDS = "a CSV / TSV file with a header, JSON lines (.jsonl), a JSON list (.json)"
SPLITS = ("train", "validation", "test")  # a Hugging Face dataset with all three keeps them


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV / TSV (by its header), JSON lines or JSON list file, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} ({KINDS})")
    suffix = path.suffix.lower()
    if suffix not in (*TABLES, *JSON_LINES, ".json"):
        raise ValueError(f"{path}: not a file kind lora_lab reads by its suffix; give {KINDS}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from None
    if suffix in TABLES:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=TABLES[suffix]))
    if suffix in JSON_LINES:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_json(line, f"{path}, line {number}"))
    else:
        rows = _json(text, str(path))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected objects ({{...}}), one per line or in one JSON list")
    return rows


def row_place(source: str | os.PathLike, number: int) -> str:
    """Where row `number` (from 1) of `source` stands, as an editor shows it: a line of a CSV (after
    its header) or JSON lines file, else the row's number."""
    suffix = Path(str(source)).suffix.lower()
    if suffix in TABLES and not str(source).startswith("hf:"):
        return f"on line {number + 1}"
    return f"on line {number}" if suffix in JSON_LINES and not str(source).startswith("hf:") else f"row {number}"


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None


def hf_rows(spec: str) -> tuple[dict[str, list[dict]], str]:
    """A Hugging Face dataset's rows by split, and where they came from: `spec` is a folder written by
    `save_to_disk`, a data file or folder that `datasets.load_dataset` reads, or a hub name (online)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: datasets need the datasets package: pip install datasets") from None
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json")):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"hf:{spec}: datasets reads .csv, .json, .jsonl and .parquet files")
        loaded = datasets.load_dataset(kind, data_files=str(path))
    elif path.exists():
        loaded = datasets.load_dataset(str(path))
    else:
        try:
            loaded = datasets.load_dataset(spec)
        except Exception as err:  # offline, a name not on the hub, a gated set: the hub's errors vary
            raise FileNotFoundError(
                f"hf:{spec} is no local folder or file, and the Hugging Face hub did not give it "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline? Where you are online, "
                f"datasets.load_dataset({spec!r}).save_to_disk(DIR), then pass hf:DIR"
            ) from None
    parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    rows = {name: [_named(dict(row), part.features) for row in part] for name, part in parts.items()}
    if len(rows) > 1 and not all(name in rows for name in SPLITS):
        import warnings

        warnings.warn(f"hf:{spec} has the splits {sorted(rows)}, not train, validation and test: all its rows are "
                      "pooled and split again (its own test rows may land in training)", stacklevel=2)  # fmt: skip
    return rows, f"hf:{spec}"


def _named(row: dict, features) -> dict:
    """A row with its class labels by name (a ClassLabel column holds their numbers)."""
    import datasets

    for key, feature in features.items():
        if isinstance(feature, datasets.ClassLabel) and isinstance(row.get(key), int) and row[key] >= 0:
            row[key] = feature.int2str(row[key])
    return row


def read_source(source: str | os.PathLike) -> tuple[list[dict] | tuple[list[dict], ...], str]:
    """The rows of a file, or of "hf:NAME" its own (train, validation, test) when it has all three
    (else all its rows), and where they came from."""
    if str(source).startswith("hf:"):
        parts, where = hf_rows(str(source)[3:])
        return splits_or_all(parts), where
    return read_rows(source), str(source)


def splits_or_all(parts: dict[str, list[dict]]) -> tuple[list[dict], list[dict], list[dict]] | list[dict]:
    """A dataset's own train / validation / test when it has all three, else all its rows in one list
    (for the caller to split)."""
    if all(name in parts for name in SPLITS):
        return tuple(parts[name] for name in SPLITS)
    return [row for part in parts.values() for row in part]


def read_texts(source: str | os.PathLike, column: str | None = None) -> list[str]:
    """Texts to label: `column` of a CSV / TSV, JSON lines or JSON file, or else one text per line of
    any text file; "-" reads standard input, one text per line."""
    import sys

    if str(source) == "-":
        if column:
            raise ValueError(f"--column {column}: standard input is read as one text per line; give a file with "
                             "its suffix (--file data.csv) for a column")  # fmt: skip
        return sys.stdin.read().splitlines()
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (*TABLES, *JSON_LINES, ".json"):
        rows, column = read_rows(path), column or "text"
        missing = [i for i, row in enumerate(rows, start=1) if column not in row]
        if missing:
            found = list(rows[missing[0] - 1]) if rows else []
            raise ValueError(f"{path}: row {missing[0]} has no column {column!r} (it has {found}); name the "
                             "column with --column")  # fmt: skip
        return [str(row[column] if row[column] is not None else "") for row in rows]
    if column:
        raise ValueError(f"--column {column}: {path} is a text file (one text per line); columns are for "
                         f"{KINDS}")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # line for line: the output lines up with it
    while lines and not lines[-1].strip():  # but for blank lines at the end
        lines.pop()
    return lines
