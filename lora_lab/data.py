"""Datasets for fine-tuning: read, split, tokenize, batch.

Classification data is a list of ``(text, label)`` pairs per split; instruction data is a list
of Alpaca entries (``instruction``, ``input``, ``output``). Batches are dicts of tensors:

- classification: ``input_ids`` (B, T) padded with the tokenizer's pad id, ``attention_mask``
  (B, T), 1 on real tokens, and ``labels`` (B,);
- causal LM: ``input_ids`` (B, T) and ``labels`` (B, T), the inputs shifted left by one, with -100
  (ignored by the loss) on padding and, optionally, on the prompt, so that only the response is
  learned.

Files come from a local path, the copy shipped in the package (SMS Spam), or a download that is
cached under ``~/.cache/lora_lab`` (sentence polarity, the book's instruction set).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_bytes
from .tokenizer import ALPACA_HEADER, Tokenizer, alpaca_prompt, gpt2_text_tokenizer, hf_text_tokenizer  # noqa: F401

PACKAGED = Path(__file__).parent / "datasets"
CACHE = Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora_lab"))
POLARITY_URL = "https://www.cs.cornell.edu/people/pabo/movie-review-data/rt-polaritydata.tar.gz"
# What the download must hold, byte for byte (as dataset libraries check theirs): the two files in the archive
POLARITY_SHA256 = {
    "pos": "2da124ec187a9d5a29c9f04e91c540e02baed5af8868f550a26bd6fd4dbf8bf0",
    "neg": "4ace77d558c3714723843f1d65b60c01e3417b208180f0728808d76ad0eeeaca",
}
INSTRUCTIONS_FILE = "instruction-data.json"  # packaged: the book's set, Apache-2.0 (see its readme there)
IGNORE_INDEX = -100  # targets the cross-entropy loss skips
DATASETS = ("sms-spam", "sentiment", "instructions", "csv:PATH")


@dataclass
class ClassificationData:
    """Train, validation and test splits of ``(text, label)``, and the label names by index."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    labels: list[str]
    source: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per class in each split, by label name."""
        return {
            split: {self.labels[k]: v for k, v in sorted(Counter(y for _, y in getattr(self, split)).items())}
            for split in ("train", "val", "test")
        }


@dataclass
class InstructionData:
    """Train, validation and test splits of Alpaca entries."""

    train: list[dict[str, str]]
    val: list[dict[str, str]]
    test: list[dict[str, str]]
    source: str = ""


def download(url: str, name: str) -> Path:
    """`url` saved as ``CACHE/name`` once (atomically), then read from there; offline, a clear error."""
    path = CACHE / name
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            write_bytes(path, response.read())
    except OSError as err:
        raise FileNotFoundError(
            f"could not download {url} ({err}); download it where you are online and pass its path "
            f"with --data-path, or put it at {path}"
        ) from None
    return path


# ---- splitting ------------------------------------------------------------------------------


def split_70_10_20(rows: Sequence, seed: int, stratify: bool = True) -> tuple[list, list, list]:
    """Shuffle with `seed` and cut 70% / 10% / 20%; stratified (per class) when rows are
    ``(text, label)`` pairs and `stratify` is set, so every split keeps the class ratio."""
    rng = random.Random(seed)
    groups: dict[object, list] = {}
    for row in rows:
        groups.setdefault(row[1] if stratify else None, []).append(row)
    train, val, test = [], [], []
    for key in sorted(groups, key=str):
        group = groups[key]
        rng.shuffle(group)
        n_train, n_val = int(0.7 * len(group)), int(0.1 * len(group))
        train += group[:n_train]
        val += group[n_train : n_train + n_val]
        test += group[n_train + n_val :]
    for part in (train, val, test):
        rng.shuffle(part)
    return train, val, test


def _check_splits(data: ClassificationData) -> ClassificationData:
    for split in ("train", "val", "test"):
        if not getattr(data, split):
            raise ValueError(f"{data.source}: the {split} split is empty; give more examples (at least 10)")
    return data


# ---- SMS Spam Collection ------------------------------------------------------------------------


def read_sms_spam(path: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """The UCI SMS Spam Collection as ``(text, 1 if spam else 0)``, line by line (label, tab, text:
    no CSV quoting, which would merge lines at a stray quote). Default: the copy in the package."""
    path = Path(path) if path else PACKAGED / "SMSSpamCollection"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the UCI file SMSSpamCollection (label<TAB>text per line)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line:
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in ("ham", "spam"):
            raise ValueError(
                f"{path}, line {number}: expected 'ham' or 'spam', a tab, then the text; got {line[:60]!r}"
            )
        rows.append((text, int(label == "spam")))
    return rows


def sms_spam(path: str | os.PathLike | None = None, balanced: bool = True, seed: int = 123) -> ClassificationData:
    """SMS spam split 70/10/20. Balanced (the book's chapter 6): every spam message and as many
    ham messages drawn with `seed`, shuffled and cut exactly as the book does (pandas, seed 123:
    1045 / 149 / 300 of 747 + 747). Full: all 5,574 messages, stratified."""
    rows = read_sms_spam(path)
    source = str(path or "SMS Spam Collection (packaged)")
    if not balanced:
        return _check_splits(ClassificationData(*split_70_10_20(rows, seed), labels=["ham", "spam"], source=source))
    import pandas as pd

    df = pd.DataFrame(rows, columns=["Text", "Label"])
    spam = df[df["Label"] == 1]
    ham = df[df["Label"] == 0].sample(len(spam), random_state=seed)
    df = pd.concat([ham, spam]).sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    val_end = train_end + int(len(df) * 0.1)
    parts = [list(df[a:b].itertuples(index=False, name=None)) for a, b in ((0, train_end), (train_end, val_end))]
    parts.append(list(df[val_end:].itertuples(index=False, name=None)))
    return _check_splits(ClassificationData(*parts, labels=["ham", "spam"], source=source))


# ---- sentence polarity ------------------------------------------------------------------------


def sentiment(path: str | os.PathLike | None = None, seed: int = 123) -> ClassificationData:
    """Pang & Lee's sentence polarity (rt-polarity.pos / .neg, cp1252): positive 1, negative 0,
    stratified 70/10/20. `path`: the folder holding both files (or the .tar.gz); default: downloaded."""
    downloaded = path is None
    if path is None:
        path = download(POLARITY_URL, "rt-polaritydata.tar.gz")
    path = Path(path)
    files: dict[str, bytes] = {}
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(("rt-polarity.pos", "rt-polarity.neg")):
                    files[member.name[-3:]] = tar.extractfile(member).read()
    elif path.is_dir():
        files = {
            kind: (path / f"rt-polarity.{kind}").read_bytes()
            for kind in ("pos", "neg")
            if (path / f"rt-polarity.{kind}").is_file()
        }
    if set(files) != {"pos", "neg"}:
        raise FileNotFoundError(
            f"{path}: expected a folder (or rt-polaritydata.tar.gz) with rt-polarity.pos and rt-polarity.neg"
        )
    if downloaded and any(hashlib.sha256(files[k]).hexdigest() != h for k, h in POLARITY_SHA256.items()):
        path.unlink()
        raise ValueError(
            f"the download from {POLARITY_URL} is not the published sentence polarity v1.0 (its files' sha256 "
            "differ), so it was deleted: try again later, or pass a copy you trust with --data-path"
        )
    rows = []
    for kind, label in (("neg", 0), ("pos", 1)):
        # cp1252, one snippet a line: split on "\n" only (0x85 is '…' here, not a line break)
        rows += [(line.strip(), label) for line in files[kind].decode("cp1252").split("\n") if line.strip()]
    return _check_splits(
        ClassificationData(*split_70_10_20(rows, seed), labels=["negative", "positive"], source=str(path))
    )


# ---- any CSV / TSV ----------------------------------------------------------------------------


_WHOLE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: "²" is a digit to str.isdigit, not to int()


def label_name(value: str) -> str:
    """A label as the dataset numbers it: whole numbers by their value ("01", "+1" and "1" are one class)."""
    return str(int(value)) if _WHOLE.fullmatch(value) else value


def csv_dataset(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label", seed: int = 123
) -> ClassificationData:
    """A CSV (or .tsv: tab-separated) file with a header naming `text_column` and `label_column`;
    labels may be names or numbers, and are numbered in sorted order. Stratified 70/10/20."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (csv:PATH needs a CSV or TSV file with a header row)")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; its columns are {columns}. Name them with "
            "--text-column and --label-column"
        )
    raw = [(row[text_column] or "", label_name((row[label_column] or "").strip())) for row in reader]
    empty = [number for number, (_, label) in enumerate(raw, start=2) if not label]
    if empty:
        raise ValueError(
            f"{path}: {len(empty)} row(s) have no {label_column!r} (first on line {empty[0]}): label or remove them"
        )
    names = sorted(
        {label for _, label in raw}, key=lambda v: (not _WHOLE.fullmatch(v), int(v) if _WHOLE.fullmatch(v) else 0, v)
    )
    if len(names) < 2:
        raise ValueError(
            f"{path}: column {label_column!r} holds {len(names)} distinct label(s); classification needs two or more"
        )
    index = {name: i for i, name in enumerate(names)}
    rows = [(text, index[label]) for text, label in raw]
    return _check_splits(ClassificationData(*split_70_10_20(rows, seed), labels=names, source=str(path)))


# ---- instructions (Alpaca format) ------------------------------------------------------------


def instructions(path: str | os.PathLike | None = None) -> InstructionData:
    """The book's 1,100 instruction entries (chapter 7, packaged), or any JSON list of Alpaca entries,
    split as the book does: 85% train, 10% test, 5% validation, in file order (935 / 110 / 55)."""
    path = Path(path) if path else PACKAGED / INSTRUCTIONS_FILE
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path} (a JSON list of instruction/input/output entries)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    bad = [i for i, e in enumerate(entries) if not isinstance(e, dict) or not {"instruction", "output"} <= set(e)]
    if not isinstance(entries, list) or bad:
        raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output}} entries (entry {bad[:3]})")
    n_train, n_test = int(len(entries) * 0.85), int(len(entries) * 0.1)
    data = InstructionData(
        entries[:n_train], entries[n_train + n_test :], entries[n_train : n_train + n_test], source=str(path)
    )
    if not data.train or not data.val:
        raise ValueError(f"{path}: {len(entries)} entries leave an empty split; give at least 20")
    return data


# ---- batches ---------------------------------------------------------------------------------


def classification_batch(
    examples: Sequence[tuple[str, int]], tok: Tokenizer, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize, truncate to `tok.max_length`, pad on the right to the longest (or to `pad_to`,
    the book's fixed length) with `tok.pad_id`; the mask tells real tokens from padding."""
    ids = [tok.encode(text)[: tok.max_length] or [tok.pad_id] for text, _ in examples]
    width = max(pad_to or 0, max(map(len, ids)))
    width = min(width, tok.max_length)
    input_ids = torch.full((len(ids), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in examples])}


def instruction_tokens(entry: dict[str, str], tok: Tokenizer, template: str = "alpaca") -> tuple[list[int], int]:
    """The ids of prompt + response + end token, truncated to `tok.max_length`, and how many of
    them are the prompt."""
    prompt = tok.encode(tok.prompt(entry, template))
    response = tok.encode_continuation(entry["output"])
    ids = (prompt + response + [tok.eos_id])[: tok.max_length]
    return ids, min(len(prompt), len(ids))


def causal_lm_batch(
    entries: Sequence[dict[str, str]], tok: Tokenizer, mask_prompt: bool = True, template: str = "alpaca"
) -> dict[str, torch.Tensor]:
    """Inputs and next-token targets for instruction tuning. Targets are the inputs shifted by one;
    padding (after the first end token) and, with `mask_prompt`, the prompt are -100, so the loss
    is the response's alone. Padded on the right with `tok.pad_id`."""
    seqs = [instruction_tokens(e, tok, template) for e in entries]
    width = max(len(ids) for ids, _ in seqs) - 1
    if width < 1:
        raise ValueError("an entry tokenizes to fewer than two tokens: nothing to predict")
    inputs = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        seq = torch.tensor(ids)
        n = len(ids) - 1
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]
        mask[row, :n] = 1
        if mask_prompt:
            targets[row, : max(n_prompt - 1, 0)] = IGNORE_INDEX  # position i predicts token i + 1
    return {"input_ids": inputs, "attention_mask": mask, "labels": targets}


BUCKET = 50  # batches per bucket when batches are bucketed by length


def row_length(row: object) -> int:
    """A row's length in characters (a text and label, or an instruction entry): close enough to its
    token count to group rows of similar length."""
    if isinstance(row, dict):
        return sum(len(str(v)) for v in row.values())
    return len(str(row[0])) if isinstance(row, (tuple, list)) else len(str(row))


def batches(
    rows: Sequence,
    batch_size: int,
    collate: Callable[[Sequence], dict],
    shuffle: bool,
    seed: int = 0,
    bucket: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """`rows` cut into batches (shuffled with `seed` when asked), each collated. With `bucket` (and
    `shuffle`), rows of similar length share a batch, so batches carry less padding: the shuffled rows
    are cut into buckets of 50 batches, each bucket sorted by length and cut into batches, and the
    batches shuffled again. Every row is still in exactly one batch of the epoch."""
    order = list(range(len(rows)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        if bucket:
            size = batch_size * BUCKET
            order = [i for k in range(0, len(order), size) for i in sorted(order[k : k + size],
                     key=lambda i: row_length(rows[i]))]  # fmt: skip
            groups = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
            rng.shuffle(groups)
            return [collate([rows[i] for i in group]) for group in groups]
    return [collate([rows[i] for i in order[k : k + batch_size]]) for k in range(0, len(order), batch_size)]


def load_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    seed: int = 123,
    text_column: str = "text",
    label_column: str = "label",
    balanced: bool = True,
) -> ClassificationData | InstructionData:
    """A dataset by its CLI name: ``sms-spam``, ``sentiment``, ``instructions`` or ``csv:PATH``."""
    if name == "sms-spam":
        return sms_spam(path, balanced=balanced, seed=seed)
    if name == "sentiment":
        return sentiment(path, seed=seed)
    if name == "instructions":
        return instructions(path)
    if name.startswith("csv:"):
        return csv_dataset(path or name[4:], text_column, label_column, seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
