"""`lora-lab` on the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .models import ALIASES, MODELS, build_model, default_model, model_spec
from .params import REPORT_DECIMALS, rank_report
from .report import markdown_table
from .targets import classifier_head_name, did_you_mean
from .variants import INITS

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
MODEL_HELP = f"{', '.join(MODELS)} (or {', '.join(ALIASES)}), a local Hugging Face directory or a hub id"
DESCRIPTION = (
    "lora_lab: LoRA fine-tuning you can read, cross-checked against Hugging Face PEFT. `lora-lab report` counts "
    "what LoRA trains and the memory it takes, at every rank, for any model; `lora-lab train` fine-tunes; "
    "`sweep` trains one run per rank and summarises, `analyze` reads what the adapters learned; `classify` and "
    "`generate` use a trained run."
)


def _items(values: Sequence[str], unique: bool = True) -> list[str]:
    """A CLI list given as `8,16,64`, `8 16 64` or a mix, in order: each item once, unless not `unique`."""
    items = [item for value in values for item in value.split(",") if item]
    return list(dict.fromkeys(items)) if unique else items


def _numbers(values: Sequence[str], option: str, kind: type = int, unique: bool = True) -> list:
    """A CLI list of numbers (`kind` int or float), each once if `unique`, or an error naming the option."""
    numbers = []
    for item in _items(values, unique):
        try:
            numbers.append(kind(item))
        except ValueError:
            example = "8,16,64" if kind is int else "8,16,32.5"
            what = "whole numbers" if kind is int else "numbers"
            raise ValueError(f"{option} takes {what} such as {example}; got {item!r}") from None
    return numbers


def _ranks(values: Sequence[str]) -> list[int]:
    return _numbers(values, "--ranks")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _report(args: argparse.Namespace) -> int:
    models = _items(args.model)
    sets = [_items(t) for t in args.targets or [["all-linear"]]]
    rows = []
    for name in models:
        spec = model_spec(name)
        for targets in sets:
            rows += rank_report(
                lambda spec=spec: build_model(spec.name, "meta"),
                _ranks(args.ranks),
                "all-linear" if targets == ["all-linear"] else targets,
                model_name=name,
                use_dora=args.dora,
            )
    if args.out:
        from .report import write_report

        written = write_report(rows, args.out)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if args.format == "csv":
        from .files import csv_text

        sys.stdout.write(csv_text(rows))
        return 0
    for name in models:
        model = build_model(name, "meta")
        head = classifier_head_name(model)
        dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
        sets = {r["targets"]: int(r["lora_modules"]) for r in rows if r["model"] == name}
        modules = ", ".join(f"{_plural(n, 'module')} ({targets})" for targets, n in sets.items())
        frozen = f"base frozen but the classification head {head!r}, which trains whole" if head else "base frozen"
        print(f"{model_spec(name).description} ({dtypes}): LoRA on {modules}, {frozen}; counted on meta")
    print(f"training memory in MiB: weights, gradients and AdamW state (no activations). {MEMORY_NOTE}\n")
    print(markdown_table(rows, REPORT_DECIMALS))
    return 0


MEMORY_NOTE = (
    "lora_*: LoRA in fp32 over a frozen base in fp32 or bf16; qlora_nf4: the base's linears in 4-bit NF4 "
    "(double quantization), the rest in bf16; full_*: every weight trained, in fp32 or in bf16 (bf16 AdamW state)."
)


def _train_config(args: argparse.Namespace, **point: object):
    """The TrainConfig the options of `train` (and `sweep`, which sets the point's fields) describe."""
    import dataclasses

    from .config import TrainConfig
    from .data import DATASETS

    if not (args.dataset in DATASETS or args.dataset.startswith("csv:")):
        close = did_you_mean(args.dataset, DATASETS)
        raise ValueError(f"unknown dataset {args.dataset!r}{close}: use one of {', '.join(DATASETS)}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    # files by their absolute path: the same command from another folder names other files
    if args.dataset.startswith("csv:"):
        values["dataset"] = f"csv:{_absolute(args.dataset[4:])}"
    if args.data_path:
        values["data_path"] = _absolute(args.data_path)
    weights = _numbers(args.class_weights or [], "--class-weights", float, unique=False)
    if args.class_weights is not None and not weights:
        raise ValueError("--class-weights takes one weight per class, such as 1,3")
    values["class_weights"] = weights or None
    return TrainConfig(**{**values, **point})


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _train(args: argparse.Namespace) -> int:
    from .distributed import world
    from .loop import TrainingError
    from .run import train

    targets = _items(args.targets)
    cfg = _train_config(
        args,
        model=args.model or default_model(args.dataset),
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * max(args.rank, 1),  # a bad --rank is named alone
        use_rslora=args.rslora,
        use_dora=args.use_dora,
        init=args.init,
        lr_ratio=args.lr_ratio,
        targets="all-linear" if targets == ["all-linear"] else targets,
        seed=args.seed,
        device=args.device,
    )
    try:
        metrics = train(cfg, args.out)
    except TrainingError as err:
        print(f"lora-lab train: error: {err}", file=sys.stderr)
        return 1
    if world()[0] != 0:
        return 0  # under torchrun, rank 0 reports
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


def _sweep(args: argparse.Namespace) -> int:
    from .report import PLOT, SUMMARY
    from .sweep import CSV_NAME, grid, run_sweep, shard_from_env, target_set

    models = _items(args.model or [default_model(args.dataset)])
    for name in models:
        model_spec(name)  # an unknown model fails now, not after the first points trained
    points = grid(
        models,
        _ranks(args.ranks),
        alphas=_numbers(args.alphas, "--alphas", float) if args.alphas else None,
        alpha_ratio=args.alpha_ratio,
        scalings=_items(args.scalings),
        target_sets=[target_set(_items(t)) for t in args.targets or [["all-linear"]]],
        seeds=_numbers(args.seeds, "--seeds"),
        variants=_items(args.variants),
        inits=_items(args.inits),
        lr_ratios=_numbers(args.lr_ratios, "--lr-ratios", float),
    )
    if args.ddp and args.shard:
        raise ValueError("--ddp trains every point on all processes together; it does not take --shard")
    shard = (0, 1) if args.ddp else shard_from_env(args.shard)
    stats = run_sweep(_train_config(args, device=args.device), points, args.out, shard, ddp=args.ddp)
    out = Path(args.out)
    if stats["summary"]:
        print((out / SUMMARY).read_text().split("![")[0].rstrip())
        print(f"\nCSV {out / CSV_NAME}, plot {out / PLOT}, summary {out / SUMMARY}, runs under {out / 'runs'}")
    else:
        print(f"{stats['trained']} points trained here; the summary comes when the last point of {out} is done")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_sweep

    analyze_sweep(args.dir)
    out = Path(args.dir)
    text = (out / "analysis.md").read_text()
    print("\n".join(line for line in text.splitlines() if line.startswith("- ")))
    files = "\n".join(f"  {p}" for p in sorted(out.glob("analysis*")))
    print(f"\nwritten:\n{files}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    import torch

    from .run import load_run

    cfg, loaded, labels = load_run(args.run, task="classification")
    task = cfg.make_task(loaded.kind)
    collate = task.collate(loaded.tokenizer)  # as in training: same padding, same pooling
    rows = [(text, 0) for text in args.texts]
    # The book's last-position pooling reads whatever the last position holds: without a fixed
    # length (pad_to) that depends on the other texts of the batch, so each text goes alone.
    groups = [[row] for row in rows] if cfg.pooling == "last-position" and not cfg.pad_to else [rows]
    with torch.no_grad():
        probs = torch.cat([task.logits(loaded.model, collate(g)) for g in groups]).softmax(-1)
    for text, p in zip(args.texts, probs, strict=True):
        best = int(p.argmax())
        if args.json:
            print(json.dumps({"text": text, "label": labels[best], "probability": round(float(p[best]), 6),
                              "probabilities": dict(zip(labels, (round(float(x), 6) for x in p), strict=True))},
                             ensure_ascii=False))  # fmt: skip
        else:  # one line per text: a tab or a newline inside the text is written as \t, \n
            print(f"{labels[best]}\t{p[best]:.3f}\t{json.dumps(text, ensure_ascii=False)[1:-1]}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .run import answer, load_run

    cfg, loaded, _ = load_run(args.run, task="causal-lm")
    for instruction in args.instructions:
        print(answer(loaded, cfg.template, instruction, args.input, args.max_new_tokens))
    return 0


def _training_options(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The options `train` and `sweep` share, one per TrainConfig field (its help, its default, or the
    command's own from `defaults`): data, optimisation, precision, device. The fields a point sets
    (model, rank, alpha, targets, seed) are the command's own options."""
    import dataclasses

    from .config import TrainConfig

    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli == "":
            continue
        flag, extra = cli or "--" + f.name.replace("_", "-"), dict(f.metadata.get("argparse", {}))
        default = (defaults or {}).get(f.name, f.default)
        shown = "" if default is None else f" (default: {default})"
        if f.type == "bool":
            action = "store_false" if cli else ("store_true" if not default else argparse.BooleanOptionalAction)
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=f.metadata["help"])
        elif f.type.startswith("list["):
            parser.add_argument(flag, dest=f.name, nargs="+", help=f.metadata["help"], **extra)
        else:
            kind = kinds[f.type.split(" |")[0]]
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=f.metadata["help"] + shown,
                                **extra)  # fmt: skip


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
        "--models",
        "--model",
        dest="model",
        nargs="+",
        default=["gpt2-124m"],
        metavar="NAME",
        help=f"one or more of {', '.join(MODELS)}, or directories holding a Hugging Face config.json "
        "(default: gpt2-124m)",
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
        action="append",
        metavar="NAME",
        help="module names or dotted suffixes (q_proj,v_proj), or all-linear: every linear but the output head "
        "(default: all-linear); repeat --targets to compare target sets",
    )
    report.add_argument(
        "--dora", action="store_true", help="DoRA: count its magnitude vector (one per output channel) too"
    )
    report.add_argument("--out", help="also write DIR/param_report.csv, .md and .png (a plot against the rank)")
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
    train.add_argument("--model", help=f"{MODEL_HELP} (default: minilm-l6 for classification, smollm2-135m for "
                       "instructions: both install offline)")  # fmt: skip
    train.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    train.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    train.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rsLoRA)")
    train.add_argument("--use-dora", action="store_true", help="DoRA: a learned length per output channel")
    train.add_argument("--init", default="kaiming", choices=INITS, help="how LoRA starts: kaiming (PEFT's default), "
                       "gaussian, or pissa / olora from W's principal directions (default: kaiming)")  # fmt: skip
    train.add_argument("--lr-ratio", type=float, default=1.0, help="LoRA+: B's learning rate over A's (default: 1)")
    train.add_argument("--targets", nargs="+", default=["all-linear"], metavar="NAME",
                       help="modules to adapt (default: all-linear: every linear but the output head)")  # fmt: skip
    train.add_argument("--seed", type=int, default=123, help="(default: 123)")
    _training_options(train)
    train.add_argument("--out", required=True, help="the run directory")
    train.set_defaults(handler=_train)

    sweep = sub.add_parser(
        "sweep",
        help="train one LoRA run per rank (and alpha, scaling, targets, seed, model); CSV, plot, summary",
        description="A rank sweep: one `lora-lab train` run per point of the grid (the product of the lists), each "
        "finished point a row of DIR/sweep.csv; then DIR/summary.md (the best rank, chosen on validation) and "
        "DIR/sweep.png. Run it again to resume: finished points are skipped. Spread the points over processes with "
        "torchrun (`torchrun --nproc_per_node 4 -m lora_lab.cli sweep ...`: one point per GPU) or --shard I/N. "
        "With no options: all-MiniLM-L6-v2 on the packaged SMS spam data, ranks 1,4,16, a few minutes on a laptop.",
    )
    sweep.add_argument("--model", nargs="+", metavar="NAME", help=f"one or more models: {MODEL_HELP} (default: "
                       "minilm-l6, smollm2-135m for instructions)")  # fmt: skip
    sweep.add_argument("--ranks", nargs="+", default=["1,4,16"], metavar="R", help="(default: 1,4,16)")
    alpha = sweep.add_mutually_exclusive_group()
    alpha.add_argument("--alphas", nargs="+", metavar="A", help="LoRA alphas to cross with the ranks")
    alpha.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio x rank (default: 2)")
    sweep.add_argument("--scalings", nargs="+", default=["standard"], metavar="S",
                       help="standard (alpha / r), rslora (alpha / sqrt(r)), or both (default: standard)")  # fmt: skip
    sweep.add_argument("--targets", nargs="+", action="append", metavar="NAME",
                       help="a target set, as for train; repeat --targets for several sets "
                       "(default: all-linear)")  # fmt: skip
    sweep.add_argument("--variants", nargs="+", default=["lora"], metavar="V",
                       help="lora, dora (weight-decomposed), or both (default: lora)")  # fmt: skip
    sweep.add_argument("--inits", nargs="+", default=["kaiming"], metavar="I",
                       help=f"how LoRA starts, any of {', '.join(INITS)} (default: kaiming)")  # fmt: skip
    sweep.add_argument("--lr-ratios", nargs="+", default=["1"], metavar="X",
                       help="LoRA+: B's learning rate over A's, as 1,16 (default: 1)")  # fmt: skip
    sweep.add_argument("--seeds", nargs="+", default=["123"], metavar="S", help="(default: 123)")
    _training_options(sweep, {"epochs": 2, "batch_size": 16, "lr": 5e-4, "max_length": 128})
    sweep.add_argument("--shard", metavar="I/N", help="train only points i, i+N, i+2N ... (job arrays; torchrun "
                       "sets this from RANK and WORLD_SIZE)")  # fmt: skip
    sweep.add_argument("--ddp", action="store_true", help="under torchrun: train each point on all processes "
                       "together (DistributedDataParallel) instead of one point per process")  # fmt: skip
    sweep.add_argument("--out", default="lora-lab-sweep", help="the sweep directory (default: lora-lab-sweep)")
    sweep.set_defaults(handler=_sweep)

    analyze = sub.add_parser(
        "analyze",
        help="what a sweep's adapters learned: spectra of dW = B A, subspace similarity between ranks, a rank",
        description="For every adapter a sweep saved: the singular values of dW = scaling * B A with its effective "
        "rank (exp of the entropy of the normalised singular values), stable rank and the rank holding 90% of the "
        "energy; the subspace similarity phi(i, j) between ranks (LoRA paper, section 7) over A and over dW; and a "
        "recommended rank: the smallest within the noise of the best validation metric whose top direction the "
        "larger ranks share. Writes DIR/analysis.md, analysis_*.csv and heatmaps.",
    )
    analyze.add_argument("dir", metavar="DIR", help="a lora-lab sweep directory")
    analyze.set_defaults(handler=_analyze)

    classify = sub.add_parser("classify", help="label texts with a trained classification run")
    classify.add_argument("--run", required=True, help="a lora-lab train run directory")
    classify.add_argument("--json", action="store_true", help="one JSON object per line: text, label, probabilities")
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.set_defaults(handler=_classify)

    gen = sub.add_parser("generate", help="answer instructions with an instruction-tuned run")
    gen.add_argument("--run", required=True, help="a lora-lab train run directory (dataset instructions)")
    gen.add_argument("--input", default="", help="the instruction's input, if it has one")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    gen.add_argument("instructions", nargs="+", metavar="INSTRUCTION")
    gen.set_defaults(handler=_generate)
    return parser


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves on disk, and how to go on."""
    if args.command == "train":
        return f"Finished epochs are kept in {args.out} (checkpoint.pt): run the same command to resume."
    if args.command == "sweep":
        return f"Finished points are kept in {args.out}/sweep.csv: run the same command to resume the rest."
    return "Nothing was left half written."


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            code = args.handler(args)
        except (ValueError, TypeError, OSError) as err:  # bad input, or a file or hub model not found
            print(f"lora-lab {args.command}: error: {err}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
            print(f"\nlora-lab {args.command}: stopped. {_what_is_kept(args)}", file=sys.stderr)
            code = 130
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"lora-lab {args.command}: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
