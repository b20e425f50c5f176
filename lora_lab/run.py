"""A training run on disk: prepare the model and data, train (`loop.fit`), resume, write, load.

What is trained and how a batch is scored is the task's (`tasks.py`); the loop is `loop.py`. A run
is a directory:

    config.json      exactly what ran (TrainConfig); initial.json: the validation before training
    checkpoint.pt    trainable tensors, optimizer, schedule, history, RNG: resumes after the last epoch
                     (deleted once the run is complete: the adapter and metrics hold it)
    adapter.safetensors, peft/   the adapter with the trained head, and its PEFT export
    metrics.json     final metrics (losses: unweighted mean cross-entropy per example or response token,
                     with standard errors; accuracies with theirs; the baseline); history.csv/.png;
                     confusion.png (classification)

A run started again with the same config continues after its last finished epoch; a finished run
is not trained again. Under torchrun every process trains the run together and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as D
from .adapters import ADAPTER_FILE, save_adapter
from .config import HOW, TrainConfig
from .distributed import (
    barrier,
    device_for,
    init_distributed,
    is_sharded,
    shard_model,
    trainable_state,
    whole_trainable,
    world,
)
from .files import atomic_path, write_csv, write_text
from .inject import inject_lora, mark_only_lora_trainable
from .loop import Fitted, evaluate, fit
from .params import count_parameters, peak_memory_mib, reset_peak_memory
from .peft_format import export_peft_adapter
from .tasks import Task, classification_metrics
from .tracking import Trackers, check_trackers

CONFIG, CHECKPOINT, METRICS, HISTORY, STEPS = "config.json", "checkpoint.pt", "metrics.json", "history.csv", "steps.csv"
STEP_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "seconds")  # steps.csv, one row an optimizer step


def _save_checkpoint(run: Path, model, epoch: int, fitted: Fitted, optimizer, scheduler, processes: int) -> None:
    """The epoch's checkpoint, written by rank 0; every process calls it (under FSDP they gather the
    trainable tensors and the optimizer's state together: LoRA's, never the base)."""
    whole = is_sharded(model)  # first: the shards back in place
    trainable = trainable_state(model)
    if whole:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        optimizer_state = optimizer.state_dict()
    if world()[0] != 0:
        return
    state = {
        "optimizer_whole": whole,
        "processes": processes,
        "epoch": epoch,
        "step": fitted.steps,
        "tokens": fitted.tokens,
        "seconds": fitted.seconds,
        "history": fitted.history,
        "step_log": fitted.step_log,
        "best": fitted.best,
        "trainable": trainable,
        "optimizer": optimizer_state,
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
    if num_labels == 0 and cfg.template != "chat" and any("messages" in e for e in dataset.train):
        raise ValueError(f"{dataset.source} holds chats (messages), which the model's chat template renders: train "
                         "them with --template chat (generate then prompts the same way)")  # fmt: skip
    if cfg.class_weights is not None and len(cfg.class_weights) != num_labels:
        raise ValueError(f"{len(cfg.class_weights)} class weights for {num_labels} classes {dataset.labels}")
    if cfg.positive_label is not None:
        if num_labels != 2:
            raise ValueError(f"--positive-label is for two classes; this dataset has {num_labels}: {dataset.labels}")
        positive_index(dataset.labels, cfg.positive_label)
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    loaded = load_pretrained(
        cfg.model, cfg.task(), num_labels=num_labels, max_length=cfg.max_length, quantize=cfg.quantize,
        device=device, compute_dtype=_compute_dtype(cfg),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # LoRA's initial A
    targets = cfg.targets if cfg.targets == "all-linear" or isinstance(cfg.targets, str) else list(cfg.targets)
    inject_lora(
        loaded.model, targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora, use_dora=cfg.use_dora, init=cfg.init
    )
    mark_only_lora_trainable(loaded.model, train=_whole(cfg, loaded))
    if cfg.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return dataset, loaded


def _compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """What a QLoRA base computes in, and keeps what it does not quantize in (its run loads so again)."""
    return torch.bfloat16 if cfg.bf16 else torch.float32


def _whole(cfg: TrainConfig, loaded) -> list[str]:
    """The modules that train whole next to LoRA (and are saved with the adapter): the new head."""
    return [loaded.head] if loaded.head and cfg.train_head else []


def train(cfg: TrainConfig, out: str | Path, distributed: bool | None = None, sweep: str | Path | None = None) -> dict:
    """Run `cfg` into the directory `out` (made if need be) and return its metrics. A directory
    that holds a checkpoint of the same config resumes; one of another config is refused. Under
    torchrun (or with `distributed` True) every process trains this run together
    (DistributedDataParallel: each takes every n-th batch, so a step's batch is n x batch_size) and
    rank 0 writes the files; `distributed` False trains in this process alone. `cfg.report_to`'s
    trackers get the run (`tracking.py`); `sweep`, the directory of the sweep it is a point of, groups it."""
    run = Path(out)
    sweep = Path(sweep) if sweep is not None else None
    check_trackers(cfg.report_to or [])  # a tracker not installed is refused before the model loads
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run} is a file; a run writes a directory: give a new or existing directory")
    config_text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    check_fsdp(cfg, distributed)
    rank, processes = init_distributed(cfg.device) if distributed else (0, 1)
    finished, resume = _what_is_there(run, config_text, processes)
    if finished is not None:
        return finished
    random.seed(cfg.seed)
    device = device_for(cfg.device)
    reset_peak_memory(device)
    # --fsdp: the base loads on the CPU and goes to this process's device a block at a time as it is
    # sharded, never whole there (a 4-bit base is quantized on its device, whole)
    dataset, loaded = prepare(cfg, "cpu" if cfg.fsdp and not cfg.quantize else device)
    model, task = loaded.model, cfg.make_task(loaded.kind)
    if resume is not None:
        _load_trainable(model, resume, run)
    if cfg.fsdp:  # before the first evaluation, which then computes as training does
        shard_model(model, cfg.bf16, device)
    if rank == 0:
        write_text(run / CONFIG, config_text)
    collate = task.collate(loaded.tokenizer)
    val_batches = D.batches(dataset.val, cfg.batch_size, collate, shuffle=False)

    trackers = Trackers(cfg.report_to if rank == 0 else (), run, dataclasses.asdict(cfg), sweep)

    def on_epoch_end(epoch, fitted, optimizer, scheduler) -> None:
        _save_checkpoint(run, model, epoch, fitted, optimizer, scheduler, processes)
        if rank == 0:
            write_csv(run / STEPS, fitted.step_log, STEP_COLUMNS)
            trackers.epoch(fitted.history[-1])

    ok = False
    try:
        if resume is None:  # where training starts from, for the before-and-after in metrics.json
            initial = {
                k: v
                for k, v in evaluate(model, val_batches, task, device, "validation before training").items()
                if k in INITIAL
            }
            if rank == 0:
                write_text(run / "initial.json", json.dumps(initial))
            torch.manual_seed(cfg.seed)  # dropout masks from here on (a resumed run restores its RNG state)
        else:
            initial = json.loads((run / "initial.json").read_text())
        fitted = fit(model, dataset.train, collate, val_batches, cfg, task, device, on_epoch_end, resume, distributed,
                     on_step=trackers.step)  # fmt: skip
        val = fitted.last_val or evaluate(model, val_batches, task, device, "validation")  # resumed after its end
        test = evaluate(model, D.batches(dataset.test, cfg.batch_size, collate, shuffle=False), task, device, "test")
        metrics = _metrics(cfg, task, model, dataset, fitted, device, processes, initial, val, test)
        if task.classifies:
            metrics.update(_classification_metrics(model, dataset, cfg, task, collate, device, val, test))
        metrics = _finite(metrics)  # JSON has no NaN: a figure that cannot be had is None
        with whole_trainable(model):  # under FSDP: LoRA and the head gathered to write them, the base never
            if rank == 0:
                _write_run(run, cfg, loaded, model, fitted, metrics, initial)
                trackers.finish(metrics, fitted.steps)
        ok = True
    finally:
        trackers.close(ok)
    barrier()  # every process returns once the run is on disk
    return metrics


def check_fsdp(cfg: TrainConfig, distributed: bool = True) -> None:
    """--fsdp shards over two or more of torchrun's processes; what it does not take yet is refused by name."""
    if not cfg.fsdp:
        return
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise ValueError("--fsdp shards the model over 2 or more processes; this torchrun started 1 "
                         "(--nproc_per_node 2 or more, or train without --fsdp)")  # fmt: skip
    if not distributed:
        raise ValueError("--fsdp shards the model over torchrun's processes: run it under torchrun "
                         "(torchrun --nproc_per_node N -m lora_lab.cli train ... --fsdp)")  # fmt: skip
    if cfg.quantize == "int8":  # its row scales live beside the weight, which a shard would cut from them
        raise ValueError("--fsdp shards a 4-bit base, not an 8-bit one: use --quantize nf4 with it")
    if cfg.compile:
        raise ValueError("--fsdp does not take --compile yet; train without one of them (DDP: --fsdp off)")


INITIAL = ("loss", "loss_se", "accuracy")  # what initial.json keeps of the validation before training


def _what_is_there(run: Path, config_text: str, processes: int) -> tuple[dict | None, dict | None]:
    """(metrics of a finished run, checkpoint to resume) in `run`, either or none; a run of another
    config, or a checkpoint of another number of processes, is refused."""
    if not (run / CONFIG).is_file():
        return None, None
    defaults = dataclasses.asdict(TrainConfig())  # a field added since the run was saved: its default ran
    saved, wanted = {**defaults, **json.loads((run / CONFIG).read_text())}, json.loads(config_text)
    changed = sorted(k for k in set(saved) | set(wanted) if k not in HOW and saved.get(k) != wanted.get(k))
    if changed:  # the device and compilation may change between a run and its resumption; nothing else
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
        raise ValueError(
            f"{run} holds a run of another config ({shown}); give another --out, or delete it to start over"
        )
    if (run / METRICS).is_file():
        return json.loads((run / METRICS).read_text()), None
    if not (run / CHECKPOINT).is_file():
        return None, None
    try:  # tensors and plain values only: a checkpoint from a shared disk or a download runs no code it carries
        resume = torch.load(run / CHECKPOINT, weights_only=True, map_location="cpu")  # any device may resume
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{run / CHECKPOINT} holds more than tensors and plain values (pickled objects, which could run code), "
            f"so it is not loaded. lora_lab writes none such: delete the file to train this run from the start "
            f"({str(err).splitlines()[0][:120]})"
        ) from None
    if resume.get("processes", 1) != processes:
        raise ValueError(
            f"{run / CHECKPOINT} was trained on {resume.get('processes', 1)} process(es), this is {processes}: "
            "a step's batch would change mid-run. Resume with as many processes, or give another --out"
        )
    return None, resume


def _load_trainable(model: nn.Module, resume: dict, run: Path) -> None:
    missing = set(resume["trainable"]) - {n for n, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise ValueError(f"{run / CHECKPOINT} does not fit this model (no trainable {sorted(missing)[:3]})")
    model.load_state_dict(resume["trainable"], strict=False)
    tqdm.write(f"resuming {run} after epoch {resume['epoch'] + 1}")


def _metrics(cfg, task: Task, model, dataset, fitted: Fitted, device, processes: int, initial, val, test) -> dict:
    """metrics.json of any task: counts, speed, memory, and every loss with its standard error."""
    count = count_parameters(model)
    metrics = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": task.name,
        "loss": f"unweighted mean cross-entropy per {task.unit[:-1]}",
        "trainable_params": count.trainable,
        "total_params": count.total,
        "epochs": len(fitted.history),
        "steps": fitted.steps,
        "train_seconds": round(fitted.seconds, 2),
        "tokens_per_second": round(fitted.tokens / fitted.seconds, 1) if fitted.seconds else None,
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "device": str(device),
        "val_examples": len(dataset.val),
        "val_scored": val["count"],  # examples, or response tokens
        "processes": processes,
        "epoch_kept": fitted.epoch_kept,  # --keep best: the best epoch by validation score, else the last
        "stopped_early": fitted.stopped_early,
        "final_train_loss": _kept_row(fitted)["train_loss"] if fitted.history else None,
        "final_val_loss": val["loss"],
        "final_val_loss_se": val["loss_se"],
        "initial_val_loss": initial["loss"],
        "initial_val_accuracy": initial.get("accuracy"),
        "test_loss": test["loss"],
        "test_loss_se": test["loss_se"],
    }
    if not task.classifies:
        metrics["val_baseline"] = initial["loss"]  # the untrained model's loss: what training must beat
        metrics["test_perplexity"] = math.exp(min(test["loss"], 50))
    return metrics


def _classification_metrics(model, dataset, cfg: TrainConfig, task: Task, collate, device, val, test) -> dict:
    """Accuracies with their standard errors, the baseline (always the training set's most common
    class), how many classes the model predicts, and the test set's precision, recall and F1."""
    positive = positive_index(dataset.labels, cfg.positive_label)
    majority = max(range(len(dataset.labels)), key=lambda c: sum(y == c for _, y in dataset.train))
    train_accuracy, seconds = None, None
    if cfg.eval_train:  # on request only: as long as an epoch's forwards, for one figure
        started = time.perf_counter()
        batches = D.batches(dataset.train, cfg.batch_size, collate, False)
        train_accuracy = evaluate(model, batches, task, device, "training set")["accuracy"]
        seconds = round(time.perf_counter() - started, 2)
    test_metrics = classification_metrics(test["labels"], test["preds"], dataset.labels, positive)
    return {
        "labels": dataset.labels,
        "train_accuracy": train_accuracy,  # with --eval-train
        "train_eval_seconds": seconds,
        "val_accuracy": val["accuracy"],
        "val_accuracy_se": val["accuracy_se"],
        "val_baseline": sum(y == majority for y in val["labels"]) / max(len(val["labels"]), 1),
        "baseline": f"always {dataset.labels[majority]!r}, the most common class in training",
        "val_classes_predicted": len(set(val["preds"])),
        "test": test_metrics,
        "test_accuracy": test_metrics["accuracy"],
        "test_accuracy_se": test["accuracy_se"],
    }


def positive_index(labels: Sequence[str], positive: str | None) -> int:
    """The positive class of a binary task (whose precision, recall and F1 are reported): the label
    named, else the second in the labels' order (1 of 0/1, spam of ham/spam)."""
    if positive is None:
        return 1
    name = D.label_name(positive.strip())  # as the CSV's labels are read: "01" is class 1
    if name not in labels:
        raise ValueError(f"--positive-label {positive!r} is not a label of this dataset; its labels are {list(labels)}")
    return list(labels).index(name)


def _finite(value: object) -> object:
    """`value` with every NaN or infinite float as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _kept_row(fitted: Fitted) -> dict:
    """The history row of the epoch the run keeps."""
    return next(r for r in fitted.history if r["epoch"] == fitted.epoch_kept)


def _write_run(run: Path, cfg: TrainConfig, loaded, model: nn.Module, fitted: Fitted, metrics: dict, initial: dict):
    """A finished run's files: the adapter (and its PEFT export), the history and its plot, the
    confusion matrix, the metrics last (a run with metrics.json is complete); the checkpoint goes."""
    from .plots import plot_confusion, plot_history

    if "test" in metrics:
        plot_confusion(metrics["test"]["confusion_matrix"], metrics["labels"], run / "confusion.png")
    extra = _whole(cfg, loaded)
    save_adapter(model, run / ADAPTER_FILE, extra=extra)
    export_peft_adapter(model, run / "peft", base_model_name_or_path=loaded.source, extra=extra)
    lines = [",".join(fitted.history[0])] + [",".join(str(v) for v in row.values()) for row in fitted.history]
    write_text(run / HISTORY, "\n".join(lines) + "\n")
    write_csv(run / STEPS, fitted.step_log, STEP_COLUMNS)
    title = f"{cfg.model} on {cfg.dataset}, LoRA r={cfg.rank}"
    plot_history(fitted.history, run / "history.png", title, initial, fitted.step_log, fitted.epoch_kept)
    write_text(run / METRICS, json.dumps(_finite(metrics), indent=2) + "\n")  # strict JSON: NaN as null
    (run / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: the adapter and metrics hold it


def load_run(run: str | Path, task: str | None = None):
    """The config of a finished run and its model with the run's adapter loaded, in eval mode;
    refused before anything loads if the run is not of `task`."""
    from .adapters import load_adapter
    from .models import load_pretrained

    run = Path(run)
    if not (run / CONFIG).is_file() or not (run / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a finished lora-lab train run (no config.json and adapter.safetensors)")
    cfg = TrainConfig(**json.loads((run / CONFIG).read_text()))
    kind = cfg.make_task("hf")  # what the run is (how its model takes a batch does not matter here)
    if task is not None and kind.name != Task(task).name:
        raise ValueError(f"{run} is a {kind.name} run ({cfg.dataset}), not {task}: use {kind.tool}")
    metrics = json.loads((run / METRICS).read_text()) if (run / METRICS).is_file() else {}
    labels = metrics.get("labels") or (["0", "1"] if kind.classifies else [])
    torch.manual_seed(cfg.seed)  # as `prepare` did: a head that was not saved (frozen) comes back the same
    loaded = load_pretrained(cfg.model, cfg.task(), num_labels=len(labels), max_length=cfg.max_length,
                             quantize=cfg.quantize, compute_dtype=_compute_dtype(cfg))  # fmt: skip
    load_adapter(loaded.model, run / ADAPTER_FILE)
    loaded.model.eval()
    return cfg, loaded, labels


def classify(cfg, loaded, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (len(texts), classes) from a classification run, batched as in training:
    the same padding and pooling. The book's last-position pooling reads whatever the last position
    holds, which without a fixed length (pad_to) depends on the batch's other texts: there each text
    goes alone."""
    task = cfg.make_task(loaded.kind)
    collate = task.collate(loaded.tokenizer)
    size = 1 if cfg.pooling == "last-position" and not cfg.pad_to else batch_size
    groups = [[(text, 0) for text in texts[k : k + size]] for k in range(0, len(texts), size)]
    with torch.no_grad():
        bar = tqdm(groups, desc="classify", leave=False, disable=None if len(groups) > 1 else True)
        return torch.cat([task.logits(loaded.model, collate(g)).float().softmax(-1) for g in bar])


def answer(loaded, template: str, instruction: str, context: str = "", max_new_tokens: int = 128) -> str:
    """The tuned model's greedy answer to an instruction (with an optional input)."""
    from .gpt2 import generate

    tok = loaded.tokenizer
    room = tok.max_length - max_new_tokens  # what the prompt may take of the context
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in {tok.max_length} tokens")
    # a prompt too long keeps its end, where the response starts (and its BOS)
    ids = torch.tensor([tok.encode_tail(tok.prompt({"instruction": instruction, "input": context}, template), room)])
    with torch.no_grad():
        if loaded.kind == "gpt":
            out = generate(loaded.model, ids, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
        else:
            out = loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
            )  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :].tolist()).strip()
