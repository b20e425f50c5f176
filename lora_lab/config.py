"""Everything that decides a training run, defined once: `TrainConfig`. Each field carries its help
text; `lora-lab train` and `lora-lab sweep` build their options from these fields (`cli.py`), and a
run directory's config.json holds exactly these values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .models import default_model
from .tasks import CAUSAL_LM, CLASSIFICATION, Task
from .variants import INITS

HOW = ("device", "compile")  # config fields that say how a run computes, not what: a resumed run may change them


def option(default: Any, help: str, cli: str | None = None, **argparse_kwargs: Any) -> Any:
    """A config field with its command-line help; `cli` names a flag other than --field-name ("" for
    none: the command sets the field itself), `argparse_kwargs` go to add_argument (choices, metavar)."""
    return field(default=default, metadata={"help": help, "cli": cli, "argparse": argparse_kwargs})


@dataclass
class TrainConfig:
    """Everything that decides a run. Saved as config.json; resuming needs the same values."""

    model: str = option("", "any name lora-lab report knows, a local Hugging Face directory or a hub id (default: "
                        "one that installs offline, `models.default_model`)", cli="")  # fmt: skip
    dataset: str = option("sms-spam", "sms-spam, sentiment, instructions or csv:PATH", metavar="NAME")
    data_path: str | None = option(None, "a local copy of the dataset (default: packaged or downloaded)")
    text_column: str = option("text", "csv: the text column")
    label_column: str = option("label", "csv: the label column")
    balanced: bool = option(True, "sms-spam: all 5,574 messages, not the book's balanced 747 + 747", cli="--full")
    rank: int = option(8, "LoRA rank", cli="")
    alpha: float = option(16.0, "LoRA alpha", cli="")
    dropout: float = option(0.0, "dropout on the LoRA input")
    use_rslora: bool = option(False, "scale by alpha / sqrt(rank) (rsLoRA)", cli="")
    use_dora: bool = option(False, "DoRA: a learned length per output channel (weight-decomposed LoRA)", cli="")
    init: str = option("kaiming", "how LoRA starts: kaiming (PEFT's default) or gaussian, B zero; pissa / olora: "
                       "from W's principal directions, the residual left in the base (linears)", cli="")  # fmt: skip
    lr_ratio: float = option(1.0, "LoRA+: B's learning rate this many times A's and the rest's (the paper: 16)",
                             cli="")  # fmt: skip
    targets: list[str] | str = option("all-linear", "modules to adapt", cli="")
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
    seed: int = option(123, "initialisation, data order and dropout", cli="")
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
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    quantize: str | None = option(None, "QLoRA: the frozen base in 4-bit NF4 or 8-bit through bitsandbytes (pip "
                                  "install bitsandbytes); LoRA stays in full precision",
                                  choices=["nf4", "int8"])  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (a quick check)")
    bucket: bool = option(False, "batch rows of similar length together (less padding, faster epochs; the batches "
                          "differ from the default's)")  # fmt: skip
    compile: bool = option(False, "torch.compile the model: the first steps compile (counted in the run's seconds), "
                           "faster after, above all on GPU")  # fmt: skip

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model(self.dataset)
        whole = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in whole.items() if not isinstance(v, int) or v < 1]
        if self.init not in INITS:
            raise ValueError(f"--init {self.init}: use one of {', '.join(INITS)}")
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

    def task(self) -> str:
        return CAUSAL_LM if self.dataset == "instructions" else CLASSIFICATION

    def make_task(self, kind: str) -> Task:
        """The task of this config for a model of `kind` ("gpt": our GPTModel, "hf": Hugging Face)."""
        weights = tuple(float(w) for w in self.class_weights) if self.class_weights else None
        return Task(self.task(), kind, self.pooling, weights, self.pad_to, self.mask_prompt, self.template)
