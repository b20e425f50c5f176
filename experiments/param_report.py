"""Trainable parameters and training memory of LoRA across ranks and model sizes, GPT-2 124M to
OpenLLaMA 3B: `lora-lab report` over every registered model, written to experiments/results/.

Builds every model on the meta device (nothing allocated), so it runs offline in seconds, 3B
models included. Writes param_report.csv, .md and .png under experiments/results/param_report/.

    python experiments/param_report.py [--models gpt2-124m openllama-3b] [--ranks 1 8 64] [--targets q_proj,v_proj]
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_lab.cli import main

RESULTS = Path(__file__).parent / "results" / "param_report"
SIZES = ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m", "openllama-3b"]

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--models" not in args and "--model" not in args:
        args = ["--models", *SIZES, *args]
    if "--out" not in args:
        args += ["--out", str(RESULTS)]
    raise SystemExit(main(["report", *args]))
