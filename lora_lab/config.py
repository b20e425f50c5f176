"""Everything that decides a training run, defined once: `TrainConfig`. Each field carries its help
text; `lora-lab train` and `lora-lab sweep` build their options from these fields (`cli.py`), and a
run directory's config.json holds exactly these values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .models import ALIASES, MODELS, default_model
from .targets import did_you_mean
from .tasks import CAUSAL_LM, CLASSIFICATION, Task
from .tracking import check_tracker_names
from .variants import INITS

HOW = ("device", "compile", "report_to")  # how a run computes and reports, not what: a resumed run may change them


def option(default: Any, help: str, cli: str | None = None, point: bool = False, **argparse_kwargs: Any) -> Any:
    """A config field with its command-line help. `cli` names a flag other than --field-name (a bool
    that defaults to True and has its own flag is that flag's negation, as --full); `point` marks the
    fields a sweep point sets (`lora-lab sweep` takes lists of them instead); `argparse_kwargs` go to
    add_argument (choices, metavar). The options of `train` and `sweep` are built from these (`options.py`)."""
    return field(default=default, metadata={"help": help, "cli": cli, "point": point, "argparse": argparse_kwargs})


@dataclass
class TrainConfig:
    """Everything that decides a run. Saved as config.json; resuming needs the same values."""

    model: str = option("", f"{', '.join(MODELS)} (or {', '.join(ALIASES)}), a local Hugging Face directory or a "
                        "hub id (default: minilm-l6 for classification, smollm2-135m for instructions: both install "
                        "offline)", point=True)  # fmt: skip
    dataset: str = option(
        "sms-spam",
        "sms-spam, sentiment, instructions; or labelled texts: "
        "csv:PATH / jsonl:PATH (CSV, TSV, JSON lines, JSON), hf:NAME (a Hugging Face dataset: "
        "a save_to_disk folder, data files, a hub name)",
        metavar="NAME",
    )
    data_path: str | None = option(None, "a local copy of the dataset (default: packaged or downloaded); for "
                                   "instructions any file of entries (JSON, JSON lines: Alpaca's fields, or chats "
                                   "as messages) or hf:NAME")  # fmt: skip
    text_column: str = option("text", "csv: the text column")
    label_column: str = option("label", "csv: the label column")
    balanced: bool = option(True, "sms-spam: the book's balanced 747 spam + 747 ham (--no-balanced: all 5,574 "
                            "messages)", cli="--full")  # fmt: skip
    rank: int = option(8, "LoRA rank", point=True)
    alpha: float | None = option(None, "LoRA alpha (default: 2 x rank)", point=True)
    dropout: float = option(0.0, "dropout on the LoRA input")
    use_rslora: bool = option(False, "scale by alpha / sqrt(rank) (rsLoRA)", cli="--rslora", point=True)
    use_dora: bool = option(False, "DoRA: a learned length per output channel (weight-decomposed LoRA)", point=True)
    init: str = option("kaiming", "how LoRA starts: kaiming (PEFT's default) or gaussian, B zero; pissa / olora: "
                       "from W's principal directions, the residual left in the base (linears)", point=True,
                       choices=list(INITS))  # fmt: skip
    lr_ratio: float = option(1.0, "LoRA+: B's learning rate this many times A's and the rest's (the paper: 16)",
                             point=True)  # fmt: skip
    targets: list[str] | str = option(
        "all-linear",
        "modules to adapt: names or dotted suffixes (q_proj v_proj), or all-linear: every linear but the output head",
        point=True,
        metavar="NAME",
    )
    epochs: int = option(3, "passes over the training set")
    batch_size: int = option(8, "rows per batch (per process under DDP)")
    grad_accum: int = option(1, "batches per optimizer step (one step's loss is one mean over all of them)")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    schedule: str = option("cosine", "after a linear warmup", choices=["cosine", "linear", "constant"])
    warmup: float = option(0.05, "warmup, a fraction of the optimizer steps")
    clip: float = option(1.0, "max gradient norm; 0 turns clipping off")
    class_weights: list[float] | None = option(None, "loss weight of each class, as 1,3 (what training minimises; "
                                               "reported losses stay unweighted)", metavar="W")  # fmt: skip
    positive_label: str | None = option(None, "two classes: the class whose precision, recall and F1 are reported "
                                        "(default: the second label in sorted order: 1 of 0/1, spam of ham/spam)",
                                        metavar="LABEL")  # fmt: skip
    seed: int = option(123, "initialisation, data order and dropout", point=True)
    max_length: int | None = option(None, "tokens per example, longer ones cut; none: the model's context")
    pooling: str = option("last-token", "GPTModel classification: the last real token, or the last position "
                          "(padding included: the book's)", choices=["last-token", "last-position"])  # fmt: skip
    pad_to: int | None = option(None, "classification: pad every batch to this length (the book: 120), else to the "
                                "longest row")  # fmt: skip
    train_head: bool = option(True, "classification: the new head trains whole (--no-train-head: frozen)")
    mask_prompt: bool = option(True, "instruction tuning: learn the response only (--no-mask-prompt: the prompt too)")
    template: str = option("alpaca", "instructions: the Alpaca prompt, or the model's chat template",
                           choices=["alpaca", "chat"])  # fmt: skip
    early_stopping: int | None = option(None, "stop once this many epochs bring no better validation score "
                                        "(accuracy, then loss; loss for instructions)", metavar="PATIENCE")  # fmt: skip
    eval_train: bool = option(False, "classification: score the whole training set at the end too (train_accuracy; "
                              "a pass as long as an epoch's forwards)")  # fmt: skip
    keep: str = option("last", "the adapter and metrics of the last epoch, or of the best by validation score",
                       choices=["last", "best"])  # fmt: skip
    bf16: bool = option(False, "bfloat16 autocast (GPU)")
    fsdp: bool = option(False, "under torchrun: shard the model over the processes (FSDP2: each transformer block, "
                        "then the root; the frozen base and LoRA both sharded, only LoRA and the head gathered to "
                        "save): bases larger than one GPU")  # fmt: skip
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    quantize: str | None = option(None, "QLoRA: the frozen base in 4-bit NF4 or 8-bit through bitsandbytes (pip "
                                  "install bitsandbytes); LoRA stays in full precision",
                                  choices=["nf4", "int8"])  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (a quick check)")
    bucket: bool = option(False, "batch rows of similar length together (less padding, faster epochs; the batches "
                          "differ from the default's)")  # fmt: skip
    report_to: list[str] | None = option(
        None,
        "experiment trackers, any of tensorboard, mlflow, wandb (each an "
        "optional extra: pip install 'lora-lab[tensorboard]')",
        metavar="TRACKER",
    )
    compile: bool = option(False, "torch.compile the model: the first steps compile (counted in the run's seconds), "
                           "faster after, above all on GPU")  # fmt: skip

    def __post_init__(self) -> None:
        self._check_types()
        if not self.model:
            self.model = default_model(self.dataset)
        whole = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in whole.items() if not isinstance(v, int) or v < 1]
        if self.alpha is None:  # 2 x rank; of a bad rank, 2: the error names the rank alone
            self.alpha = 2.0 * self.rank if isinstance(self.rank, int) and self.rank > 0 else 2.0
        self._check_choices()
        positive = {"lr": self.lr, "alpha": self.alpha, "lr-ratio": self.lr_ratio}
        bad += [f"--{k} {v}" for k, v in positive.items() if not 0 < v < math.inf]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"--max-steps {self.max_steps}")
        if self.early_stopping is not None and self.early_stopping < 1:
            bad.append(f"--early-stopping {self.early_stopping}")
        if self.max_length is not None and self.max_length < 2:
            bad.append(f"--max-length {self.max_length}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup <= 1:
            bad.append(f"--dropout {self.dropout} / --warmup {self.warmup} (fractions)")
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: counts must be at least 1 (max-length 2), lr, alpha, lr-ratio positive"
            )
        for name, value in {"clip": self.clip, "weight_decay": self.weight_decay}.items():
            if not 0 <= value < math.inf:  # a negative max norm turns every gradient around: training climbs
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be 0 or more (0: off)")
        if self.positive_label is not None and self.task() != CLASSIFICATION:
            raise ValueError("--positive-label is for classification; instruction tuning has no classes")
        if self.class_weights is not None:
            self.make_task("hf")  # refuses negative or infinite weights, or weights for instruction tuning

    def _check_types(self) -> None:
        """Each value of the field's type (a config file's "false" is not False; null only where a field
        may be none), so nothing runs on a value the user did not mean."""
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
        for f in dataclasses.fields(self):
            value, wanted = getattr(self, f.name), f.type.split(" | ")
            ok = (value is None and "None" in wanted) or any(
                (isinstance(value, kinds[w]) and not (w != "bool" and isinstance(value, bool))) if w in kinds
                else isinstance(value, list) and all(isinstance(v, kinds[w[5:-1]]) for v in value)
                for w in wanted if w != "None"
            )  # fmt: skip
            if not ok:
                words = {
                    "bool": "true or false",
                    "int": "a whole number",
                    "float": "a number",
                    "str": "text",
                    "None": "none",
                    "list[str]": "a list of names",
                    "list[float]": "a list of numbers",
                }
                shown = " or ".join(words.get(w, w) for w in wanted)
                raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: must be {shown}")
        if not self.targets:
            raise ValueError("--targets: name the modules to adapt (query value), or all-linear")

    def _check_choices(self) -> None:
        """A config file's (or a caller's) value of a field with choices, checked as the command line's is."""
        check_tracker_names(self.report_to or [])
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("argparse", {}).get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                close = did_you_mean(str(value), choices)
                raise ValueError(f"--{f.name.replace('_', '-')} {value}{close}: use one of {', '.join(choices)}")

    def task(self) -> str:
        return CAUSAL_LM if self.dataset == "instructions" else CLASSIFICATION

    def make_task(self, kind: str) -> Task:
        """The task of this config for a model of `kind` ("gpt": our GPTModel, "hf": Hugging Face)."""
        weights = tuple(float(w) for w in self.class_weights) if self.class_weights else None
        return Task(self.task(), kind, self.pooling, weights, self.pad_to, self.mask_prompt, self.template)
