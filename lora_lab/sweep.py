"""Rank sweeps: one `train` run per point of a grid, collected in one CSV.

A point is one combination of model, rank r, alpha, scaling (alpha/r, or rsLoRA's alpha/sqrt(r)),
target set, variant (LoRA or DoRA), initialisation (kaiming, gaussian, PiSSA, OLoRA), LoRA+'s
learning-rate ratio and seed; the grid is the product of the lists, and every combination but the
rank and the seed is a series that the summary compares over its ranks. Every point trains into its own run
directory under `DIR/runs/` and, when it is finished (its metrics written, or a clear divergence),
adds one row to `DIR/sweep.csv`. A point is finished exactly when its row is in the CSV:

- a re-run skips the points with a row, and redoes the others; a point killed half-way resumes
  from its last epoch checkpoint (`train` does that), one killed after its metrics were written
  only adds its row;
- rows are added under a lock file, by rewriting the CSV atomically (readers see the old file or
  the new one, never half a row), so processes that share `DIR` never duplicate or lose a row.

Points are independent, so processes split them: process i of n takes the points whose index in
the grid is i modulo n. n and i come from `--shard I/N` (job arrays) or from torchrun's RANK and
WORLD_SIZE. The process that adds the last row writes the summary (`summary.md`, `sweep.png`).
A point too slow for one GPU goes the other way (`--ddp` under torchrun): every process trains
every point together, with DistributedDataParallel, and rank 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .files import write_csv, write_text
from .report import write_summary

CSV_NAME, SETTINGS, LOCK, CONFIG = "sweep.csv", "sweep.json", ".sweep.lock", "config.json"
SCALINGS = ("standard", "rslora")
VARIANTS = ("lora", "dora")
# Key columns added since the first sweeps, with the value their rows ran with: older CSVs read so.
LATER_KEYS = {"variant": "lora", "init": "kaiming", "lr_ratio": "1"}
# The columns of sweep.csv: the point, then what its run measured. Empty where a task has no such
# figure (accuracy for instruction tuning) or the point failed (status "failed: why"). Losses are
# unweighted mean cross-entropy per example or response token; final_val_loss_se is its standard
# error; val_scored counts the validation examples (or tokens); val_baseline is the accuracy of always
# answering the most common training class (or the untrained model's loss); test_f1 is positive_class's;
# epoch_kept the epoch whose adapter the run kept (the best by validation with --keep best, else the last).
KEY_COLUMNS = ["model", "rank", "alpha", "scaling", "targets", "variant", "init", "lr_ratio", "seed"]
COLUMNS = KEY_COLUMNS + [
    "status",
    "trainable_params",
    "total_params",
    "final_train_loss",
    "final_val_loss",
    "final_val_loss_se",
    "val_accuracy",
    "val_scored",
    "val_baseline",
    "val_classes_predicted",
    "test_accuracy",
    "test_f1",
    "positive_class",
    "test_loss",
    "peak_memory_mib",
    "tokens_per_second",
    "seconds",
    "epoch_kept",
    "run",
]


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    model: str
    rank: int
    alpha: float
    scaling: str  # standard (alpha / r) or rslora (alpha / sqrt(r))
    targets: str  # "all-linear", or module names joined by "+"
    seed: int
    variant: str = "lora"  # lora or dora
    init: str = "kaiming"  # variants.INITS
    lr_ratio: float = 1.0  # LoRA+: B's learning rate over A's

    def key(self) -> tuple[str, ...]:
        return (
            self.model, str(self.rank), _number(self.alpha), self.scaling, self.targets,
            self.variant, self.init, _number(self.lr_ratio), str(self.seed),
        )  # fmt: skip

    def run_name(self) -> str:
        """The run directory's name: readable, and unique (a hash of the key ends it; the settings
        added later count only where they differ from what earlier sweeps ran, so their runs keep
        their directories)."""
        import hashlib

        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.strip("/")).strip("_")[-40:]
        targets = re.sub(r"[^A-Za-z0-9._+-]+", "_", self.targets)[:60]
        later = [v for k, v in zip(KEY_COLUMNS, self.key(), strict=True) if k in LATER_KEYS and v != LATER_KEYS[k]]
        first = [v for k, v in zip(KEY_COLUMNS, self.key(), strict=True) if k not in LATER_KEYS]
        digest = hashlib.sha1("\0".join(first + later).encode()).hexdigest()[:8]
        extra = "".join(f"-{v}" for v in (self.variant, self.init) if v not in LATER_KEYS.values())
        extra += f"-lrr{_number(self.lr_ratio)}" if self.lr_ratio != 1 else ""
        return f"{model}/r{self.rank}-a{_number(self.alpha)}-{self.scaling}-{targets}{extra}-s{self.seed}-{digest}"


def _number(value: float) -> str:
    """16.0 -> "16", 0.5 -> "0.5", 0.1 * 3 -> "0.3": the same alpha always reads the same in the CSV."""
    value = float(f"{float(value):.10g}")
    return str(int(value)) if value.is_integer() else repr(value)


def _model_key(model: str) -> str:
    """A model as the sweep keys it: a local directory by its absolute path (so `bert`, `bert/` and
    `./bert` are one model), a registered name or hub id as given."""
    from .gpt2_weights import is_path_like

    return str(Path(model).expanduser().resolve()) if is_path_like(model) else model


def target_set(names: Sequence[str] | str) -> str:
    """A target set as the CSV writes it: "all-linear", or the names joined by "+"."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("an empty target set: name modules (query,value) or all-linear")
    if "all-linear" in names and len(names) > 1:
        raise ValueError("'all-linear' stands alone in a target set")
    return "+".join(names)


def grid(
    models: Sequence[str],
    ranks: Sequence[int],
    alphas: Sequence[float] | None = None,
    alpha_ratio: float = 2.0,
    scalings: Sequence[str] = ("standard",),
    target_sets: Sequence[str] = ("all-linear",),
    seeds: Sequence[int] = (123,),
    variants: Sequence[str] = ("lora",),
    inits: Sequence[str] = ("kaiming",),
    lr_ratios: Sequence[float] = (1.0,),
) -> list[Point]:
    """Every point of the product of the lists (each list's items once, in the order given).
    Without `alphas`, alpha = `alpha_ratio` * r."""
    _check_variants(variants, inits, lr_ratios)
    ranks, seeds = list(dict.fromkeys(ranks)), list(dict.fromkeys(seeds))
    bad = [r for r in ranks if r <= 0]
    if bad or not ranks:
        raise ValueError(f"ranks must be positive whole numbers, got {bad or 'none'}")
    unknown = sorted(set(scalings) - set(SCALINGS))
    if unknown:
        raise ValueError(f"unknown scaling {unknown}: use {' or '.join(SCALINGS)}")
    if alphas is not None and not all(math.isfinite(a) and a > 0 for a in alphas):
        raise ValueError(f"alphas must be positive, got {list(alphas)}")
    if alphas is None and not (math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise ValueError(f"--alpha-ratio must be positive, got {alpha_ratio}")
    points = []
    series = itertools.product(
        dict.fromkeys(_model_key(m) for m in models), dict.fromkeys(target_sets), dict.fromkeys(scalings),
        dict.fromkeys(variants), dict.fromkeys(inits), dict.fromkeys(float(_number(x)) for x in lr_ratios),
    )  # fmt: skip
    for (model, targets, scaling, variant, init, ratio), rank, seed in itertools.product(series, ranks, seeds):
        for alpha in dict.fromkeys(alphas) if alphas is not None else [alpha_ratio * rank]:
            point = Point(_model_key(model), rank, float(_number(alpha)), scaling, targets, seed, variant, init, ratio)
            points.append(point)
    return points


def _check_variants(variants: Sequence[str], inits: Sequence[str], lr_ratios: Sequence[float]) -> None:
    from .variants import INITS

    for what, values, known in (("variant", variants, VARIANTS), ("init", inits, INITS)):
        unknown = sorted(set(values) - set(known))
        if unknown or not values:
            raise ValueError(f"unknown {what} {unknown or 'none'}: use {', '.join(known)}")
    if not lr_ratios or not all(math.isfinite(x) and x > 0 for x in lr_ratios):
        raise ValueError(f"--lr-ratios must be positive, got {list(lr_ratios)}")


def shard_from_env(shard: str | None = None) -> tuple[int, int]:
    """(i, n): this process's share of the points. `shard` "I/N" (0 <= I < N) wins; else torchrun's
    RANK and WORLD_SIZE; else (0, 1), all points."""
    if shard:
        match = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise ValueError(f"--shard takes I/N with 0 <= I < N, as 0/4 ($SLURM_ARRAY_TASK_ID/4); got {shard!r}")
        return int(match[1]), int(match[2])
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_targets(points: Sequence[Point]) -> None:
    """Every target set finds modules in every model of the grid, and takes the PiSSA / OLoRA starts
    the grid asks for (linears only, rank within their width), checked on the meta device before the
    first point trains (a model whose config cannot be read here is left to its points)."""
    import warnings

    from .inject import inject_lora
    from .models import build_model
    from .targets import find_targets

    for model in dict.fromkeys(p.model for p in points):
        try:
            built = build_model(model, "meta")
        except (OSError, ValueError):
            continue
        for targets in dict.fromkeys(p.targets for p in points if p.model == model):
            names = "all-linear" if targets == "all-linear" else targets.split("+")
            try:
                find_targets(built, names)
                for init in dict.fromkeys(p.init for p in points if p.model == model and p.init in ("pissa", "olora")):
                    rank = max(p.rank for p in points if p.model == model and p.init == init)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the rank warning, if any, comes with the point
                        inject_lora(build_model(model, "meta"), names, rank=rank, init=init)
            except ValueError as err:
                raise ValueError(f"--targets {targets.replace('+', ',')} on {model}: {err}") from None


# ---- the CSV, shared by every process of the sweep ---------------------------------------------


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the sweep's lock file: one process at a time reads and rewrites sweep.csv. (`filelock`:
    advisory locks on POSIX, where a cluster needs DIR on a file system that supports them, as NFSv4
    does; Windows locks elsewhere.)"""
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / LOCK):
        yield


def read_rows(out: str | Path) -> list[dict[str, str]]:
    """The rows of DIR/sweep.csv (none if there is no file yet)."""
    path = Path(out) / CSV_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{**LATER_KEYS, **row} for row in csv.DictReader(f)]


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[k] for k in KEY_COLUMNS)


def append_row(out: Path, row: dict[str, object]) -> bool:
    """Add `row` to DIR/sweep.csv unless a row of the same point is there; True if added. Call
    under `locked(out)`."""
    rows = read_rows(out)
    new = {k: "" if row.get(k) is None else str(row[k]) for k in COLUMNS}
    if any(row_key(r) == row_key(new) for r in rows):
        return False
    write_csv(out / CSV_NAME, [{k: r.get(k, "") for k in COLUMNS} for r in rows] + [new], COLUMNS)
    return True


def _round(value: object, digits: int = 4) -> object:
    return round(value, digits) if isinstance(value, float) else value


def result_row(point: Point, metrics: dict | None, run: str, error: str | None = None) -> dict[str, object]:
    """The CSV row of a finished point: its key, and what `train` measured (or why it stopped)."""
    row: dict[str, object] = dict(zip(KEY_COLUMNS, point.key(), strict=True))
    row["run"] = run
    if metrics is None:
        row["status"] = f"failed: {error}"
        return row
    test = metrics.get("test") or {}
    row.update(
        status="ok",
        trainable_params=metrics["trainable_params"],
        total_params=metrics["total_params"],
        final_train_loss=_round(metrics.get("final_train_loss")),
        final_val_loss=_round(metrics.get("final_val_loss")),
        final_val_loss_se=_round(metrics.get("final_val_loss_se"), 6),
        val_accuracy=_round(metrics.get("val_accuracy"), 12),
        val_scored=metrics.get("val_scored"),
        val_baseline=_round(metrics.get("val_baseline"), 6),
        val_classes_predicted=metrics.get("val_classes_predicted"),
        test_accuracy=_round(test.get("accuracy"), 12),
        test_f1=_round(test.get("f1")),
        positive_class=test.get("positive_class"),
        test_loss=_round(metrics.get("test_loss")),
        peak_memory_mib=metrics.get("peak_memory_mib"),
        tokens_per_second=metrics.get("tokens_per_second"),
        seconds=metrics.get("train_seconds"),
        epoch_kept=metrics.get("epoch_kept"),
    )
    return row


# ---- running it --------------------------------------------------------------------------------


def point_config(base, point: Point):
    """`base` (a TrainConfig) with the point's model, rank, alpha, scaling, targets, variant, init,
    LoRA+ ratio and seed."""
    targets = "all-linear" if point.targets == "all-linear" else point.targets.split("+")
    return dataclasses.replace(
        base,
        model=point.model,
        rank=point.rank,
        alpha=point.alpha,
        use_rslora=point.scaling == "rslora",
        targets=targets,
        seed=point.seed,
        use_dora=point.variant == "dora",
        init=point.init,
        lr_ratio=point.lr_ratio,
    )


def sweep_settings(base, processes: int = 1) -> dict:
    """What the sweep holds fixed: the train config but the fields a point sets (and those that say
    how it computes: device, compile), and how many processes train each point (DDP: a step's batch
    is that many batches)."""
    from .config import HOW

    varied = {"model", "rank", "alpha", "use_rslora", "targets", "seed", "use_dora", "init", "lr_ratio", *HOW}
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in varied}
    return {**settings, "processes_per_point": processes}


def check_settings(out: Path, settings: dict, record: bool = False) -> None:
    """Refuse to add points to a sweep of other fixed settings (its rows would not compare); with
    `record`, write them to DIR/sweep.json if the sweep has none yet (done with its first row, so a
    command that fails before any point finished locks nothing in). Call under `locked(out)`."""
    path = out / SETTINGS
    if path.is_file():
        from .config import TrainConfig

        defaults = sweep_settings(TrainConfig())  # a setting added since the sweep was recorded: its default ran
        saved = {**defaults, **json.loads(path.read_text())}
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds a sweep with other settings ({shown}); give another --out")
    elif record:
        write_text(path, json.dumps(settings, indent=2) + "\n")


def record_options(out: Path, options: dict) -> None:
    """Write the command's options to DIR/config.json (`lora-lab sweep --config` reads it back), each
    list joined with the one a previous command into DIR recorded: the file names every point the
    directory holds. Call under `locked(out)`, once the settings are checked."""
    path = out / CONFIG
    before = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**before, **options}
    for key, value in options.items():
        old = before.get(key)
        if isinstance(value, list) and isinstance(old, list):
            merged[key] = [*old, *(v for v in value if v not in old)]
    if before and before.get("alpha_ratio") != options.get("alpha_ratio"):  # two ratios, or a ratio and alphas:
        ranks = merged["ranks"]  # every alpha either ran, crossed with every rank
        alphas = [a for o in (before, options) for a in (o.get("alphas") or [o["alpha_ratio"] * r for r in ranks])]
        merged.update(alphas=list(dict.fromkeys(alphas)), alpha_ratio=None)
    write_text(path, json.dumps(merged, indent=2) + "\n")


def run_sweep(
    base,
    points: Sequence[Point],
    out: str | Path,
    shard: tuple[int, int] = (0, 1),
    ddp: bool = False,
    log=None,
    options: dict | None = None,
) -> dict:
    """Train this process's share of `points` (those not finished yet) into `out`; the process that
    finishes the last point writes the summary. With `ddp` (under torchrun) every process trains
    every point together instead (DistributedDataParallel) and rank 0 keeps the books. Returns
    counts: trained, skipped, failed (a TrainingError: diverged, nothing to learn), and whether this
    process wrote the summary. `log` prints a line (default: through the progress bar). `options`,
    the command's (a config file's keys), go to DIR/config.json."""
    from tqdm.auto import tqdm

    from .distributed import init_distributed
    from .loop import TrainingError
    from .run import train

    log = log or tqdm.write  # through the progress bar, so a line never lands inside it
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a sweep writes a directory: give a new or existing directory")
    check_targets(points)
    writes, processes = True, 1
    if ddp:
        rank, processes = init_distributed(base.device)
        writes, shard = rank == 0, (0, 1)
    settings = sweep_settings(base, processes)
    index, count = shard
    with locked(out):
        check_settings(out, settings)
        done = {row_key(r) for r in read_rows(out)}
        if options is not None and writes:
            record_options(out, options)
    mine = [p for i, p in enumerate(points) if i % count == index]
    todo = [p for p in mine if p.key() not in done]
    if ddp and processes > 1:  # every process trains the same points: rank 0's reading of the CSV decides
        import torch.distributed as dist

        shared = [todo]
        dist.broadcast_object_list(shared, src=0)
        todo = shared[0]
    where = f" (shard {index}/{count})" if count > 1 else ""
    log(f"sweep{where}: {len(points)} points, {len(mine)} here, {len(mine) - len(todo)} finished already; {out}")
    stats = {"trained": 0, "skipped": len(mine) - len(todo), "failed": 0, "summary": False}
    for point in tqdm(todo, desc="sweep points", disable=None):
        run = out / "runs" / point.run_name()
        log(f"point {point.model} r={point.rank} alpha={_number(point.alpha)} {point.scaling} {point.targets} "
            f"{point.variant} {point.init} lr-ratio {_number(point.lr_ratio)} seed {point.seed} -> {run}")  # fmt: skip
        try:
            metrics, error = train(point_config(base, point), run, distributed=ddp, sweep=out), None
        except TrainingError as err:
            metrics, error = None, " ".join(str(err).split())  # the whole reason, on one line
            stats["failed"] += 1
            log(f"point failed: {err}")
        if writes:
            with locked(out):
                check_settings(out, settings, record=True)
                append_row(out, result_row(point, metrics, str(run.relative_to(out)), error))
        stats["trained"] += 1
    if not writes:
        return stats
    with locked(out):
        rows = read_rows(out)
        if {p.key() for p in points} <= {row_key(r) for r in rows}:
            write_summary(out, rows, base.task())  # every row: a sweep extended by a rank is summarised whole
            stats["summary"] = True
    if stats["summary"]:
        from .tracking import finish_sweep

        finish_sweep(out, base.report_to or [])
    return stats
