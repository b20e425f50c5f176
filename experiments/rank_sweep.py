"""The rank sweeps users run: `lora-lab sweep` (and `lora-lab analyze`) with the settings of each study.

    python experiments/rank_sweep.py minilm-sms            # all-MiniLM-L6-v2, SMS spam, r = 1 ... 64 (CPU, ~15 min)
    python experiments/rank_sweep.py smollm2-instructions --data-path ../shared/data/instruction/instruction-data.json
        # SmolLM2-135M instruction tuning, r = 4 ... 32 (CPU, ~25 min)
    python experiments/rank_sweep.py minilm-sms-variants   # the same model and data, r = 1 ... 32 for LoRA, DoRA,
        # rsLoRA, PiSSA and LoRA+ (ratio 16), two seeds: which variant at which rank (CPU, ~70 min)
    python experiments/rank_sweep.py smollm2-instructions-variants --data-path .../instruction-data.json
        # the same five variants for SmolLM2-135M instruction tuning at r = 8 (CPU, ~25 min)
    python experiments/rank_sweep.py gpt2-sms              # GPT-2 124M ... 1558M on SMS spam (needs the hub weights)
    python experiments/rank_sweep.py openllama-instructions # OpenLLaMA 3B, QLoRA, instruction tuning (GPU, hub weights)
    python experiments/rank_sweep.py openllama-instructions --random-init   # without the weights: memory and
        # tokens/s of LoRA and QLoRA on the same architecture, PEFT side by side (experiments/qlora_3b.py)

Extra arguments go to `lora-lab sweep` (say --ranks 4,8 or --seeds 1,2,3). Whole sweeps (run directories,
adapters) stay under experiments/runs/sweep-<case>/; the CSV, summary, plots and analysis are copied to
experiments/results/sweep-<case>/ with a README naming the command, the machine and the wall time. Run it
again to resume: finished points are skipped. For memory and speed of the OpenLLaMA 3B architecture
without its weights, see experiments/qlora_3b.py (random init).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lora_lab.cli import main
from lora_lab.files import write_bytes, write_text

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from finetune import header  # noqa: E402  (the command, the machine and the wall time)

CASES = {
    "minilm-sms": (
        "all-MiniLM-L6-v2 on SMS spam (balanced 1045 / 149 / 300)",
        ["--model", "minilm-l6", "--dataset", "sms-spam", "--ranks", "1,2,4,8,16,32,64", "--targets",
         "query,key,value,dense", "--epochs", "3", "--batch-size", "16", "--lr", "5e-4", "--max-length", "128"],
        True,
    ),
    "minilm-sms-variants": (
        "all-MiniLM-L6-v2 on SMS spam (balanced 1045 / 149 / 300): LoRA, DoRA, rsLoRA, PiSSA and LoRA+ by rank",
        ["--model", "minilm-l6", "--dataset", "sms-spam", "--ranks", "1,2,4,8,16,32", "--seeds", "123,124",
         "--epochs", "2", "--batch-size", "16", "--lr", "5e-4", "--max-length", "128"],
        True,
    ),
    "smollm2-instructions-variants": (
        "SmolLM2-135M-Instruct, instruction tuning (935 / 55 / 110): LoRA, DoRA, rsLoRA, PiSSA and LoRA+ at r = 8",
        ["--model", "smollm2-135m", "--dataset", "instructions", "--ranks", "8", "--epochs", "1",
         "--batch-size", "8", "--lr", "5e-4", "--max-length", "256"],
        True,
    ),
    "smollm2-instructions": (
        "SmolLM2-135M-Instruct, instruction tuning on the book's Alpaca-style set (935 / 55 / 110)",
        ["--model", "smollm2-135m", "--dataset", "instructions", "--ranks", "4,8,16,32", "--epochs", "1",
         "--batch-size", "8", "--lr", "5e-4", "--max-length", "256"],
        True,
    ),
    "gpt2-sms": (
        "GPT-2 124M to 1558M (lora_lab's GPTModel) on SMS spam, the book's chapter 6 setting",
        ["--model", "gpt2-124m,gpt2-355m,gpt2-774m,gpt2-1558m", "--dataset", "sms-spam", "--ranks", "1,4,16,64",
         "--epochs", "3", "--batch-size", "8", "--lr", "5e-4", "--max-length", "120"],
        True,
    ),
    "openllama-instructions": (
        "OpenLLaMA 3B, QLoRA (NF4 base) instruction tuning, r = 4, 8, 16, 32 (the published sweep's ranks)",
        ["--model", "openllama-3b", "--dataset", "instructions", "--ranks", "4,8,16,32", "--epochs", "2",
         "--batch-size", "4", "--grad-accum", "4", "--lr", "3e-4", "--max-length", "512", "--quantize", "nf4",
         "--bf16", "--gradient-checkpointing"],
        False,
    ),
}  # fmt: skip
# Cases that are several grids into one sweep directory (the summary compares every series of them):
# one grid is a product of its lists, and the variants study wants five series, not all their products.
VARIANT_GRIDS = [["--variants", "lora,dora"], ["--scalings", "rslora"], ["--inits", "pissa"], ["--lr-ratios", "16"]]
GRIDS = {"minilm-sms-variants": VARIANT_GRIDS, "smollm2-instructions-variants": VARIANT_GRIDS}


def run(case: str, extra: list[str]) -> int:
    title, args, analyze = CASES[case]
    out = HERE / "runs" / f"sweep-{case}"
    results = HERE / "results" / f"sweep-{case}"
    start = time.perf_counter()
    grids = GRIDS.get(case, [[]])
    for grid in grids:
        code = main(["sweep", *args, *grid, *extra, "--out", str(out)])
        if code:
            return code
    if not (out / "summary.md").is_file():
        return 1
    if analyze:
        code = main(["analyze", str(out)])
        if code:
            return code
    for path in sorted(out.glob("*.csv")) + sorted(out.glob("*.png")) + sorted(out.glob("*.md")):
        write_bytes(results / path.name, path.read_bytes())
    seconds = time.perf_counter() - start
    command = "; ".join("lora-lab sweep " + " ".join(args + grid + extra) for grid in grids)
    from lora_lab.sweep import read_rows

    trained = sum(float(r["seconds"] or 0) for r in read_rows(out))
    text = header(title, seconds) + f"Runs `{command}` (then `lora-lab analyze`). The points' own training time adds "
    text += f"up to {trained / 60:.1f} min (what a resumed command skips is not in its wall time).\n\n"
    text += (out / "summary.md").read_text().split("\n", 2)[2]
    if (out / "analysis.md").is_file():
        text += "\n" + (out / "analysis.md").read_text()
    write_text(results / "README.md", text)
    print(f"results in {results}: sweep.csv, summary.md, sweep.png" + (", analysis" if analyze else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CASES:
        print(__doc__)
        raise SystemExit(2)
    if "--random-init" in sys.argv[2:]:
        if sys.argv[1] != "openllama-instructions":
            raise SystemExit("--random-init is for openllama-instructions (memory and speed without the weights)")
        import qlora_3b

        raise SystemExit(qlora_3b.main([a for a in sys.argv[2:] if a != "--random-init"]))
    raise SystemExit(run(sys.argv[1], sys.argv[2:]))
