"""Datasets for fine-tuning: read, split, tokenize, batch.

Classification data is a list of ``(text, label)`` pairs per split; instruction data is a list
of Alpaca entries (``instruction``, ``input``, ``output``) or chats (``messages``). A user's files
(CSV / TSV, JSON lines, JSON, Hugging Face datasets) are read by `records.py`. Batches are dicts of tensors:

- classification: ``input_ids`` (B, T) padded with the tokenizer's pad id, ``attention_mask``
  (B, T), 1 on real tokens, and ``labels`` (B,);
- causal LM: ``input_ids`` (B, T) and ``labels`` (B, T), the inputs shifted left by one, with -100
  (ignored by the loss) on padding and, optionally, on the prompt, so that only the response is
  learned.

Files come from a local path, the copy shipped in the package (SMS Spam), or a download that is
cached under ``~/.cache/lora_lab`` (sentence polarity, the book's instruction set).
"""

from __future__ import annotations

import hashlib
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

from . import records as R
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
DATASETS = ("sms-spam", "sentiment", "instructions", "csv:PATH", "jsonl:PATH", "hf:NAME")


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


# ---- any labelled texts: CSV / TSV, JSON lines, a JSON list, a Hugging Face dataset ----------------


_WHOLE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: "²" is a digit to str.isdigit, not to int()
FILE_PREFIXES = ("csv:", "jsonl:", "hf:")  # --dataset csv:PATH, jsonl:PATH (either reads any of the files), hf:NAME


def label_name(value: object) -> str:
    """A label as the dataset numbers it: whole numbers by their value ("01", "+1", 1, 1.0 and "1" are one
    class); JSON's true and false as such; a missing label as ""."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    value = str(value).strip() if value is not None else ""
    if _WHOLE.fullmatch(value):
        return str(int(value))
    return str(int(float(value))) if re.fullmatch(r"[+-]?[0-9]+\.0*", value) else value


def _text(value: object) -> str:
    """A text field as text: a number as it reads (0 stays "0"), a missing one empty."""
    return "" if value is None else str(value)


def labelled_dataset(
    source: str | os.PathLike, text_column: str = "text", label_column: str = "label", seed: int = 123
) -> ClassificationData:
    """Labelled texts from `source`: a file (CSV / TSV with a header, JSON lines, a JSON list of
    objects; by its suffix) or "hf:NAME" (a Hugging Face dataset: a `save_to_disk` folder, data files,
    or a hub name online). Labels may be names or numbers, numbered in sorted order. Split stratified
    70/10/20, unless a Hugging Face dataset brings its own train, validation and test."""
    rows, where = R.read_source(source)
    everything = rows if isinstance(rows, list) else [r for part in rows for r in part]
    columns = list(dict.fromkeys(k for r in everything[:1000] for k in r))
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"{where} has no column(s) {missing}; its columns are {columns}. Name them with "
                         "--text-column and --label-column")  # fmt: skip
    lacking = [i for i, r in enumerate(everything, start=1) if text_column not in r]
    if lacking:
        raise ValueError(f"{where}: {len(lacking)} row(s) have no {text_column!r} (first "
                         f"{R.row_place(where, lacking[0])}): give it or remove them")  # fmt: skip
    empty = [i for i, r in enumerate(everything, start=1) if not label_name(r.get(label_column))]
    if empty:
        raise ValueError(f"{where}: {len(empty)} row(s) have no {label_column!r} (first "
                         f"{R.row_place(where, empty[0])}): label or remove them")  # fmt: skip
    names = sorted({label_name(r[label_column]) for r in everything},
                   key=lambda v: (not _WHOLE.fullmatch(v), int(v) if _WHOLE.fullmatch(v) else 0, v))  # fmt: skip
    if len(names) < 2:
        raise ValueError(f"{where}: {label_column!r} holds {len(names)} distinct label(s); classification needs "
                         "two or more")  # fmt: skip
    index = {name: i for i, name in enumerate(names)}

    def pairs(part: list[dict]) -> list[tuple[str, int]]:
        return [(_text(r[text_column]), index[label_name(r[label_column])]) for r in part]

    splits = split_70_10_20(pairs(rows), seed) if isinstance(rows, list) else [pairs(part) for part in rows]
    return _check_splits(ClassificationData(*splits, labels=names, source=where))


csv_dataset = labelled_dataset  # the name it had when it read CSV alone


# ---- instructions (Alpaca format) ------------------------------------------------------------


def instructions(path: str | os.PathLike | None = None) -> InstructionData:
    """The book's 1,100 instruction entries (chapter 7, packaged), or a file of entries: a JSON list or
    JSON lines, or "hf:NAME" (a Hugging Face dataset). An entry is Alpaca's (instruction, input,
    output) or a chat (`messages`: role and content per turn; the model's chat template renders it and
    the assistant turns are learned). Split as the book does: 85% train, 10% test, 5% validation, in
    file order (935 / 110 / 55), unless a Hugging Face dataset brings its own three splits."""
    rows, where = R.read_source(path or PACKAGED / INSTRUCTIONS_FILE)
    everything = rows if isinstance(rows, list) else [e for part in rows for e in part]
    bad = [i for i, e in enumerate(everything) if not _is_entry(e)]
    if bad:
        raise ValueError(f"{where}: expected instruction / input / output entries, or chats (messages: a list of "
                         f"role / content turns with an assistant turn); entries {bad[:3]} are neither")  # fmt: skip
    if isinstance(rows, list):
        n_train, n_test = int(len(rows) * 0.85), int(len(rows) * 0.1)
        rows = rows[:n_train], rows[n_train + n_test :], rows[n_train : n_train + n_test]
    data = InstructionData(*[[_entry(e) for e in part] for part in rows], source=where)
    if not data.train or not data.val:
        raise ValueError(f"{where}: {len(everything)} entries leave an empty split; give at least 20")
    return data


def _is_entry(entry: object) -> bool:
    """Alpaca's fields, or a chat: turns of a role and a text (a string, or OpenAI's text parts) where
    an assistant turn answers an earlier one."""
    if not isinstance(entry, dict):
        return False
    turns = entry.get("messages")
    if turns is None:
        return entry.get("instruction") is not None and entry.get("output") is not None
    if not isinstance(turns, list) or not all(isinstance(t, dict) and _content(t.get("content")) is not None
                                              and isinstance(t.get("role"), str) for t in turns):  # fmt: skip
        return False
    roles = [t["role"] for t in turns]
    return bool(roles) and roles[0] != "assistant" and "assistant" in roles  # an answer needs a question first


def _content(value: object) -> str | None:
    """A turn's text: a string, or the text parts of a list ({"type": "text", "text": ...}); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):  # fmt: skip
        return "".join(p["text"] for p in value)
    return None


def _entry(entry: dict) -> dict:
    """An entry as training reads it: a chat's turns, or Alpaca's fields as text (a missing input: "")."""
    if entry.get("messages") is not None:
        return {"messages": [{"role": t["role"], "content": _content(t["content"])} for t in entry["messages"]]}
    return {k: _text(entry.get(k)) for k in ("instruction", "input", "output")}


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


def entry_tokens(entry: dict, tok: Tokenizer, template: str = "alpaca") -> tuple[list[int], list[bool]]:
    """The ids of an entry, truncated to `tok.max_length`, and which of them are to be learned: an
    Alpaca entry's response and end token, or a chat's assistant turns (`Tokenizer.conversation`)."""
    if "messages" in entry:
        ids, learn = tok.conversation(entry["messages"])
        return ids[: tok.max_length], learn[: tok.max_length]
    ids, n_prompt = instruction_tokens(entry, tok, template)
    return ids, [i >= n_prompt for i in range(len(ids))]


def causal_lm_batch(
    entries: Sequence[dict[str, str]], tok: Tokenizer, mask_prompt: bool = True, template: str = "alpaca"
) -> dict[str, torch.Tensor]:
    """Inputs and next-token targets for instruction tuning. Targets are the inputs shifted by one;
    padding (after the first end token) and, with `mask_prompt`, the prompt are -100, so the loss
    is the response's alone. Padded on the right with `tok.pad_id`."""
    seqs = [entry_tokens(e, tok, template) for e in entries]
    width = max(len(ids) for ids, _ in seqs) - 1
    if width < 1:
        raise ValueError("an entry tokenizes to fewer than two tokens: nothing to predict")
    inputs = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, learn) in enumerate(seqs):
        seq = torch.tensor(ids)
        n = len(ids) - 1
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]
        mask[row, :n] = 1
        if mask_prompt:  # position i predicts token i + 1: learned where token i + 1 is
            targets[row, :n][~torch.tensor(learn[1:], dtype=torch.bool)] = IGNORE_INDEX
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
    """A dataset by its CLI name: ``sms-spam``, ``sentiment``, ``instructions`` (`path`: a file or
    hf:NAME of entries), ``csv:PATH`` / ``jsonl:PATH`` (a file of labelled texts) or ``hf:NAME``."""
    if name == "sms-spam":
        return sms_spam(path, balanced=balanced, seed=seed)
    if name == "sentiment":
        return sentiment(path, seed=seed)
    if name == "instructions":
        return instructions(path)
    if name.startswith(("csv:", "jsonl:")):
        return labelled_dataset(path or name.split(":", 1)[1], text_column, label_column, seed=seed)
    if name.startswith("hf:"):
        return labelled_dataset(path or name, text_column, label_column, seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
