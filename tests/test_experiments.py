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


def test_bench_lora_runs_on_a_tiny_gpt(tmp_path):
    cmd = [sys.executable, str(REPO / "experiments" / "bench_lora.py"), "--tiny", "--batch", "2", "--seq", "8",
           "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_lora_cpu_float32.csv")))
    train = {r["variant"]: r for r in rows if r["mode"] == "train step"}
    assert {"frozen floor", "full", "lora_lab", "peft"} <= set(train)
    assert int(train["frozen floor"]["trainable"]) == 0 and float(train["frozen floor"]["vs_floor"]) == 1.0
    assert train["lora_lab"]["trainable"] == train["peft"]["trainable"]  # the same adapter in both libraries
