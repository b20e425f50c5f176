#!/usr/bin/env bash
# The GPU half of the performance measurements (issue 10), one script of about 9 minutes on an H100/H200:
#   1. GPT-2 124M, bf16 autocast, 8 x 512: frozen floor, lora_lab (fused), unfused, PEFT, full, and the floor
#      and lora_lab under torch.compile; unmerged / merged inference against the base
#   2. the OpenLLaMA 3B architecture (random init), 1 x 512, gradient checkpointing: LoRA and QLoRA nf4 at r=8,
#      lora_lab and PEFT + bitsandbytes, the frozen floor, PagedAdamW; peak memory and tokens/s
#   3. the floor and lora_lab of step 1 alone, and with forward and backward as CUDA graphs (torch.compile
#      mode "reduce-overhead")
# Results land in experiments/results/ (bench_lora_cuda_bfloat16*.*, qlora_3b_cuda.*) with the GPU named.
#
#     bash experiments/gpu_perf.sh
#
# On a machine without a package index, bring bitsandbytes as a wheel (manylinux_2_24 for 0.50.2) and put it
# on PYTHONPATH first; without it step 2 measures the bf16 variants only.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
time python experiments/bench_lora.py --case gpt2 --device cuda --dtype bfloat16 --batch 8 --seq 512 \
    --warmup 3 --steps 20 --compile
time python experiments/qlora_3b.py --ranks 8 --paged
time python experiments/bench_lora.py --case gpt2 --device cuda --dtype bfloat16 --batch 8 --seq 512 \
    --warmup 3 --steps 20 --only "frozen floor" --only lora_lab --compile reduce-overhead
