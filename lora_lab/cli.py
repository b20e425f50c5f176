"""`lora-lab` on the command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .models import build_model, default_model, model_spec
from .options import build_parser
from .params import REPORT_DECIMALS, rank_report
from .report import markdown_table
from .targets import classifier_head_name, did_you_mean


def _items(values: Sequence | str | float | None, unique: bool = True) -> list[str]:
    """A CLI list given as `8,16,64`, `8 16 64` or a mix, or a config file's list or single value, in
    order: each item once, unless not `unique`."""
    values = values if isinstance(values, list | tuple) else [] if values is None else [values]
    items = [item for value in values for item in str(value).split(",") if item]
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


def _report(args) -> int:
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: give 1 or more")
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
                gpus=args.gpus,
                sharding=args.sharding,
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


def _train_config(args, sweep: bool = False):
    """The TrainConfig the options of `train` describe, or of `sweep` (whose points set their own
    model, rank, alpha, targets ...: those of the options are lists)."""
    import dataclasses

    from .config import TrainConfig
    from .data import DATASETS, FILE_PREFIXES

    if not isinstance(args.dataset, str) or not (args.dataset in DATASETS or args.dataset.startswith(FILE_PREFIXES)):
        close = did_you_mean(args.dataset, DATASETS) if isinstance(args.dataset, str) else ""
        raise ValueError(f"unknown dataset {args.dataset!r}{close}: use one of {', '.join(DATASETS)}")
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name in args and not (sweep and f.metadata["point"])]
    values = {f.name: getattr(args, f.name) for f in fields}
    # files by their absolute path: the same command (or its config.json) from another folder names other files
    values["dataset"] = _absolute(args.dataset)
    if isinstance(args.data_path, str) and args.data_path:
        values["data_path"] = _absolute(args.data_path)
    if isinstance(values.get("model"), str) and values["model"]:
        values["model"] = _model_path(values["model"])
    if getattr(args, "full", False):  # --full: the same as --no-balanced
        values["balanced"] = False
    weights = _numbers(args.class_weights or [], "--class-weights", float, unique=False)
    if args.class_weights is not None and not weights:
        raise ValueError("--class-weights takes one weight per class, such as 1,3")
    values["class_weights"] = weights or None
    values["report_to"] = _items(args.report_to) if args.report_to else None
    if "targets" in values:
        targets = _items(values["targets"]) if values["targets"] is not None else []
        values["targets"] = "all-linear" if targets == ["all-linear"] else targets
    values["model"] = values.get("model") or ""  # "": the dataset's default model
    return TrainConfig(**values)


def _model_path(model: str) -> str:
    """A local model folder by its absolute path (as the sweep keys it); a registry name or hub id as given."""
    from .gpt2_weights import is_path_like

    return str(Path(model).expanduser().resolve()) if is_path_like(model) else model


def _sets(targets) -> list[list[str]]:
    """A sweep's target sets: --targets a b --targets c on the command line; in a file a list of sets,
    or one set (a name, or a list of names, as train takes it)."""
    if targets is None:
        return [["all-linear"]]
    if isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return [_items(targets)]
    return [_items(t) for t in targets]


def _absolute(spec: str) -> str:
    """A file or folder by its absolute path, its prefix kept (csv:, jsonl:, hf:); a name as given
    (sms-spam, a hub dataset's hf:NAME)."""
    from .data import DATASETS, FILE_PREFIXES

    prefix, _, path = spec.partition(":") if spec.startswith(FILE_PREFIXES) else ("", "", spec)
    if prefix == "hf" and not Path(path).expanduser().exists():
        return spec  # a hub name
    if not prefix and spec in DATASETS:
        return spec
    return f"{prefix}:{Path(path).expanduser().resolve()}" if prefix else str(Path(path).expanduser().resolve())


def _train(args) -> int:
    from .distributed import world
    from .loop import TrainingError
    from .run import train

    cfg = _train_config(args)
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


def _sweep(args) -> int:
    from .report import PLOT, SUMMARY
    from .sweep import CSV_NAME, grid, run_sweep, shard_from_env, target_set
    from .tracking import check_trackers

    models = _items(args.model or [default_model(args.dataset)])
    for name in models:
        model_spec(name)  # an unknown model fails now, not after the first points trained
    if args.alphas is not None and args.alpha_ratio is not None:  # a file's alphas and a flag's ratio, or both
        raise ValueError(f"--alphas {args.alphas} and --alpha-ratio {args.alpha_ratio}: give one (a config file's "
                         "alphas: null lets --alpha-ratio apply)")  # fmt: skip
    points = grid(
        models,
        _ranks(args.ranks),
        alphas=_numbers(args.alphas, "--alphas", float) if args.alphas is not None else None,
        alpha_ratio=_alpha_ratio(args),
        scalings=_items(args.scalings),
        target_sets=[target_set(t) for t in _sets(args.targets)],
        seeds=_numbers(args.seeds, "--seeds"),
        variants=_items(args.variants),
        inits=_items(args.inits),
        lr_ratios=_numbers(args.lr_ratios, "--lr-ratios", float),
    )
    base = _train_config(args, sweep=True)
    together = args.ddp or base.fsdp  # every point on all processes together: DDP, or the model sharded
    if base.fsdp:  # a point --fsdp does not take is refused before the first point trains
        from .run import check_fsdp
        from .sweep import point_config

        for point in points:
            check_fsdp(point_config(base, point), distributed=int(os.environ.get("WORLD_SIZE", 1)) > 1)
    if together and args.shard:
        raise ValueError("--ddp / --fsdp train every point on all processes together; they do not take --shard")
    shard = (0, 1) if together else shard_from_env(args.shard)
    check_trackers(base.report_to or [])  # before the sweep's directory is made
    stats = run_sweep(base, points, args.out, shard, ddp=together, options=_sweep_options(args, base, points))
    out = Path(args.out)
    if stats["summary"]:
        print((out / SUMMARY).read_text().split("![")[0].rstrip())
        print(f"\nCSV {out / CSV_NAME}, plot {out / PLOT}, summary {out / SUMMARY}, runs under {out / 'runs'}")
    else:
        print(f"{stats['trained']} points trained here; the summary comes when the last point of {out} is done")
    return 0


def _alpha_ratio(args) -> float:
    """--alpha-ratio, 2 when neither it nor --alphas is given (alpha = 2 x rank)."""
    return args.alpha_ratio if args.alpha_ratio is not None else 2.0


def _sweep_options(args, base, points) -> dict:
    """The sweep's options as a config file holds them: the grid's lists as the points have them (a
    model as given, ranks as numbers), the training options as the base config has them."""
    import dataclasses

    from .config import TrainConfig

    def each(key: str) -> list:
        return list(dict.fromkeys(getattr(p, key) for p in points))

    grid = {"model": each("model"), "ranks": each("rank"), "scalings": each("scaling"), "variants": each("variant"),
            "inits": each("init"), "lr_ratios": each("lr_ratio"), "seeds": each("seed"), "ddp": args.ddp,
            "targets": [t.split("+") for t in each("targets")]}  # fmt: skip
    ratio = _alpha_ratio(args)
    given = {"alphas": each("alpha"), "alpha_ratio": None} if args.alphas else {"alphas": None, "alpha_ratio": ratio}
    grid.update(given)
    fixed = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if not f.metadata.get("point")}
    return {**grid, **fixed}


def _analyze(args) -> int:
    from .analyze import analyze_sweep

    analyze_sweep(args.dir)
    out = Path(args.dir)
    text = (out / "analysis.md").read_text()
    print("\n".join(line for line in text.splitlines() if line.startswith("- ")))
    files = "\n".join(f"  {p}" for p in sorted(out.glob("analysis*")))
    print(f"\nwritten:\n{files}")
    return 0


def _inputs(args, what: str) -> list:
    """The texts (or instructions) a command was given: as arguments, from --file, or on standard input."""
    from .records import read_rows, read_texts

    if args.file and getattr(args, what):
        raise ValueError(f"give {what} as arguments or in --file, not both")
    if what == "instructions" and args.file and Path(args.file).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        entries = read_rows(args.file)
        bad = [i for i, e in enumerate(entries, start=1) if e.get("instruction") in (None, "")]
        if bad:
            raise ValueError(f"{args.file}: entry {bad[0]} has no instruction (entries: instruction, and input "
                             "if it has one)")  # fmt: skip
        return [{"instruction": str(e["instruction"]), "input": "" if e.get("input") is None else str(e["input"])}
                for e in entries]  # fmt: skip
    items = getattr(args, what) or read_texts(args.file or "-", getattr(args, "column", None))
    if what == "instructions":  # one a line; a blank line asks nothing
        items = [item for item in items if item.strip()]
    if not items:
        raise ValueError(f"no {what}: give them as arguments, in --file FILE, or on standard input")
    return items if what == "texts" else [{"instruction": i, "input": args.input} for i in items]


def _emit(text: str, count: int, out: str | None) -> None:
    """Print the text, or write it to `out` (atomically)."""
    if out:
        from .files import write_text

        write_text(Path(out), text)
        print(f"wrote {count} rows to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _classify(args) -> int:
    from .files import csv_text
    from .run import classify, load_run

    texts = _inputs(args, "texts")
    cfg, loaded, labels = load_run(args.run, task="classification")
    probs = classify(cfg, loaded, texts, args.batch_size)
    rows = []
    for text, p in zip(texts, probs, strict=True):
        best = int(p.argmax())
        rows.append({"text": text, "label": labels[best], "probability": round(float(p[best]), 6),
                     "probabilities": dict(zip(labels, (round(float(x), 6) for x in p), strict=True))})  # fmt: skip
    form = "jsonl" if args.json else args.format
    if form == "jsonl":
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    elif form == "csv":
        flat = [{**{k: r[k] for k in ("text", "label", "probability")}, **{f"p_{k}": v for k, v in
                 r["probabilities"].items()}} for r in rows]  # fmt: skip
        _emit(csv_text(flat), len(rows), args.out)
        return 0
    else:  # one line per text: a backslash, tab or line break inside the text is written \\, \t, \n, \r
        escape = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
        lines = [f"{r['label']}\t{r['probability']:.3f}\t{r['text'].translate(escape)}" for r in rows]
    _emit("".join(line + "\n" for line in lines), len(rows), args.out)
    return 0


def _generate(args) -> int:
    from tqdm.auto import tqdm

    from .run import answer, load_run

    entries = _inputs(args, "instructions")
    cfg, loaded, _ = load_run(args.run, task="causal-lm")
    lines = []
    for entry in tqdm(entries, desc="generate", leave=False, disable=None if len(entries) > 1 else True):
        response = answer(loaded, cfg.template, entry["instruction"], entry["input"], args.max_new_tokens)
        if args.format == "jsonl":
            lines.append(json.dumps({**entry, "response": response}, ensure_ascii=False))
        else:
            given = f"\nInput: {entry['input']}" if entry["input"] else ""
            lines += [f"Instruction: {entry['instruction']}{given}\nResponse: {response}", ""]
    _emit("".join(line + "\n" for line in lines), len(entries), args.out)
    return 0


HANDLERS = {"report": _report, "train": _train, "sweep": _sweep, "analyze": _analyze, "classify": _classify,
            "generate": _generate}  # fmt: skip


def _what_is_kept(command: str, args) -> str:
    """What an interrupted command leaves on disk, and how to go on."""
    if command == "train":
        return f"Finished epochs are kept in {args.out} (checkpoint.pt): run the same command to resume."
    if command == "sweep":
        return f"Finished points are kept in {args.out}/sweep.csv: run the same command to resume the rest."
    return "Nothing was left half written."


def main(argv: Sequence[str] | None = None) -> int:
    parsed = build_parser().parse_args(argv)
    command = parsed.command
    args = parsed[command]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            code = HANDLERS[command](args)
        except (ValueError, TypeError, OSError) as err:  # bad input, or a file or hub model not found
            print(f"lora-lab {command}: error: {err}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
            print(f"\nlora-lab {command}: stopped. {_what_is_kept(command, args)}", file=sys.stderr)
            code = 130
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"lora-lab {command}: warning: {message}", file=sys.stderr)
    if code == 0 and command in ("train", "sweep"):
        from .distributed import leave

        leave()  # under torchrun: every process done before any exits
    return code


if __name__ == "__main__":
    raise SystemExit(main())
