"""`lora-lab` on the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from collections.abc import Sequence

from .inject import classifier_head_name
from .models import MODELS, build_model, model_spec
from .params import REPORT_DECIMALS, markdown_table, rank_report

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
DESCRIPTION = (
    "lora_lab: LoRA fine-tuning you can read, cross-checked against Hugging Face PEFT. `lora-lab report` counts "
    "what LoRA trains and the memory it takes, at every rank, for any model; `lora-lab train` fine-tunes; "
    "`classify` and `generate` use a trained run."
)


def _items(values: Sequence[str]) -> list[str]:
    """A CLI list given as `8,16,64`, `8 16 64` or a mix: each item once, in order."""
    return list(dict.fromkeys(item for value in values for item in value.split(",") if item))


def _ranks(values: Sequence[str]) -> list[int]:
    ranks = []
    for item in _items(values):
        try:
            ranks.append(int(item))
        except ValueError:
            raise ValueError(f"--ranks takes whole numbers such as 8,16,64; got {item!r}") from None
    return ranks


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _report(args: argparse.Namespace) -> int:
    spec = model_spec(args.model)
    targets = _items(args.targets)
    rows = rank_report(
        lambda: build_model(args.model, "meta"),
        _ranks(args.ranks),
        "all-linear" if targets == ["all-linear"] else targets,
    )
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    model = build_model(args.model, "meta")
    head = classifier_head_name(model)
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
    modules = _plural(int(rows[0]["lora_modules"]), "module")
    frozen = f"base frozen but the classification head {head!r}, which trains whole" if head else "base frozen"
    print(f"{spec.description}: LoRA on {modules} (targets: {', '.join(targets)}), {frozen}; counted on meta")
    print(f"memory in MiB: weights as stored ({dtypes}), gradients and AdamW state of the trainable ones\n")
    print(markdown_table(rows, REPORT_DECIMALS))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .train import TrainConfig, TrainingError, train

    if not (args.dataset in DATASETS or args.dataset.startswith("csv:")):
        raise ValueError(f"unknown dataset {args.dataset!r}: use one of {', '.join(DATASETS)}")
    targets = _items(args.targets)
    defaults = TrainConfig()
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_path=args.data_path,
        text_column=args.text_column,
        label_column=args.label_column,
        balanced=not args.full,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        dropout=args.dropout,
        use_rslora=args.rslora,
        targets="all-linear" if targets == ["all-linear"] else targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else defaults.lr,
        schedule=args.schedule,
        warmup=args.warmup,
        seed=args.seed,
        max_length=args.max_length,
        template=args.template,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
        max_steps=args.max_steps,
        class_weights=[float(w) for w in _items(args.class_weights)] if args.class_weights else None,
    )
    try:
        metrics = train(cfg, args.out)
    except TrainingError as err:
        print(f"lora-lab train: error: {err}", file=sys.stderr)
        return 1
    shown = {k: metrics[k] for k in ("trainable_params", "train_seconds", "tokens_per_second", "peak_memory_mib")}
    if "test" in metrics:
        t = metrics["test"]
        print(
            f"test accuracy {100 * t['accuracy']:.2f}%, {t['positive_class']} precision {t['precision']:.3f} "
            f"recall {t['recall']:.3f} F1 {t['f1']:.3f} (macro F1 {t['macro_f1']:.3f})"
        )
    else:
        print(f"test loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.2f})")
    print(", ".join(f"{k} {v}" for k, v in shown.items()) + f"; run in {args.out}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    import torch

    from .train import collate_for, forward_logits, load_run

    cfg, loaded, labels = load_run(args.run, task="classification")
    collate = collate_for(cfg, loaded.tokenizer)  # as in training: same padding, same pooling
    rows = [(text, 0) for text in args.texts]
    # The book's last-position pooling reads whatever the last position holds: without a fixed
    # length (pad_to) that depends on the other texts of the batch, so each text goes alone.
    groups = [[row] for row in rows] if cfg.pooling == "last-position" and not cfg.pad_to else [rows]
    with torch.no_grad():
        probs = torch.cat(
            [forward_logits(loaded.model, collate(g), loaded.kind, "classification", cfg.pooling) for g in groups]
        ).softmax(-1)
    for text, p in zip(args.texts, probs, strict=True):
        best = int(p.argmax())
        print(f"{labels[best]}\t{p[best]:.3f}\t{text}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .train import load_run

    cfg, loaded, _ = load_run(args.run, task="causal-lm")
    for instruction in args.instructions:
        print(answer(loaded, cfg.template, instruction, args.input, args.max_new_tokens))
    return 0


def answer(loaded, template: str, instruction: str, context: str = "", max_new_tokens: int = 128) -> str:
    """The tuned model's greedy answer to an instruction (with an optional input)."""
    import torch

    from .gpt2 import generate

    tok = loaded.tokenizer
    room = tok.max_length - max_new_tokens  # what the prompt may take of the context
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in {tok.max_length} tokens")
    prompt = tok.encode(tok.prompt({"instruction": instruction, "input": context}, template))
    ids = torch.tensor([prompt[-room:]])  # a prompt too long keeps its end, where the response starts
    with torch.no_grad():
        if loaded.kind == "gpt":
            out = generate(loaded.model, ids, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
        else:
            out = loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
            )  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :].tolist()).strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="trainable parameters and memory of LoRA at several ranks",
        description="Count total and trainable parameters, and training memory, for a list of LoRA ranks. "
        "The model is built on the meta device: nothing is allocated or downloaded, a 3B model takes seconds.",
    )
    report.add_argument(
        "--model",
        default="gpt2-124m",
        help=f"one of {', '.join(MODELS)}, or a directory holding a Hugging Face config.json (default: gpt2-124m)",
    )
    report.add_argument(
        "--ranks",
        nargs="+",
        default=[",".join(map(str, DEFAULT_RANKS))],
        metavar="R",
        help=f"LoRA ranks, as 8,16,64 or 8 16 64 (default: {','.join(map(str, DEFAULT_RANKS))})",
    )
    report.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="module names or dotted suffixes (q_proj,v_proj), or all-linear: every linear but the output head "
        "(default: all-linear)",
    )
    report.add_argument("--format", choices=["table", "csv"], default="table", help="markdown table (default) or CSV")
    report.set_defaults(handler=_report)

    train = sub.add_parser(
        "train",
        help="fine-tune a model with LoRA on a dataset; writes a run directory",
        description="Fine-tune with LoRA: classification (sms-spam, sentiment, csv:PATH) or instruction tuning "
        "(instructions). Writes config.json, the adapter with the trained head (and its PEFT export), "
        "metrics.json, history.csv/png and, for classification, confusion.png to --out. Run again with the "
        "same arguments to resume after the last finished epoch.",
    )
    train.add_argument("--model", default="gpt2-124m", help="any name lora-lab report knows, a local Hugging Face "
                       "directory or a hub id (default: gpt2-124m)")  # fmt: skip
    train.add_argument("--dataset", default="sms-spam", help="sms-spam, sentiment, instructions or csv:PATH "
                       "(default: sms-spam)")  # fmt: skip
    train.add_argument("--data-path", help="a local copy of the dataset (default: packaged or downloaded)")
    train.add_argument("--text-column", default="text", help="csv: the text column (default: text)")
    train.add_argument("--label-column", default="label", help="csv: the label column (default: label)")
    train.add_argument("--full", action="store_true", help="sms-spam: all 5,574 messages, not the book's 747 + 747")
    train.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    train.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    train.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    train.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rsLoRA)")
    train.add_argument("--targets", nargs="+", default=["all-linear"], metavar="NAME",
                       help="modules to adapt (default: all-linear: every linear but the output head)")  # fmt: skip
    train.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    train.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    train.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default: 1)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4)")
    train.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                       help="after a linear warmup (default: cosine)")  # fmt: skip
    train.add_argument("--warmup", type=float, default=0.05, help="warmup, a fraction of the steps (default: 0.05)")
    train.add_argument("--seed", type=int, default=123, help="(default: 123)")
    train.add_argument("--max-length", type=int, help="tokens per example (default: the model's context)")
    train.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                       help="instructions: Alpaca prompt or the model chat template (default: alpaca)")  # fmt: skip
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (a quick check)")
    train.add_argument("--class-weights", nargs="+", metavar="W", help="loss weight of each class, as 1,3")
    train.add_argument("--out", required=True, help="the run directory")
    train.set_defaults(handler=_train)

    classify = sub.add_parser("classify", help="label texts with a trained classification run")
    classify.add_argument("--run", required=True, help="a lora-lab train run directory")
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.set_defaults(handler=_classify)

    gen = sub.add_parser("generate", help="answer instructions with an instruction-tuned run")
    gen.add_argument("--run", required=True, help="a lora-lab train run directory (dataset instructions)")
    gen.add_argument("--input", default="", help="the instruction's input, if it has one")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    gen.add_argument("instructions", nargs="+", metavar="INSTRUCTION")
    gen.set_defaults(handler=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            code = args.handler(args)
        except (ValueError, TypeError, OSError) as err:  # bad input, or a file or hub model not found
            print(f"lora-lab {args.command}: error: {err}", file=sys.stderr)
            code = 2
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"lora-lab {args.command}: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
