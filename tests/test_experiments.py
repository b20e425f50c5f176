"""Smoke runs of the experiment scripts on tiny models: they run and write what they promise (nothing timed)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_qlora_3b_script_runs_on_a_tiny_llama(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "experiments" / "qlora_3b.py"), "--tiny", "--ranks", "4", "--warmup", "0",
           "--steps", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert {(r["library"], r["base"]) for r in rows} == {("lora_lab", "bf16"), ("lora_lab", "nf4"), ("peft", "bf16"),
                                                         ("peft", "nf4")}  # fmt: skip
    assert len({r["trainable_params"] for r in rows}) == 1  # both libraries train the same parameters
    assert "smoke run" in out.with_suffix(".md").read_text()
