import csv
import io
import subprocess
import sys

import pytest

from lora_lab.cli import main

peft = pytest.importorskip("peft")


BOOK_LINEARS = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]


def _peft_count(rank: int) -> tuple[int, int]:
    from lora_lab import build_model

    model = peft.get_peft_model(build_model("gpt2-124m"), peft.LoraConfig(r=rank, target_modules=BOOK_LINEARS))
    return model.get_nb_trainable_parameters()


def test_report_table_matches_peft(capsys):
    assert main(["report", "--ranks", "4", "16"]) == 0
    out = capsys.readouterr().out
    for rank in (4, 16):
        trainable, total = _peft_count(rank)
        assert f"| {rank} | 72 | {trainable:,d} | {total:,d} |" in out


def test_report_csv(capsys):
    assert main(["report", "--ranks", "8", "--targets", "W_query", "W_value", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and int(rows[0]["trainable"]) == 12 * 2 * 8 * (768 + 768)


def test_report_errors_are_one_clear_line(capsys):
    assert main(["report", "--model", "gpt3"]) == 2
    assert "lora-lab report: error: unknown model 'gpt3'" in capsys.readouterr().err
    assert main(["report", "--ranks", "0"]) == 2
    assert "rank must be a positive integer, got 0" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.cli", "report", "--ranks", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # GPT-2 124M, the six linears of each of 12 blocks: 4 x (768 -> 768), 768 -> 3072, 3072 -> 768
    trainable = 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))
    assert f"| 8 | 72 | {trainable:,d} |" in proc.stdout
