"""The training loop: forward, loss, backward, clip, step, schedule, log; an evaluation at the end
of every epoch. One plain loop for every model and task: a `Task` (`tasks.py`) says what a batch
means and what the loss is divided by, the loop owns everything else.

A step's loss is one weighted mean over all its batches (gradient accumulation) and processes (DDP):
sum_i w_i l_i / sum_i w_i. The weights' sum of every batch is known from its labels before the
epoch, so each batch backpropagates its own sum_i w_i l_i divided by the step's total, and
accumulating 2 batches of 8, or 2 processes of 8, is one batch of 16.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as D
from .config import TrainConfig
from .distributed import (
    all_processes,
    is_sharded,
    load_trainable,
    shard_model,
    sum_over_processes,
    trainable_state,
    world,
)
from .lora import LoRALayer
from .quantize import keep_training_layout
from .tasks import Task


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); nothing broken was saved."""


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
    model: nn.Module, batches: Sequence[dict], task: Task, device: torch.device, what: str = "evaluation"
) -> dict:
    """The mean cross-entropy over `batches` per example or scored token (unweighted: the one reported
    loss) and its standard error; for classification also the accuracy with its binomial standard
    error, the predictions and the labels. A progress bar named `what` shows on a terminal."""
    was_training = model.training
    model.eval()
    total, squares, count, preds, labels = 0.0, 0.0, 0, [], []
    for batch in tqdm(batches, desc=what, leave=False, disable=None):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = task.logits(model, batch)
        losses = task.losses(logits, batch["labels"])[0].double()
        total, squares, count = total + float(losses.sum()), squares + float((losses**2).sum()), count + len(losses)
        if task.classifies:
            preds += task.predictions(logits)
            labels += batch["labels"].tolist()
    model.train(was_training)
    mean = total / count if count else math.nan
    spread = max(squares / count - mean**2, 0.0) * count / (count - 1) if count > 1 else math.nan
    out = {"loss": mean, "loss_se": math.sqrt(spread / count) if count > 1 else math.nan, "count": count}
    if task.classifies:
        accuracy = sum(p == y for p, y in zip(preds, labels, strict=True)) / max(len(labels), 1)
        out.update(preds=preds, labels=labels, accuracy=accuracy,
                   accuracy_se=math.sqrt(accuracy * (1 - accuracy) / len(labels)) if labels else math.nan)  # fmt: skip
    return out


@dataclass
class Fitted:
    """What `fit` leaves: the history of every epoch and the training throughput."""

    history: list[dict]
    steps: int
    tokens: int
    seconds: float
    step_losses: list[float]  # each optimizer step's loss (this process's batches), this call's steps
    last_val: dict | None = None  # the last epoch's validation (`evaluate`), if this call ran one
    step_log: list[dict] = field(default_factory=list)  # steps.csv: every optimizer step of the run
    best: dict | None = None  # the best epoch so far: {"epoch", "score", "state" (with --keep best)}
    stopped_early: bool = False

    @property
    def epoch_kept(self) -> int | None:
        """The epoch whose adapter the run keeps: the best with --keep best, else the last."""
        if self.best is not None and self.best.get("state") is not None:
            return self.best["epoch"]
        return self.history[-1]["epoch"] if self.history else None


def param_groups(model: nn.Module, lr: float, ratio: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: every trainable parameter at `lr`, but with LoRA+ (Hayou et al. 2024,
    `ratio` != 1) each LoRA B matrix and LoRA's vectors (its bias on B, DoRA's magnitude) at
    `ratio` * lr: B starts at zero and learns too slowly at A's rate. For the LoRA tensors of linears
    this is PEFT's `create_loraplus_optimizer`; PEFT also speeds up every other vector (a head's bias)
    and puts embedding adapters at 1e-6, which lora_lab does not: a head and embeddings train at `lr`."""
    params = [p for p in model.parameters() if p.requires_grad]
    loras = [m for m in model.modules() if isinstance(m, LoRALayer)] if ratio != 1 else []
    fast = {id(p) for m in loras for name, p in m.named_parameters() if name != "A"}
    groups = [
        {"params": [p for p in params if id(p) not in fast], "lr": lr},
        {"params": [p for p in params if id(p) in fast], "lr": lr * ratio},
    ]
    return [g for g in groups if g["params"]]


def fit(
    model: nn.Module,
    train_rows: Sequence,
    collate: Callable[[Sequence], dict],
    val_batches: Sequence[dict],
    cfg: TrainConfig,
    task: Task,
    device: torch.device,
    on_epoch_end: Callable[..., None] | None = None,
    resume: dict | None = None,
    distributed: bool = True,
    on_step: Callable[[dict], None] = lambda row: None,
) -> Fitted:
    """Train the parameters of `model` that require grad (LoRA, a head) for `cfg.epochs` over
    `train_rows`, batches drawn in an order fixed by `cfg.seed` and the epoch. A step's loss is one
    weighted mean over all its batches (and processes): see `lora_lab.tasks`. `resume` is a
    checkpoint from an earlier call with the same settings: training goes on after its epoch.
    `cfg.early_stopping` stops after that many epochs without a better validation score
    (`validation_score`); with `cfg.keep` "best" the model ends with the best epoch's trainable
    tensors. `on_epoch_end(epoch, fitted, optimizer, scheduler)` runs after every epoch, `on_step(row)`
    after every optimizer step with its row of steps.csv."""
    rank, size = world() if distributed else (0, 1)  # `distributed` False: this process alone, group or not
    trained = _wrap(model, cfg, device, size)
    params = [p for p in model.parameters() if p.requires_grad]  # after _wrap: under FSDP, the shards
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.lr_ratio), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg, len(train_rows), size)
    fitted, start = _restore(resume, optimizer, scheduler, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    model.train()
    for epoch in range(start, cfg.epochs):
        if _done(cfg, fitted):
            break
        batches = D.batches(train_rows, cfg.batch_size, collate, True, cfg.seed + epoch, cfg.bucket)
        if size > 1:  # as many batches on every process (the last few of an epoch may go unused)
            batches = batches[: len(batches) // size * size][rank::size]
        weights = _batch_weights(task, batches, size, device)  # each batch's sum of w_i, over all processes
        sums = torch.zeros(3, dtype=torch.float64)  # this epoch's loss sum, items scored, tokens read
        started = time.perf_counter()
        bar = tqdm(range(0, len(batches), cfg.grad_accum), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None)  # fmt: skip
        log = _PlainLog(bar, epoch, cfg, rank)
        for first in bar:
            group = [i for i in range(first, min(first + cfg.grad_accum, len(batches))) if weights[i] > 0]
            if not group:  # nothing to learn in the whole group (every response cut off): no step
                continue

            def check(loss: torch.Tensor, i: int, epoch: int = epoch, group: list[int] = group) -> None:
                _check_finite(loss, size, cfg, fitted.steps, epoch, group[i])

            total = sum(weights[i] for i in group)
            tokens_before = float(sums[2])
            loss = _accumulate(trained, task, [batches[i] for i in group], total, size, sums, device, autocast,
                               check)  # fmt: skip
            norm = _grad_norm(params, cfg.clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step takes
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            fitted.steps += 1
            fitted.step_losses.append(loss)
            fitted.step_log.append({"step": fitted.steps, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                                    "tokens": int(float(sums[2]) - tokens_before),
                                    "seconds": round(fitted.seconds + time.perf_counter() - started, 3)})  # fmt: skip
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            log.step(fitted.step_log[-1], first // cfg.grad_accum + 1)
            on_step(fitted.step_log[-1])
            if _done(cfg, fitted):
                break
        skipped = sum(w == 0 for w in weights)  # batches no process had anything to learn from
        _finish_epoch(model, val_batches, task, device, cfg, epoch, fitted, sums, started, batches, size, skipped)
        _note_best(model, cfg, task, fitted, epoch, size, device)
        if on_epoch_end is not None:
            on_epoch_end(epoch, fitted, optimizer, scheduler)
        if fitted.stopped_early:
            break
    _keep(model, cfg, fitted)
    return fitted


def validation_score(task: Task, val: dict) -> tuple[float, ...]:
    """What "better" means between epochs (higher is better): accuracy, then the lower loss, for
    classification; the lower loss for instruction tuning (the sweep ranks runs by the same)."""
    return (val["accuracy"], -val["loss"]) if task.classifies else (-val["loss"],)


def _note_best(model: nn.Module, cfg: TrainConfig, task: Task, fitted: Fitted, epoch: int, size: int, device) -> None:
    """Remember the best epoch (its trainable tensors too, with --keep best); with --early-stopping,
    stop once that many epochs have not beaten it. Processes decide together (each validated alone, and
    GPU kernels need not agree to the last bit): an epoch is better when it is better on every one."""
    if fitted.last_val is None or not fitted.last_val.get("count"):
        return  # no validation set: nothing to compare epochs by
    score = validation_score(task, fitted.last_val)
    if all_processes(fitted.best is None or score > tuple(fitted.best["score"]), size, device):
        state = trainable_state(model) if cfg.keep == "best" else None  # whole (under FSDP, gathered)
        fitted.best = {"epoch": epoch + 1, "score": list(score), "state": state}
    elif cfg.early_stopping and epoch + 1 - fitted.best["epoch"] >= cfg.early_stopping and epoch + 1 < cfg.epochs:
        fitted.stopped_early = True
        if world()[0] == 0:
            tqdm.write(f"early stopping after epoch {epoch + 1}: no better validation for {cfg.early_stopping} "
                       f"epoch(s) since epoch {fitted.best['epoch']}")  # fmt: skip


def _keep(model: nn.Module, cfg: TrainConfig, fitted: Fitted) -> None:
    """With --keep best, end with the best epoch's trainable tensors (its validation is taken again)."""
    best = fitted.best
    if best is None or best.get("state") is None or not fitted.history or best["epoch"] == fitted.history[-1]["epoch"]:
        return
    load_trainable(model, best["state"])
    fitted.last_val = None  # the last epoch's validation is not the kept one's


def _grad_norm(params: list[nn.Parameter], clip: float) -> float:
    """The gradients' total 2-norm before clipping (clipped to `clip` when it is set); of FSDP's shards,
    the norm over all processes."""
    if clip or any(hasattr(p, "full_tensor") for p in params):
        norm = torch.nn.utils.clip_grad_norm_(params, clip or math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class _PlainLog:
    """Where no progress bar shows (output to a file, a pipe, a job log): a line every 30 seconds
    with the step, loss, learning rate, tokens/s and the epoch's time left."""

    every = 30.0

    def __init__(self, bar, epoch: int, cfg: TrainConfig, rank: int) -> None:
        self.on = bool(getattr(bar, "disable", False)) and rank == 0
        self.total, self.epoch, self.epochs = len(bar), epoch, cfg.epochs
        self.start = self.last = time.perf_counter()
        self.tokens = 0

    def step(self, row: dict, done: int) -> None:
        self.tokens += row["tokens"]
        now = time.perf_counter()
        if not self.on or (now - self.last < self.every and done < self.total):
            return
        self.last, elapsed = now, now - self.start
        left = elapsed / done * (self.total - done)
        print(f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.total}: loss {row['loss']:.4f}, "
              f"lr {row['lr']:.2e}, {self.tokens / elapsed:,.0f} tokens/s, epoch ends in {left:,.0f} s",
              flush=True)  # fmt: skip


def _accumulate(trained, task: Task, group: list[dict], total_weight: float, size: int, sums, device, autocast,
                check) -> float:  # fmt: skip
    """Forward and backward every batch of one optimizer step, each divided by the step's total weight
    over all `size` processes (DDP averages gradients: times `size` makes that a sum). `check(loss, i)`
    stops every process together on a non-finite loss. Adds each batch's unweighted loss sum, items
    scored and tokens read to `sums`; returns the step's loss on this process's batches, on the same
    scale (the step's loss itself in one process)."""
    step_loss = 0.0
    for i, batch in enumerate(group):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            logits = task.logits(trained, batch)
        objective, losses = task.objective(logits, batch["labels"])
        check(objective, i)
        (objective * (size / total_weight)).backward()
        step_loss += objective.item() * size / total_weight
        sums += torch.tensor([float(losses.sum()), len(losses), float(batch["attention_mask"].sum())],
                             dtype=torch.float64)  # fmt: skip
    return step_loss


def _scheduler(optimizer, cfg: TrainConfig, rows: int, size: int):
    """Linear warmup, then the schedule, over the run's optimizer steps."""
    per_epoch = math.ceil(math.ceil(rows / cfg.batch_size) // size / cfg.grad_accum)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = math.ceil(cfg.warmup * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))


def _restore(resume: dict | None, optimizer, scheduler, model: nn.Module) -> tuple[Fitted, int]:
    """What a checkpoint holds back in place: optimizer, schedule, RNG; the history so far, and the
    epoch to start at. Under FSDP the optimizer's state was saved whole: each process takes its shard."""
    if resume is None:
        return Fitted([], 0, 0, 0.0, []), 0
    if resume.get("optimizer_whole"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, resume["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    torch.set_rng_state(resume["rng"])
    if resume.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])
    fitted = Fitted(resume["history"], resume["step"], resume["tokens"], resume["seconds"], [],
                    step_log=resume.get("step_log", []), best=resume.get("best"))  # fmt: skip
    return fitted, resume["epoch"] + 1


def _done(cfg: TrainConfig, fitted: Fitted) -> bool:
    return cfg.max_steps is not None and fitted.steps >= cfg.max_steps


def _finish_epoch(model, val_batches, task: Task, device, cfg: TrainConfig, epoch: int, fitted: Fitted, sums,
                  started: float, batches, size: int, skipped: int) -> None:  # fmt: skip
    """The epoch's totals over all processes, its validation and its line of the history."""
    sums = sum_over_processes(sums, size, device)
    fitted.tokens += int(sums[2])
    fitted.seconds += time.perf_counter() - started
    if not sums[1] and not _done(cfg, fitted):
        raise TrainingError(f"nothing to learn in epoch {epoch + 1}: {_why_nothing(cfg, task, batches, size)}")
    if skipped and world()[0] == 0:
        why = task.why_unlearnable(cfg.max_length)
        tqdm.write(f"epoch {epoch + 1}: skipped {skipped} batch(es) with nothing to learn: {why}")
    fitted.last_val = _validate(model, val_batches, task, device, cfg, epoch, fitted.steps)
    row = {"epoch": epoch + 1, "step": fitted.steps, "train_loss": float(sums[0] / max(sums[1], 1)),
           "val_loss": fitted.last_val["loss"]}  # fmt: skip
    if task.classifies:
        row["val_accuracy"] = fitted.last_val["accuracy"]
    fitted.history.append(row)
    tqdm.write(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, size: int) -> nn.Module:
    """The module the loop calls: data parallel over `size` processes (or sharded, `cfg.fsdp`),
    compiled with `cfg.compile`."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter requires grad (inject LoRA or name a head to train)")
    keep_training_layout(model)  # a bitsandbytes 4-bit base keeps the layout it trains in through evaluations
    trained = model
    if cfg.fsdp:  # sharded in place: each process takes every size-th batch; gradients averaged as DDP's
        if not is_sharded(model):  # (`train` shards before its first evaluation)
            shard_model(model, cfg.bf16, device)
    elif size > 1:  # data parallel: each process takes every size-th batch; gradients are averaged
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        from torch import _dynamo as dynamo

        # Each run compiles afresh (this drops whatever else the process compiled), so a sweep's points
        # never reach dynamo's recompile limit; dropout draws eager's masks: the numbers of an eager run.
        dynamo.reset()
        trained = torch.compile(trained, options={"fallback_random": True})
    return trained


def _batch_weights(task: Task, batches: Sequence[dict], size: int, device: torch.device) -> list[float]:
    """sum_i w_i of each batch position, added over the processes (every process sees the same list,
    so all skip a batch with nothing to learn together, and all divide a step by the same total)."""
    weights = torch.tensor([task.weight(b) for b in batches], dtype=torch.float64)
    return sum_over_processes(weights, size, device).tolist()


def _check_finite(loss: torch.Tensor, size: int, cfg: TrainConfig, step: int, epoch: int, index: int) -> None:
    """Stop, on every process together, when the loss is not finite on one of them."""
    if not all_processes(bool(torch.isfinite(loss.detach())), size, loss.device):
        raise TrainingError(
            f"the loss is {loss.item()} at optimizer step {step + 1} (epoch {epoch + 1}, batch {index + 1}): "
            f"training diverged. Lower --lr (now {cfg.lr}) or check the data; nothing of this epoch was saved"
            + (f", the checkpoint of epoch {epoch} stands" if epoch else "")
        )


def _why_nothing(cfg: TrainConfig, task: Task, batches: Sequence, size: int) -> str:
    if not batches:
        return f"no batch for each of {size} processes: the training set is too small"
    return f"every batch was skipped: {task.why_unlearnable(cfg.max_length)}"


def _validate(model, val_batches, task: Task, device, cfg: TrainConfig, epoch: int, step: int) -> dict:
    """The epoch's validation, or a TrainingError when there is nothing to score or it diverged."""
    val = evaluate(model, val_batches, task, device, "validation")
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
    return val
