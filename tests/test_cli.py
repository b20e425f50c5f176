import csv
import io
import subprocess
import sys

import pytest

from lora_lab.cli import main

peft = pytest.importorskip("peft")


def _peft_count(rank: int) -> tuple[int, int]:
    from lora_lab import build_model

    model = peft.get_peft_model(
        build_model("gpt2-124m"), peft.LoraConfig(r=rank, target_modules="all-linear")
    )
    return model.get_nb_trainable_parameters()


def test_report_table_matches_peft(capsys):
    assert main(["report", "--ranks", "4", "16"]) == 0
    out = capsys.readouterr().out
    for rank in (4, 16):
        trainable, total = _peft_count(rank)
        assert f"| {rank} | 48 | {trainable:,d} | {total:,d} |" in out


def test_report_csv(capsys):
    assert main(["report", "--ranks", "8", "--targets", "c_attn", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and int(rows[0]["trainable"]) == 12 * 8 * (768 + 3 * 768)


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
    d = 768  # GPT-2 124M, 12 blocks of c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d), mlp.c_proj
    trainable = 12 * 8 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert f"| 8 | 48 | {trainable:,d} |" in proc.stdout
