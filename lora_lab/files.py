"""Files in and out: atomic writes (a file is either the old one or the complete new one, never
half written) and safetensors reads that turn a corrupt file into a clear error."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without error the
    file is flushed to disk and renamed over `path` in one step, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # as open() would make it: mkstemp (and safetensors, which writes a file of its own) make it 0600
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def csv_text(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """`rows` as CSV with a header: `columns`, else the keys of the first row (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or (rows[0] if rows else [])), lineterminator="\n",
                            restval="")  # fmt: skip
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None):
    """Write `rows` to `path` as CSV (see `csv_text`), atomically."""
    write_text(path, csv_text(rows, columns))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_safetensors(path: str | os.PathLike, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file. A missing file raises FileNotFoundError and
    a corrupt one ValueError, each saying `fix`, what to do about it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}. {fix}") from err


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    """Write `tensors` to a safetensors file atomically (contiguous CPU copies that share no storage,
    as safetensors wants)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, tmp, metadata=metadata)
