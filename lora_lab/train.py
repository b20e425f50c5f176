"""Fine-tuning with LoRA: one plain loop, two tasks.

Classification: the model's logits for the whole text (our GPTModel: the last real token's
logits, as in the book's chapter 6; a Hugging Face model: its sequence-classification head), and
cross-entropy against the label (optionally class-weighted). Causal LM (instruction tuning): the
logits at every position, and cross-entropy against the next token, where the targets are -100
(skipped) on padding and on the prompt, so the model learns the responses.

The loop reads top to bottom: forward, loss, backward, clip, step, schedule, log; an evaluation
at the end of every epoch; a checkpoint after it. A run is a directory:

    config.json      exactly what ran (TrainConfig)
    checkpoint.pt    trainable tensors, optimizer, schedule, history, RNG: resumes after the last epoch
    adapter.safetensors, peft/   the adapter with the trained head, and its PEFT export
    metrics.json     final metrics; history.csv and history.png; confusion.png (classification)

A run started again with the same config continues after its last finished epoch; a finished run
is not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data as D
from .adapters import export_peft_adapter, save_adapter
from .files import atomic_path, write_text
from .inject import inject_lora, mark_only_lora_trainable
from .params import count_parameters

CONFIG, CHECKPOINT, METRICS, HISTORY = "config.json", "checkpoint.pt", "metrics.json", "history.csv"


HOW = ("device", "compile")  # config fields that say how a run computes, not what: a resumed run may change them


@dataclass
class TrainConfig:
    """Everything that decides a run. Saved as config.json; resuming needs the same values."""

    model: str = "gpt2-124m"
    dataset: str = "sms-spam"
    data_path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    balanced: bool = True  # sms-spam: the book's balanced 747 + 747
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: list[str] | str = "all-linear"
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup
    warmup: float = 0.05  # fraction of the optimizer steps
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    class_weights: list[float] | None = None
    seed: int = 123
    max_length: int | None = None  # tokens per example; default: the model's context
    pooling: str = "last-token"  # GPTModel classification: last-token (masked) or last-position (the book's)
    pad_to: int | None = None  # classification: pad every batch to this length (the book: 120), else the longest
    train_head: bool = True  # classification: the new head trains whole (False: it is frozen or LoRA-targeted)
    mask_prompt: bool = True  # instruction tuning: learn the response only
    template: str = "alpaca"  # instruction prompt: alpaca, or chat (the model's chat template)
    bf16: bool = False  # autocast to bfloat16 (GPU)
    gradient_checkpointing: bool = False
    quantize: str | None = None  # QLoRA: the frozen base in nf4 or int8 (bitsandbytes)
    device: str = "auto"
    max_steps: int | None = None  # stop after this many optimizer steps (quick checks)
    bucket: bool = False  # batches of rows of similar length (less padding, faster epochs)
    compile: bool = False  # torch.compile the training forward (how a run computes, not what: may change on resume)

    def __post_init__(self) -> None:
        whole = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in whole.items() if not isinstance(v, int) or v < 1]
        bad += [f"--{k} {v}" for k, v in {"lr": self.lr, "alpha": self.alpha}.items() if not v > 0]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"--max-steps {self.max_steps}")
        if self.max_length is not None and self.max_length < 2:
            bad.append(f"--max-length {self.max_length}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup <= 1:
            bad.append(f"--dropout {self.dropout} / --warmup {self.warmup} (fractions)")
        if bad:
            raise ValueError(f"{', '.join(bad)}: counts must be at least 1 (max-length 2), lr and alpha positive")

    def task(self) -> str:
        return "causal-lm" if self.dataset == "instructions" else "classification"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); nothing broken was saved."""


# ---- what a batch means for each kind of model ----------------------------------------------


def forward_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], kind: str, task: str, pooling: str
) -> torch.Tensor:
    """Classification: (B, classes); causal LM: (B, T, vocab)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if kind == "hf":
        return model(input_ids=ids, attention_mask=mask).logits
    if task == "causal-lm":
        return model(ids)  # right padding: causal attention never looks at it
    if pooling == "last-position":  # the book: no mask, the last position (padding included)
        return model(ids)[:, -1, :]
    logits = model(ids, attention_mask=mask)  # (B, T, classes)
    last = mask.sum(dim=1) - 1  # index of each row's last real token
    return logits[torch.arange(len(ids), device=ids.device), last]


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, weights: torch.Tensor | None) -> torch.Tensor:
    if task == "causal-lm":
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=D.IGNORE_INDEX)
    return F.cross_entropy(logits.float(), labels, weight=weights)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step `step` of `total`: linear warmup, then
    cosine or linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[dict],
    kind: str,
    task: str,
    pooling: str,
    device: torch.device,
    weights: torch.Tensor | None = None,
) -> dict:
    """Mean loss over `batches` (class-weighted as in training when `weights` are given); for
    classification also the predictions and the labels."""
    was_training = model.training
    model.eval()
    total, count, preds, labels = 0.0, 0, [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = forward_logits(model, batch, kind, task, pooling)
        n = int((batch["labels"] != D.IGNORE_INDEX).sum()) if task == "causal-lm" else len(batch["labels"])
        if n:  # a batch whose responses were all cut off has nothing to score
            total += batch_loss(logits, batch["labels"], task, weights).item() * n
        count += n
        if task == "classification":
            preds += logits.argmax(dim=-1).tolist()
            labels += batch["labels"].tolist()
    model.train(was_training)
    out = {"loss": total / count if count else math.nan, "count": count}
    if task == "classification":
        out.update(
            preds=preds,
            labels=labels,
            accuracy=sum(p == y for p, y in zip(preds, labels, strict=True)) / max(len(labels), 1),
        )
    return out


def classification_metrics(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy; precision, recall and F1 of the positive class (label 1) for two classes, the macro
    means for more; macro means and every class's; the confusion matrix (rows: true label,
    columns: predicted). scikit-learn's definitions."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(names)))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(labels, preds, labels=classes, average="macro", zero_division=0)
    binary = len(names) == 2  # the positive class is label 1; with more classes, the headline is the macro mean
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(p[1] if binary else mp),
        "recall": float(r[1] if binary else mr),
        "f1": float(f[1] if binary else mf),
        "positive_class": names[1] if binary else "macro",
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i])} for i, name in enumerate(names)
        },
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak afresh (each point of a sweep in one process has its own): the
    accelerator's peak allocation, or on Linux the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident set
    except OSError:
        pass  # elsewhere the figure is the process's peak so far


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: the accelerator's allocations, or the process's
    resident set on CPU (on Linux; elsewhere since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**10  # KiB
    except (OSError, IndexError, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ---- the loop --------------------------------------------------------------------------------


@dataclass
class Fitted:
    """What `fit` leaves: the history of every epoch and the training throughput."""

    history: list[dict]
    steps: int
    tokens: int
    seconds: float
    step_losses: list[float]  # the mean training loss of each optimizer step, this call's steps


def fit(
    model: nn.Module,
    train_rows: Sequence,
    collate: Callable[[Sequence], dict],
    val_batches: Sequence[dict],
    cfg: TrainConfig,
    kind: str,
    device: torch.device,
    on_epoch_end: Callable[..., None] | None = None,
    resume: dict | None = None,
    distributed: bool = True,
) -> Fitted:
    """Train the parameters of `model` that require grad (LoRA, a head) for `cfg.epochs` over
    `train_rows`, batches drawn in an order fixed by `cfg.seed` and the epoch. `resume` is a
    checkpoint from an earlier call with the same settings: training goes on after its epoch."""
    task = cfg.task()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (inject LoRA or name a head to train)")
    rank, size = world() if distributed else (0, 1)  # `distributed` False: this process alone, group or not
    trained = model
    if size > 1:  # data parallel: each process takes every size-th batch; gradients are averaged
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        from torch import _dynamo as dynamo

        # Each run compiles afresh (this drops whatever else the process compiled), so a sweep's points
        # never reach dynamo's recompile limit; dropout draws eager's masks: the numbers of an eager run.
        dynamo.reset()
        trained = torch.compile(trained, options={"fallback_random": True})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) // size / cfg.grad_accum)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = math.ceil(cfg.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    weights = torch.tensor(cfg.class_weights, device=device) if cfg.class_weights else None
    history, start, step, tokens, seconds, step_losses = [], 0, 0, 0, 0.0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history, start, step = resume["history"], resume["epoch"] + 1, resume["step"]
        tokens, seconds = resume["tokens"], resume["seconds"]
        torch.set_rng_state(resume["rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    model.train()
    for epoch in range(start, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        epoch_batches = D.batches(train_rows, cfg.batch_size, collate, True, cfg.seed + epoch, cfg.bucket)
        if size > 1:  # as many batches on every process (the last few of an epoch may go unused)
            epoch_batches = epoch_batches[: len(epoch_batches) // size * size][rank::size]
        running, seen, started, accumulated, skipped, epoch_tokens = 0.0, 0, time.perf_counter(), [], 0, 0
        # Which batches have something to learn (instruction tuning: a response that --max-length left in),
        # decided before the epoch and, under DDP, alike on every process: a step's loss is the mean over
        # the learnable batches of its group, and a group ends on its last batch, learnable or not.
        learnable = [task != "causal-lm" or _anything_to_learn(b, size) for b in epoch_batches]
        bar = tqdm(epoch_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for index, batch in enumerate(bar):
            first = index - index % cfg.grad_accum  # the batches of this optimizer step (fewer at the end)
            group = sum(learnable[first : first + cfg.grad_accum])
            if learnable[index]:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast:
                    logits = forward_logits(trained, batch, kind, task, cfg.pooling)
                loss = batch_loss(logits, batch["labels"], task, weights)
                if not _finite_everywhere(loss, size):
                    raise TrainingError(
                        f"the loss is {loss.item()} at optimizer step {step + 1} (epoch {epoch + 1}, batch "
                        f"{index + 1}): training diverged. Lower --lr (now {cfg.lr}) or check the data; nothing of "
                        "this epoch was saved" + (f", the checkpoint of epoch {epoch} stands" if epoch else "")
                    )
                (loss / group).backward()
                running += loss.item()
                accumulated.append(loss.item())
                seen += 1
                epoch_tokens += int(batch["attention_mask"].sum())
            else:
                skipped += 1  # every response cut off by --max-length: nothing to learn from this batch
            if ((index + 1) % cfg.grad_accum == 0 or index + 1 == len(epoch_batches)) and accumulated:
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_losses.append(sum(accumulated) / len(accumulated))
                accumulated = []
                bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        if size > 1:  # the epoch's loss and tokens over every process
            import torch.distributed as dist

            totals = torch.tensor([running, seen, epoch_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            running, seen, epoch_tokens = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        tokens += epoch_tokens
        seconds += time.perf_counter() - started
        if not seen and not (cfg.max_steps is not None and step >= cfg.max_steps):
            why = f"every batch was skipped (--max-length {cfg.max_length} cuts off every response); raise --max-length"
            if not epoch_batches:
                why = f"no batch for each of {size} processes: the training set is too small"
            raise TrainingError(f"nothing to learn in epoch {epoch + 1}: {why}")
        if skipped:
            tqdm.write(f"epoch {epoch + 1}: skipped {skipped} batch(es) whose responses --max-length cut off entirely")
        val = evaluate(model, val_batches, kind, task, cfg.pooling, device, weights)
        if val_batches and not val["count"]:
            raise TrainingError(
                f"nothing to score in the validation set: --max-length {cfg.max_length} cuts off every response; "
                "raise --max-length"
            )
        if val_batches and not math.isfinite(val["loss"]):
            raise TrainingError(
                f"the validation loss is {val['loss']} after epoch {epoch + 1} (optimizer step {step}): training "
                f"diverged. Lower --lr (now {cfg.lr}); nothing of this epoch was saved"
                + (f", the checkpoint of epoch {epoch} stands" if epoch else "")
            )
        row = {"epoch": epoch + 1, "step": step, "train_loss": running / max(seen, 1), "val_loss": val["loss"]}
        if task == "classification":
            row["val_accuracy"] = val["accuracy"]
        history.append(row)
        tqdm.write(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history, optimizer, scheduler, step, tokens, seconds)
    return Fitted(history, step, tokens, seconds, step_losses)


def _anything_to_learn(batch: dict[str, torch.Tensor], size: int) -> bool:
    """Whether the batch has a target on every process (all skip it together, or none does)."""
    has = (batch["labels"] != D.IGNORE_INDEX).any().float()
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(has, op=dist.ReduceOp.MIN)
    return bool(has.item())


def _finite_everywhere(loss: torch.Tensor, size: int) -> bool:
    """Whether the loss is finite on every process (all stop together, or none does)."""
    finite = torch.isfinite(loss.detach()).float()
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


# ---- a run directory -------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group once, NCCL when the processes train on
    GPUs, gloo on CPUs. Returns (rank, world size)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return world()


def _barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _device(name: str) -> torch.device:
    import os

    local = os.environ.get("LOCAL_RANK", "0")
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{local}" if world()[1] > 1 else "cuda")
    if name == "cuda" and world()[1] > 1:
        return torch.device(f"cuda:{local}")  # one GPU per process
    return torch.device(name)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(run: Path, model, epoch, history, optimizer, scheduler, step, tokens, seconds, processes) -> None:
    state = {
        "processes": processes,
        "epoch": epoch,
        "step": step,
        "tokens": tokens,
        "seconds": seconds,
        "history": history,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with atomic_path(run / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def prepare(cfg: TrainConfig, device: torch.device | str = "cpu"):
    """The dataset, and the pretrained model on `device` (its base quantized if `cfg.quantize`)
    with LoRA injected and its head set to train, with its tokenizer: what `train` needs."""
    from .models import load_pretrained

    dataset = D.load_dataset(cfg.dataset, cfg.data_path, cfg.seed, cfg.text_column, cfg.label_column, cfg.balanced)
    num_labels = len(dataset.labels) if isinstance(dataset, D.ClassificationData) else 0
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    loaded = load_pretrained(
        cfg.model, cfg.task(), num_labels=num_labels, max_length=cfg.max_length, quantize=cfg.quantize,
        device=device, compute_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # LoRA's initial A
    targets = cfg.targets if cfg.targets == "all-linear" or isinstance(cfg.targets, str) else list(cfg.targets)
    inject_lora(loaded.model, targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    mark_only_lora_trainable(loaded.model, train=_whole(cfg, loaded))
    if cfg.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.class_weights is not None and len(cfg.class_weights) != num_labels:
        raise ValueError(f"{len(cfg.class_weights)} class weights for {num_labels} classes {dataset.labels}")
    return dataset, loaded


def _whole(cfg: TrainConfig, loaded) -> list[str]:
    """The modules that train whole next to LoRA (and are saved with the adapter): the new head."""
    return [loaded.head] if loaded.head and cfg.train_head else []


def collate_for(cfg: TrainConfig, tok: D.Tokenizer) -> Callable[[Sequence], dict]:
    if cfg.task() == "causal-lm":
        return lambda rows: D.causal_lm_batch(rows, tok, cfg.mask_prompt, cfg.template)
    return lambda rows: D.classification_batch(rows, tok, cfg.pad_to)


def train(cfg: TrainConfig, out: str | Path, distributed: bool | None = None) -> dict:
    """Run `cfg` into the directory `out` (made if need be) and return its metrics. A directory
    that holds a checkpoint of the same config resumes; one of another config is refused. Under
    torchrun (or with `distributed` True) every process trains this run together
    (DistributedDataParallel: each takes every n-th batch, so a step's batch is n x batch_size) and
    rank 0 writes the files; `distributed` False trains in this process alone."""
    run = Path(out)
    config_text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
    import os

    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, processes = init_distributed(cfg.device) if distributed else (0, 1)
    main_process = rank == 0
    resume = None
    if (run / CONFIG).is_file():
        defaults = dataclasses.asdict(TrainConfig())  # a field added since the run was saved: its default ran
        saved, wanted = {**defaults, **json.loads((run / CONFIG).read_text())}, json.loads(config_text)
        changed = sorted(k for k in set(saved) | set(wanted) if k not in HOW and saved.get(k) != wanted.get(k))
        if changed:  # the device and compilation may change between a run and its resumption; nothing else
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
            raise ValueError(
                f"{run} holds a run of another config ({shown}); give another --out, or delete it to start over"
            )
        if (run / METRICS).is_file():
            return json.loads((run / METRICS).read_text())  # finished already
        if (run / CHECKPOINT).is_file():
            resume = torch.load(run / CHECKPOINT, weights_only=False, map_location="cpu")  # any device may resume
    random.seed(cfg.seed)
    device = _device(cfg.device)
    reset_peak_memory(device)
    dataset, loaded = prepare(cfg, device)
    model, tok, task = loaded.model, loaded.tokenizer, cfg.task()
    if resume is not None:
        missing = set(resume["trainable"]) - {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"{run / CHECKPOINT} does not fit this model (no trainable {sorted(missing)[:3]})")
        model.load_state_dict(resume["trainable"], strict=False)
        tqdm.write(f"resuming {run} after epoch {resume['epoch'] + 1}")
    if main_process:
        write_text(run / CONFIG, config_text)
    collate = collate_for(cfg, tok)
    val_batches = D.batches(dataset.val, cfg.batch_size, collate, shuffle=False)

    def on_epoch_end(epoch, history, optimizer, scheduler, step, tokens, seconds) -> None:
        if main_process:
            _save_checkpoint(run, model, epoch, history, optimizer, scheduler, step, tokens, seconds, processes)

    if resume is None:  # where training starts from, for the before-and-after in metrics.json
        initial = evaluate(model, val_batches, loaded.kind, task, cfg.pooling, device)
        initial = {k: v for k, v in initial.items() if k in ("loss", "accuracy")}
        if main_process:
            write_text(run / "initial.json", json.dumps(initial))
        torch.manual_seed(cfg.seed)  # dropout masks from here on (a resumed run restores its RNG state)
    else:
        initial = json.loads((run / "initial.json").read_text())
    if resume is not None and resume.get("processes", 1) != processes:
        raise ValueError(
            f"{run / CHECKPOINT} was trained on {resume.get('processes', 1)} process(es), this is {processes}: "
            "a step's batch would change mid-run. Resume with as many processes, or give another --out"
        )
    fitted = fit(
        model, dataset.train, collate, val_batches, cfg, loaded.kind, device, on_epoch_end, resume, distributed
    )
    count = count_parameters(model)
    metrics: dict = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": task,
        "trainable_params": count.trainable,
        "total_params": count.total,
        "epochs": len(fitted.history),
        "steps": fitted.steps,
        "train_seconds": round(fitted.seconds, 2),
        "tokens_per_second": round(fitted.tokens / fitted.seconds, 1) if fitted.seconds else None,
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "device": str(device),
        "val_examples": len(dataset.val),
        "processes": processes,
        "final_train_loss": fitted.history[-1]["train_loss"] if fitted.history else None,
        "final_val_loss": fitted.history[-1]["val_loss"] if fitted.history else None,
        "initial_val_loss": initial["loss"],
        "initial_val_accuracy": initial.get("accuracy"),
    }
    test_batches = D.batches(dataset.test, cfg.batch_size, collate, shuffle=False)
    test = evaluate(model, test_batches, loaded.kind, task, cfg.pooling, device)
    metrics["test_loss"] = test["loss"]
    if task == "classification":
        metrics["labels"] = dataset.labels
        train_eval = evaluate(model, D.batches(dataset.train, cfg.batch_size, collate, False), loaded.kind, task,
                              cfg.pooling, device)  # fmt: skip
        metrics["train_accuracy"] = train_eval["accuracy"]
        metrics["val_accuracy"] = fitted.history[-1]["val_accuracy"] if fitted.history else None
        metrics["test"] = classification_metrics(test["labels"], test["preds"], dataset.labels)
        metrics["test_accuracy"] = metrics["test"]["accuracy"]
    else:
        metrics["test_perplexity"] = math.exp(min(test["loss"], 50))
    if main_process:
        _write_run(run, cfg, loaded, model, fitted, metrics, initial)
    _barrier()  # every process returns once the run is on disk
    return metrics


def _write_run(run: Path, cfg: TrainConfig, loaded, model: nn.Module, fitted: Fitted, metrics: dict, initial: dict):
    """A finished run's files: the adapter (and its PEFT export), the history and its plot, the
    confusion matrix, the metrics last (a run with metrics.json is complete); the checkpoint goes."""
    from .plots import plot_confusion, plot_history

    if "test" in metrics:
        plot_confusion(metrics["test"]["confusion_matrix"], metrics["labels"], run / "confusion.png")
    extra = _whole(cfg, loaded)
    save_adapter(model, run / "adapter.safetensors", extra=extra)
    export_peft_adapter(model, run / "peft", base_model_name_or_path=loaded.source, extra=extra)
    lines = [",".join(fitted.history[0])] + [",".join(str(v) for v in row.values()) for row in fitted.history]
    write_text(run / HISTORY, "\n".join(lines) + "\n")
    plot_history(fitted.history, run / "history.png", f"{cfg.model} on {cfg.dataset}, LoRA r={cfg.rank}", initial)
    write_text(run / METRICS, json.dumps(metrics, indent=2) + "\n")
    (run / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: the adapter and metrics hold it


def load_run(run: str | Path, task: str | None = None):
    """The config of a finished run and its model with the run's adapter loaded, in eval mode;
    refused before anything loads if the run is not of `task`."""
    from .adapters import load_adapter
    from .models import load_pretrained

    run = Path(run)
    if not (run / CONFIG).is_file() or not (run / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"{run} is not a finished lora-lab train run (no config.json and adapter.safetensors)")
    cfg = TrainConfig(**json.loads((run / CONFIG).read_text()))
    if task is not None and cfg.task() != task:
        use = "lora-lab generate" if cfg.task() == "causal-lm" else "lora-lab classify"
        raise ValueError(f"{run} is a {cfg.task()} run ({cfg.dataset}), not {task}: use {use}")
    metrics = json.loads((run / METRICS).read_text()) if (run / METRICS).is_file() else {}
    labels = metrics.get("labels") or ([] if cfg.task() == "causal-lm" else ["0", "1"])
    torch.manual_seed(cfg.seed)  # as `prepare` did: a head that was not saved (frozen) comes back the same
    loaded = load_pretrained(cfg.model, cfg.task(), num_labels=len(labels), max_length=cfg.max_length,
                             quantize=cfg.quantize)  # fmt: skip
    load_adapter(loaded.model, run / "adapter.safetensors")
    loaded.model.eval()
    return cfg, loaded, labels
