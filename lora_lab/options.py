"""The options of every `lora-lab` command, each defined once, and the config files that hold them.

`train` takes one option per `TrainConfig` field (its help, type and default are the field's);
`sweep` takes the same but for the fields a point sets, for which it takes lists (the grid).
Parsing is jsonargparse's: `--config FILE` (YAML or JSON) gives any option, flags after it override
it, and `--print_config` prints the options a command would run with. A run directory's config.json
and a sweep directory's config.json are such files: passed back with --config, they run again."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from .config import TrainConfig
from .models import ALIASES, MODELS
from .params import SHARDINGS
from .variants import INITS

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
MODEL_HELP = f"{', '.join(MODELS)} (or {', '.join(ALIASES)}), a local Hugging Face directory or a hub id"
SWEEP_DEFAULTS = {"epochs": 2, "batch_size": 16, "lr": 5e-4, "max_length": 128}  # a few minutes a point on a laptop
DESCRIPTION = (
    "lora_lab: LoRA fine-tuning you can read, cross-checked against Hugging Face PEFT. `lora-lab report` counts "
    "what LoRA trains and the memory it takes, at every rank, for any model; `lora-lab train` fine-tunes; "
    "`sweep` trains one run per rank and summarises, `analyze` reads what the adapters learned; `classify` and "
    "`generate` use a trained run. `train` and `sweep` read options from --config FILE (YAML or JSON; a run's "
    "or sweep's own config.json runs it again)."
)
CONFIG_HELP = (
    "a YAML or JSON file of options (keys as the options' names, with _ for -, e.g. batch_size: 16); "
    "options given after it override it (every true/false option has its --no- form). Relative paths in it are "
    "read from where you run the command; a run's or sweep's config.json (absolute paths) runs it again"
)


class HelpFormatter(DefaultHelpFormatter):
    """Each option's own help, and its default where it has one (not jsonargparse's type notes)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, ActionConfigFile) or "default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction | argparse._StoreFalseAction):
            return text if not action.default or "--no-" not in action.option_strings[-1] else f"{text} (default)"
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


class AppendSet(argparse.Action):
    """`--targets a b --targets c`: a list of sets. Given on the command line, the sets replace those
    of a config file (not added to them), as every other option does."""

    class Sets(list):
        pass

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        sets = current if isinstance(current, AppendSet.Sets) else AppendSet.Sets()
        sets.append(list(values))
        setattr(namespace, self.dest, sets)


def _field_type(f: dataclasses.Field) -> typing.Any:
    """What jsonargparse checks a config file's value against (a command line's item for lists)."""
    name = f.type.split(" |")[0]
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(name)
    return kind | None if " | None" in f.type else kind


def _add_field(parser: ArgumentParser, f: dataclasses.Field, default: typing.Any) -> None:
    """One TrainConfig field as an option."""
    cli, extra = f.metadata.get("cli"), dict(f.metadata.get("argparse", {}))
    flag, text = cli or "--" + f.name.replace("_", "-"), f.metadata["help"]
    if f.type == "bool":  # --x and --no-x, so a flag can undo a config file's value either way
        if cli and default:  # --full: the shorthand of --no-balanced, with a key of its own in a file
            parser.add_argument(cli, dest=cli[2:], action="store_true", help=f"the same as --no-{f.name}")
            flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif f.type.startswith("list["):  # items as 1,3 or 1 3; a config file's list as it is
        parser.add_argument(flag, dest=f.name, nargs="+", default=default, help=text, **extra)
    elif "choices" in extra:  # checked by argparse on the command line, by TrainConfig in a file
        parser.add_argument(flag, dest=f.name, default=default, help=text, **extra)
    else:
        parser.add_argument(flag, dest=f.name, type=_field_type(f), default=default, help=text, **extra)


def training_options(parser: ArgumentParser, points: bool, defaults: dict | None = None) -> None:
    """One option per TrainConfig field (its help, its default or the command's own from `defaults`);
    the fields a sweep point sets only if `points` (train), as sweep takes lists of them."""
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("point") and not points:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if f.name == "model" or f.name == "targets":
            default = None if f.name == "model" else [f.default]
        _add_field(parser, f, default)


def _sweep_grid(sweep: ArgumentParser) -> None:
    """The lists whose product is a sweep's grid."""
    sweep.add_argument("--model", nargs="+", metavar="NAME", help=f"one or more models: {MODEL_HELP} (default: "
                       "minilm-l6, smollm2-135m for instructions)")  # fmt: skip
    sweep.add_argument("--ranks", nargs="+", default=["1,4,16"], metavar="R", help="LoRA ranks, as 1,4,16")
    alpha = sweep.add_mutually_exclusive_group()
    alpha.add_argument("--alphas", nargs="+", metavar="A", help="LoRA alphas to cross with the ranks")
    alpha.add_argument("--alpha-ratio", type=float, help="alpha = ratio x rank (default: 2)")
    sweep.add_argument("--scalings", nargs="+", default=["standard"], metavar="S",
                       help="standard (alpha / r), rslora (alpha / sqrt(r)), or both")  # fmt: skip
    sweep.add_argument("--targets", nargs="+", action=AppendSet, metavar="NAME",
                       help="a target set, as for train; repeat --targets for several sets "
                       "(default: all-linear)")  # fmt: skip
    sweep.add_argument("--variants", nargs="+", default=["lora"], metavar="V",
                       help="lora, dora (weight-decomposed), or both")  # fmt: skip
    sweep.add_argument("--inits", nargs="+", default=["kaiming"], metavar="I",
                       help=f"how LoRA starts, any of {', '.join(INITS)}")  # fmt: skip
    sweep.add_argument("--lr-ratios", nargs="+", default=["1"], metavar="X",
                       help="LoRA+: B's learning rate over A's, as 1,16")  # fmt: skip
    sweep.add_argument("--seeds", nargs="+", default=["123"], metavar="S", help="seeds, as 123,124")


def _parser(**kwargs: typing.Any) -> ArgumentParser:
    return ArgumentParser(formatter_class=HelpFormatter, **kwargs)


def _report(sub) -> None:
    report = _parser(
        description="Count total and trainable parameters, and training memory, for a list of LoRA ranks. "
        "The model is built on the meta device: nothing is allocated or downloaded, a 3B model takes seconds."
    )
    report.add_argument("--models", "--model", dest="model", nargs="+", default=["gpt2-124m"], metavar="NAME",
                        help=f"one or more of {', '.join(MODELS)}, or directories holding a Hugging Face "
                        "config.json")  # fmt: skip
    report.add_argument("--ranks", nargs="+", default=[",".join(map(str, DEFAULT_RANKS))], metavar="R",
                        help="LoRA ranks, as 8,16,64 or 8 16 64")  # fmt: skip
    report.add_argument("--targets", nargs="+", action=AppendSet, metavar="NAME",
                        help="module names or dotted suffixes (q_proj,v_proj), or all-linear: every linear but the "
                        "output head (default: all-linear); repeat --targets to compare target sets")  # fmt: skip
    report.add_argument("--dora", action="store_true", help="DoRA: count its magnitude vector (one per output "
                        "channel) too")  # fmt: skip
    report.add_argument("--gpus", type=int, default=1, help="also each setting's memory on one of this many GPUs "
                        "(the *_per_gpu_mib columns)")  # fmt: skip
    report.add_argument("--sharding", choices=SHARDINGS, default="fsdp",
                        help="with --gpus: ddp, a whole copy on each GPU, or fsdp, each tensor sharded over them "
                        "(*_gathered_mib: the root and two blocks gathered whole for a while)")  # fmt: skip
    report.add_argument("--out", help="also write DIR/param_report.csv, .md and .png (a plot against the rank)")
    report.add_argument("--format", choices=["table", "csv"], default="table", help="markdown table or CSV")
    sub.add_subcommand("report", report, help="trainable parameters and memory of LoRA at several ranks")


def _train(sub) -> None:
    train = _parser(
        description="Fine-tune with LoRA: classification (sms-spam, sentiment, csv:PATH) or instruction tuning "
        "(instructions). Writes config.json, the adapter with the trained head (and its PEFT export), "
        "metrics.json, steps.csv, history.csv/png and, for classification, confusion.png to --out. Run again "
        "with the same arguments to resume after the last finished epoch; `--config RUN/config.json --out NEW` "
        "trains the same run again."
    )
    train.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    training_options(train, points=True)
    train.add_argument("--out", required=True, help="the run directory")
    sub.add_subcommand("train", train, help="fine-tune a model with LoRA on a dataset; writes a run directory")


def _sweep(sub) -> None:
    sweep = _parser(
        description="A rank sweep: one `lora-lab train` run per point of the grid (the product of the lists), each "
        "finished point a row of DIR/sweep.csv; then DIR/summary.md (the best rank, chosen on validation) and "
        "DIR/sweep.png. Run it again to resume: finished points are skipped. Spread the points over processes with "
        "torchrun (`torchrun --nproc_per_node 4 -m lora_lab.cli sweep ...`: one point per GPU) or --shard I/N. "
        "With no options: all-MiniLM-L6-v2 on the packaged SMS spam data, ranks 1,4,16, a few minutes on a laptop. "
        "DIR/config.json holds the options (the lists of every command run into DIR): `--config DIR/config.json "
        "--out NEW` runs the sweep again."
    )
    sweep.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    _sweep_grid(sweep)
    training_options(sweep, points=False, defaults=SWEEP_DEFAULTS)
    sweep.add_argument("--shard", metavar="I/N", help="train only points i, i+N, i+2N ... (job arrays; torchrun "
                       "sets this from RANK and WORLD_SIZE)")  # fmt: skip
    sweep.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=False,
                       help="under torchrun: train each point on all processes together (DistributedDataParallel) "
                       "instead of one point per process")  # fmt: skip
    sweep.add_argument("--out", default="lora-lab-sweep", help="the sweep directory")
    what = "train one LoRA run per rank (and alpha, scaling, targets, seed, model); CSV, plot, summary"
    sub.add_subcommand("sweep", sweep, help=what)


def _analyze(sub) -> None:
    analyze = _parser(
        description="For every adapter a sweep saved: the singular values of dW = scaling * B A with its effective "
        "rank (exp of the entropy of the normalised singular values), stable rank and the rank holding 90% of the "
        "energy; the subspace similarity phi(i, j) between ranks (LoRA paper, section 7) over A and over dW; and a "
        "recommended rank: the smallest within the noise of the best validation metric whose top direction the "
        "larger ranks share. Writes DIR/analysis.md, analysis_*.csv and heatmaps."
    )
    analyze.add_argument("dir", metavar="DIR", help="a lora-lab sweep directory")
    sub.add_subcommand(
        "analyze", analyze, help="what a sweep's adapters learned: spectra of dW = B A, subspace similarity, a rank"
    )


def _use(sub) -> None:
    classify = _parser(description="Label texts with a trained classification run: texts as arguments, from "
                       "--file (one per line, or a column of a CSV / TSV / JSON lines / JSON file) or on standard "
                       "input; one line per text: label, probability and text (or JSON lines, CSV).")  # fmt: skip
    classify.add_argument("--run", required=True, help="a lora-lab train run directory")
    classify.add_argument("--file", metavar="FILE", help="texts: one per line, or a column of a CSV / TSV / "
                          ".jsonl / .json file (--column); - for standard input")  # fmt: skip
    classify.add_argument("--column", help="the text column of --file (default: text)")
    classify.add_argument("--format", choices=["tsv", "jsonl", "csv"], default="tsv",
                          help="tsv: label, probability, text; jsonl: text, label and every class's probability; "
                          "csv: the same as columns")  # fmt: skip
    classify.add_argument("--json", action="store_true", help="the same as --format jsonl")
    classify.add_argument("--out", metavar="FILE", help="write there (default: standard output)")
    classify.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    classify.add_argument("texts", nargs="*", metavar="TEXT")
    sub.add_subcommand("classify", classify, help="label texts with a trained classification run")

    gen = _parser(description="Answer instructions with an instruction-tuned run: instructions as arguments (with "
                  "--input), from --file (JSON lines, JSON or CSV entries: instruction, input) or one per line on "
                  "standard input. Each answer is written with its instruction.")  # fmt: skip
    gen.add_argument("--run", required=True, help="a lora-lab train run directory (dataset instructions)")
    gen.add_argument("--input", default="", help="the input of the instructions given as arguments")
    gen.add_argument("--file", metavar="FILE", help="entries with an instruction (and an input): .jsonl, .json or "
                     ".csv; - for one instruction per line on standard input")  # fmt: skip
    gen.add_argument(
        "--format",
        choices=["text", "jsonl"],
        default="text",
        help="text: Instruction / Input / Response blocks; jsonl: the entry with its response",
    )
    gen.add_argument("--out", metavar="FILE", help="write there (default: standard output)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    gen.add_argument("instructions", nargs="*", metavar="INSTRUCTION")
    sub.add_subcommand("generate", gen, help="answer instructions with an instruction-tuned run")


def build_parser() -> ArgumentParser:
    parser = _parser(prog="lora-lab", description=DESCRIPTION)
    sub = parser.add_subcommands(dest="command", required=True, metavar="COMMAND")
    for add in (_report, _train, _sweep, _analyze, _use):
        add(sub)
    return parser
