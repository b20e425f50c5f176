"""Rank sweeps: one `train` run per point of a grid, collected in one CSV.

A point is one combination of model, rank r, alpha, scaling (alpha/r, or rsLoRA's alpha/sqrt(r)),
target set and seed; the grid is the product of the lists. Every point trains into its own run
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
import fcntl
import io
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .files import write_text

CSV_NAME, SUMMARY, PLOT, SETTINGS, LOCK = "sweep.csv", "summary.md", "sweep.png", "sweep.json", ".sweep.lock"
SCALINGS = ("standard", "rslora")
# The columns of sweep.csv: the point, then what its run measured. Empty where a task has no such
# figure (accuracy for instruction tuning) or the point diverged.
KEY_COLUMNS = ["model", "rank", "alpha", "scaling", "targets", "seed"]
COLUMNS = KEY_COLUMNS + [
    "status",
    "trainable_params",
    "total_params",
    "final_train_loss",
    "final_val_loss",
    "val_accuracy",
    "test_accuracy",
    "test_f1",
    "test_loss",
    "peak_memory_mib",
    "tokens_per_second",
    "seconds",
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

    def key(self) -> tuple[str, ...]:
        return (self.model, str(self.rank), _number(self.alpha), self.scaling, self.targets, str(self.seed))

    def run_name(self) -> str:
        """The run directory's name: readable, and unique within a sweep."""
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.strip("/")).strip("_")[-40:]
        targets = re.sub(r"[^A-Za-z0-9._+-]+", "_", self.targets)[:60]
        return f"{model}/r{self.rank}-a{_number(self.alpha)}-{self.scaling}-{targets}-s{self.seed}"


def _number(value: float) -> str:
    """16.0 -> "16", 0.5 -> "0.5": the same alpha always reads the same in the CSV."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


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
) -> list[Point]:
    """Every point of the product of the lists (each list's items once, in the order given).
    Without `alphas`, alpha = `alpha_ratio` * r."""
    ranks, seeds = list(dict.fromkeys(ranks)), list(dict.fromkeys(seeds))
    bad = [r for r in ranks if r <= 0]
    if bad or not ranks:
        raise ValueError(f"ranks must be positive whole numbers, got {bad or 'none'}")
    unknown = sorted(set(scalings) - set(SCALINGS))
    if unknown:
        raise ValueError(f"unknown scaling {unknown}: use {' or '.join(SCALINGS)}")
    if alphas is not None and any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be positive, got {list(alphas)}")
    if alphas is None and alpha_ratio <= 0:
        raise ValueError(f"--alpha-ratio must be positive, got {alpha_ratio}")
    points = []
    for model, targets, scaling, rank, seed in itertools.product(
        dict.fromkeys(models), dict.fromkeys(target_sets), dict.fromkeys(scalings), ranks, seeds
    ):
        for alpha in dict.fromkeys(alphas) if alphas is not None else [alpha_ratio * rank]:
            points.append(Point(model, rank, float(alpha), scaling, targets, seed))
    return points


def shard_from_env(shard: str | None = None) -> tuple[int, int]:
    """(i, n): this process's share of the points. `shard` "I/N" (0 <= I < N) wins; else torchrun's
    RANK and WORLD_SIZE; else (0, 1), all points."""
    if shard:
        match = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise ValueError(f"--shard takes I/N with 0 <= I < N, as 0/4 ($SLURM_ARRAY_TASK_ID/4); got {shard!r}")
        return int(match[1]), int(match[2])
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- the CSV, shared by every process of the sweep ---------------------------------------------


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the sweep's lock file: one process at a time reads and rewrites sweep.csv. (POSIX
    advisory locks; on a cluster, put DIR on a file system that supports them, as NFSv4 does.)"""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_rows(out: str | Path) -> list[dict[str, str]]:
    """The rows of DIR/sweep.csv (none if there is no file yet)."""
    path = Path(out) / CSV_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[k] for k in KEY_COLUMNS)


def append_row(out: Path, row: dict[str, object]) -> bool:
    """Add `row` to DIR/sweep.csv unless a row of the same point is there; True if added. Call
    under `locked(out)`."""
    rows = read_rows(out)
    new = {k: "" if row.get(k) is None else str(row[k]) for k in COLUMNS}
    if any(row_key(r) == row_key(new) for r in rows):
        return False
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: r.get(k, "") for k in COLUMNS} for r in rows] + [new])
    write_text(out / CSV_NAME, buffer.getvalue())
    return True


def _round(value: object, digits: int = 4) -> object:
    return round(value, digits) if isinstance(value, float) else value


def result_row(point: Point, metrics: dict | None, run: str, error: str | None = None) -> dict[str, object]:
    """The CSV row of a finished point: its key, and what `train` measured (or why it stopped)."""
    row: dict[str, object] = dict(zip(KEY_COLUMNS, point.key(), strict=True))
    row["run"] = run
    if metrics is None:
        row["status"] = f"diverged: {error}"
        return row
    test = metrics.get("test") or {}
    row.update(
        status="ok",
        trainable_params=metrics["trainable_params"],
        total_params=metrics["total_params"],
        final_train_loss=_round(metrics.get("final_train_loss")),
        final_val_loss=_round(metrics.get("final_val_loss")),
        val_accuracy=_round(metrics.get("val_accuracy")),
        test_accuracy=_round(test.get("accuracy")),
        test_f1=_round(test.get("f1")),
        test_loss=_round(metrics.get("test_loss")),
        peak_memory_mib=metrics.get("peak_memory_mib"),
        tokens_per_second=metrics.get("tokens_per_second"),
        seconds=metrics.get("train_seconds"),
    )
    return row


# ---- running it --------------------------------------------------------------------------------


def point_config(base, point: Point):
    """`base` (a TrainConfig) with the point's model, rank, alpha, scaling, targets and seed."""
    targets = "all-linear" if point.targets == "all-linear" else point.targets.split("+")
    return dataclasses.replace(
        base,
        model=point.model,
        rank=point.rank,
        alpha=point.alpha,
        use_rslora=point.scaling == "rslora",
        targets=targets,
        seed=point.seed,
    )


def _settings(base) -> dict:
    """What the sweep holds fixed: the train config but the fields a point sets."""
    varied = {"model", "rank", "alpha", "use_rslora", "targets", "seed", "device"}
    return {k: v for k, v in dataclasses.asdict(base).items() if k not in varied}


def check_settings(out: Path, base) -> None:
    """Record the fixed settings of a new sweep in DIR/sweep.json; refuse to add points to a sweep
    of other settings (its rows would not compare). Call under `locked(out)`."""
    path = out / SETTINGS
    settings = _settings(base)
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds a sweep with other settings ({shown}); give another --out")
    else:
        write_text(path, json.dumps(settings, indent=2) + "\n")


def run_sweep(
    base, points: Sequence[Point], out: str | Path, shard: tuple[int, int] = (0, 1), ddp: bool = False, log=print
) -> dict:
    """Train this process's share of `points` (those not finished yet) into `out`; the process that
    finishes the last point writes the summary. With `ddp` (under torchrun) every process trains
    every point together instead (DistributedDataParallel) and rank 0 keeps the books. Returns
    counts: trained, skipped, diverged, and whether this process wrote the summary."""
    from tqdm.auto import tqdm

    from .train import TrainingError, init_distributed, train

    out = Path(out)
    writes = True
    if ddp:
        writes, shard = init_distributed()[0] == 0, (0, 1)
    index, count = shard
    with locked(out):
        if writes:
            check_settings(out, base)
        done = {row_key(r) for r in read_rows(out)}
    mine = [p for i, p in enumerate(points) if i % count == index]
    todo = [p for p in mine if p.key() not in done]
    where = f" (shard {index}/{count})" if count > 1 else ""
    log(f"sweep{where}: {len(points)} points, {len(mine)} here, {len(mine) - len(todo)} finished already; {out}")
    stats = {"trained": 0, "skipped": len(mine) - len(todo), "diverged": 0, "summary": False}
    for point in tqdm(todo, desc="sweep points", disable=None):
        run = out / "runs" / point.run_name()
        log(f"point {point.model} r={point.rank} alpha={_number(point.alpha)} {point.scaling} {point.targets} "
            f"seed {point.seed} -> {run}")  # fmt: skip
        try:
            metrics, error = train(point_config(base, point), run, distributed=ddp), None
        except TrainingError as err:
            metrics, error = None, str(err).split(":")[0]
            stats["diverged"] += 1
            log(f"point diverged: {err}")
        if writes:
            with locked(out):
                append_row(out, result_row(point, metrics, str(run.relative_to(out)), error))
        stats["trained"] += 1
    if not writes:
        return stats
    with locked(out):
        rows = read_rows(out)
        if {p.key() for p in points} <= {row_key(r) for r in rows}:
            write_summary(out, [r for r in rows if row_key(r) in {p.key() for p in points}], base.task())
            stats["summary"] = True
    return stats


# ---- the summary ---------------------------------------------------------------------------------


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def metric_for(task: str) -> tuple[str, str, bool]:
    """(column chosen on, column reported, higher is better): classification picks the rank by
    validation accuracy and reports test accuracy; instruction tuning uses validation loss."""
    if task == "classification":
        return "val_accuracy", "test_accuracy", True
    return "final_val_loss", "test_loss", False


def series_name(row: dict[str, str], varied: Sequence[str]) -> str:
    """A line's label: the values of the key columns that differ between lines."""
    return ", ".join(f"{k} {row[k]}" if k in ("alpha", "seed") else row[k] for k in varied) or row["model"]


def summarize(rows: Sequence[dict[str, str]], task: str) -> tuple[list[dict[str, object]], list[str]]:
    """One line per (model, alpha rule, scaling, targets, rank), the mean over seeds (and the spread
    when there are several), and per series the best rank: the best mean validation metric, ties
    broken toward fewer trainable parameters. Returns the table and the lines that name the best."""
    chosen, reported, higher = metric_for(task)
    ok = [r for r in rows if r["status"] == "ok"]
    alphas_follow_rank = all(float(r["alpha"]) / int(r["rank"]) == float(ok[0]["alpha"]) / int(ok[0]["rank"])
                             for r in ok) if ok else True  # fmt: skip
    group_cols = ["model", "scaling", "targets"] + ([] if alphas_follow_rank else ["alpha"])
    varied = [k for k in group_cols if len({r[k] for r in ok}) > 1]
    groups: dict[tuple, dict[int, list[dict[str, str]]]] = {}
    for r in ok:
        groups.setdefault(tuple(r[k] for k in group_cols), {}).setdefault(int(r["rank"]), []).append(r)
    table, best_lines = [], []
    for by_rank in groups.values():
        lines = []
        for rank in sorted(by_rank):
            runs = by_rank[rank]
            values = [_float(r[chosen]) for r in runs if _float(r[chosen]) is not None]
            shown = [_float(r[reported]) for r in runs if _float(r[reported]) is not None]
            line = {
                "series": series_name(runs[0], varied),
                "rank": rank,
                "alpha": runs[0]["alpha"] if len({r["alpha"] for r in runs}) == 1 else "mixed",
                "seeds": len(runs),
                "trainable_params": int(runs[0]["trainable_params"]),
                chosen: statistics.fmean(values) if values else math.nan,
                reported: statistics.fmean(shown) if shown else math.nan,
                "seconds": statistics.fmean(float(r["seconds"]) for r in runs),
                "peak_memory_mib": max(float(r["peak_memory_mib"]) for r in runs),
            }
            if task == "classification":
                line["test_f1"] = statistics.fmean(float(r["test_f1"]) for r in runs)
            if len(runs) > 1 and len(shown) > 1:
                line[f"{reported}_sd"] = statistics.stdev(shown)
            lines.append(line)
        scored = [line for line in lines if not math.isnan(line[chosen])]
        if scored:
            sign = 1 if higher else -1
            best = max(scored, key=lambda line: (sign * line[chosen], -line["trainable_params"]))
            best["best"] = "yes"
            best_lines.append(
                f"{best['series']}: best rank r={best['rank']} ({chosen} {best[chosen]:.4f}, {reported} "
                f"{best[reported]:.4f}, {best['trainable_params']:,d} trainable parameters)"
            )
        table += lines
    for line in table:
        line.setdefault("best", "")
    return table, best_lines


def write_summary(out: Path, rows: Sequence[dict[str, str]], task: str) -> None:
    """DIR/summary.md (the table, the best rank per series, diverged points) and DIR/sweep.png."""
    from .params import markdown_table
    from .plots import plot_sweep

    table, best = summarize(rows, task)
    diverged = [r for r in rows if r["status"] != "ok"]
    chosen, reported, _ = metric_for(task)
    text = [
        f"# Rank sweep: {len(rows)} points",
        "",
        f"The best rank of each series has the best mean `{chosen}` (chosen on validation, not on test); ties go "
        "to fewer trainable parameters. Means over seeds; seconds are training time per point.",
        "",
        *[f"- {line}" for line in best],
        "",
        markdown_table(table, {"alpha": 1}) if table else "(no point finished)",
        "",
    ]
    if diverged:
        text += ["Diverged points (no metrics):", ""]
        text += [f"- {r['model']} r={r['rank']} alpha={r['alpha']} {r['scaling']}: {r['status']}" for r in diverged]
        text += [""]
    text += [f"![sweep]({PLOT})", ""]
    write_text(out / SUMMARY, "\n".join(text))
    if table:
        plot_sweep(table, out / PLOT, chosen, reported)
