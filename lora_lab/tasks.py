"""What a batch means for each task: its logits, its loss, and what that loss is divided by.

Classification: one label per text; the logits are (B, classes) (our GPTModel: the last real
token's logits, or the last position, padding included, as the book's chapter 6 does; a Hugging
Face model: its sequence-classification head).
Causal LM (instruction tuning): the logits at every position, (B, T, vocab), against the next token;
targets are -100 (skipped) on padding and, by default, on the prompt.

The loss of an optimizer step is one weighted mean over everything the step scores:

    loss = sum_i w_i * l_i / sum_i w_i      (l_i: cross-entropy of example or token i)

over every batch of the accumulation group and every DDP process, exactly what one big batch gives.
w_i is 1, or the class weight of example i's label (`--class-weights`, PyTorch's weighted mean). A
mean per batch averaged over the group would weigh a batch of 39 response tokens like one of 50, and
differ from the big batch (the error transformers fixed in 4.46). So `weight(batch)` is known before
the forward pass, from the labels alone: the loop adds the group's weights first, then each batch
backpropagates sum_i w_i l_i / (the group's total weight).

Reported losses (training, validation, test; metrics.json, history.csv, sweep.csv) have one
definition: the unweighted mean cross-entropy per example (classification) or per scored token
(causal LM); validation and test losses come with their standard error. Class weights change
what training minimises, not how a loss is reported, so runs with and without them compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"


@dataclass(frozen=True)
class Task:
    """Classification or causal LM, and how the model takes a batch: `kind` "gpt" (our GPTModel)
    or "hf" (a Hugging Face model). Classification on GPTModel pools the last real token
    ("last-token") or the last position, padding included ("last-position", the book's)."""

    name: str = CLASSIFICATION
    kind: str = "hf"
    pooling: str = "last-token"
    class_weights: tuple[float, ...] | None = None
    pad_to: int | None = None  # classification: pad every batch to this length (the book: 120)
    mask_prompt: bool = True  # causal LM: learn the response only
    template: str = "alpaca"  # causal LM: the prompt, alpaca or chat (the model's chat template)

    def __post_init__(self) -> None:
        if self.name not in (CLASSIFICATION, CAUSAL_LM):
            raise ValueError(f"unknown task {self.name!r}: {CLASSIFICATION} or {CAUSAL_LM}")
        if self.class_weights is not None:
            if self.name != CLASSIFICATION:
                raise ValueError("--class-weights is for classification; instruction tuning has no classes")
            if not all(0 <= w < math.inf for w in self.class_weights) or not any(w > 0 for w in self.class_weights):
                raise ValueError(
                    f"--class-weights {','.join(map(str, self.class_weights))}: weights must be non-negative and "
                    "finite, and one at least positive"
                )

    @property
    def classifies(self) -> bool:
        return self.name == CLASSIFICATION

    @property
    def metric(self) -> tuple[str, str, bool]:
        """(sweep.csv column ranks are chosen on, column reported beside it, higher is better):
        validation accuracy and test accuracy for classification, losses for causal LM."""
        if self.classifies:
            return "val_accuracy", "test_accuracy", True
        return "final_val_loss", "test_loss", False

    @property
    def tool(self) -> str:
        """The command that uses a trained run of this task."""
        return "lora-lab classify" if self.classifies else "lora-lab generate"

    @property
    def unit(self) -> str:
        """What a loss is a mean over."""
        return "examples" if self.classifies else "tokens"

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification: (B, classes); causal LM: (B, T, vocab)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.kind == "hf":
            return model(input_ids=ids, attention_mask=mask).logits
        if not self.classifies:
            return model(ids)  # right padding: causal attention never looks at it
        if self.pooling == "last-position":  # the book: no mask, the last position (padding included)
            return model(ids)[:, -1, :]
        logits = model(ids, attention_mask=mask)  # (B, T, classes)
        last = mask.sum(dim=1) - 1  # index of each row's last real token
        return logits[torch.arange(len(ids), device=ids.device), last]

    def scored(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets that count, flattened: every label, or the tokens that are not -100."""
        return labels if self.classifies else labels[labels != D.IGNORE_INDEX]

    def item_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """w_i of each scored target (float64 on the targets' device)."""
        if self.class_weights is None:
            return torch.ones(targets.shape, dtype=torch.float64, device=targets.device)
        table = torch.tensor(self.class_weights, dtype=torch.float64, device=targets.device)
        return table[targets]

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        """sum_i w_i over the batch, from its labels alone: what the step's loss is divided by."""
        return float(self.item_weights(self.scored(batch["labels"])).sum())

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_i, target_i) of every scored example or token: unweighted cross-entropy, in fp32 at least."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # bf16 / fp16 logits: the softmax in fp32
        if self.classifies:
            return F.cross_entropy(logits, labels, reduction="none"), labels
        flat, targets = logits.flatten(0, 1), labels.flatten()
        keep = targets != D.IGNORE_INDEX
        return F.cross_entropy(flat[keep], targets[keep], reduction="none"), targets[keep]

    def objective(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_i w_i l_i, the unweighted l_i) of a batch: the first trains, the second is reported."""
        losses, targets = self.losses(logits, labels)
        weighted = losses if self.class_weights is None else losses * self.item_weights(targets).to(losses.dtype)
        return weighted.sum(), losses.detach()

    def why_unlearnable(self, max_length: int | None) -> str:
        """Why a batch has nothing to learn from (its weight is 0), in words for a log line."""
        if self.classifies:
            return "its rows all have class weight 0 (--class-weights)"
        return f"--max-length {max_length} cuts off every response in it; raise --max-length"

    def predictions(self, logits: torch.Tensor) -> list[int]:
        return logits.argmax(dim=-1).tolist()

    def collate(self, tok: D.Tokenizer) -> Callable[[Sequence], dict]:
        """Rows to a batch: (text, label) pairs for classification, instruction entries for causal LM."""
        if self.classifies:
            return lambda rows: D.classification_batch(rows, tok, self.pad_to)
        return lambda rows: D.causal_lm_batch(rows, tok, self.mask_prompt, self.template)


def classification_metrics(
    labels: Sequence[int], preds: Sequence[int], names: Sequence[str], positive: int = 1
) -> dict:
    """Accuracy; precision, recall and F1 of the positive class (label `positive`) for two classes, the macro
    means for more; macro means and every class's; the confusion matrix (rows: true label,
    columns: predicted). scikit-learn's definitions."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(names)))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(labels, preds, labels=classes, average="macro", zero_division=0)
    binary = len(names) == 2  # with more classes, the headline is the macro mean
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(p[positive] if binary else mp),
        "recall": float(r[positive] if binary else mr),
        "f1": float(f[positive] if binary else mf),
        "positive_class": names[positive] if binary else "macro",
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i])} for i, name in enumerate(names)
        },
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
    }
