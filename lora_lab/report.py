"""Reports a person reads: markdown tables, the parameter report's files, and a sweep's summary.

The sweep's summary compares the ranks of each series (a model, scaling and target set) on the
validation metric with its noise (`stats.py`): per rank the mean over seeds, its standard error and
95% interval; the recommended rank (one-standard-error rule) beside the best on the metric alone;
the Pareto front of trainable parameters against the metric; the baseline and the points too weak to
trust. Pure functions compute the table (`compare_ranks`, `summarize`); `write_summary` writes
summary.md and the plot.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import stats as S
from .files import write_csv, write_text
from .params import REPORT_DECIMALS
from .plots import plot_param_report, plot_sweep
from .tasks import Task

SUMMARY, PLOT = "summary.md", "sweep.png"


def markdown_table(rows: list[dict[str, object]], decimals: Mapping[str, int] | None = None) -> str:
    """Rows of equal keys as a GitHub markdown table, text columns left-aligned and numbers right;
    ints get thousands separators, float columns the `decimals` given for them, else one count for
    the whole column: four significant digits of its largest value, at least one decimal and at
    most four (13.80 beside 8.47)."""
    if not rows:
        return ""
    decimals = dict(decimals or {})
    keys = list(rows[0])
    for k in keys:
        floats = [abs(r[k]) for r in rows if isinstance(r[k], float) and math.isfinite(r[k])]
        if k not in decimals and floats:
            top = max(floats)
            decimals[k] = 4 if top < 10 else min(4, max(1, 3 - int(math.floor(math.log10(top)))))

    def cell(k: str, v: object) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, int):
            return f"{v:,d}"
        if not math.isfinite(v):
            return "-"
        return f"{v:,.{decimals.get(k, 4)}f}"

    # numbers right-aligned, text (names, intervals, flags) left-aligned
    text = {k for k in keys if all(isinstance(r[k], (str, bool)) or r[k] is None for r in rows)}
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join(":---" if k in text else "---:" for k in keys) + "|"]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: list[dict], out: str | os.PathLike) -> list[Path]:
    """DIR/param_report.csv, .md (the table) and .png (trainable parameters and training memory
    against the rank); returns the paths written."""
    out = Path(out)
    paths = [out / "param_report.csv", out / "param_report.md", out / "param_report.png"]
    write_csv(paths[0], rows)
    write_text(paths[1], markdown_table(rows, REPORT_DECIMALS) + "\n")
    plot_param_report(rows, paths[2])
    return paths


# ---- a sweep's summary -------------------------------------------------------------------------


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def metric_for(task: str) -> tuple[str, str, bool]:
    """(column chosen on, column reported, higher is better) of a task by its name (`Task.metric`)."""
    return Task(task).metric


def series_name(row: dict[str, str], varied: Sequence[str]) -> str:
    """A line's label: the values of the key columns that differ between lines."""
    named = ("alpha", "seed", "lr_ratio")  # numbers say what they are
    return ", ".join(f"{k.replace('_', '-')} {row[k]}" if k in named else row[k] for k in varied) or row["model"]


def series_columns(rows: Sequence[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(columns that make a series, those of them that differ between series): model, scaling and
    targets, and alpha too unless it follows the rank (alpha = ratio x r, one ratio for all)."""
    ratios = [float(r["alpha"]) / int(r["rank"]) for r in rows]
    follows = all(math.isclose(x, ratios[0], rel_tol=1e-6) for x in ratios) if ratios else True
    columns = ["model", "scaling", "targets", "variant", "init", "lr_ratio"] + ([] if follows else ["alpha"])
    return columns, [k for k in columns if len({r.get(k, "") for r in rows}) > 1]


@dataclass
class Series:
    """One series of a sweep (a model, scaling and target set; an alpha when it does not follow the
    rank) compared over its ranks: the table's lines, each candidate rank's validation estimate, and
    the choice (None when no rank is a candidate)."""

    name: str
    lines: list[dict[str, object]]
    estimates: dict[int, S.Estimate]
    choice: S.Choice | None


def model_names(models: Sequence[str]) -> dict[str, str]:
    """How a summary names each model: a local directory (keyed by its absolute path in the CSV) by
    its last folder names, as few as tell the sweep's models apart; a registry name or hub id as is."""
    from .models import ALIASES, MODELS

    local = [m for m in dict.fromkeys(models) if Path(m).is_absolute()]
    names = {m: m for m in models}
    parts = {m: Path(m).parts[1:] for m in local}  # without the root: /a/b is a, b
    taken = {*MODELS, *ALIASES, *(m for m in models if m not in parts)}  # a registry name stays the registry's
    for depth in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        tails = {m: "/".join(parts[m][-depth:]) for m in local if names[m] == m}
        for m, tail in tails.items():
            if list(tails.values()).count(tail) == 1 and tail not in taken and tail not in names.values():
                names[m] = tail
    return names


def as_shown(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """`rows` with each model as a summary names it (`model_names`)."""
    names = model_names([r["model"] for r in rows])
    return [{**r, "model": names[r["model"]]} for r in rows]


def compare_ranks(rows: Sequence[dict[str, str]], task: str) -> list[Series]:
    """Every series of `rows` with its ranks compared (see `summarize`); local models named as
    `model_names` says."""
    rows = as_shown(rows)
    chosen, reported, higher = metric_for(task)
    columns, varied = series_columns(rows)
    groups: dict[tuple, dict[int, list[dict[str, str]]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in columns), {}).setdefault(int(r["rank"]), []).append(r)
    out = []
    for by_rank in groups.values():
        lines, estimates = [], {}
        for rank in sorted(by_rank):
            runs = [r for r in by_rank[rank] if r["status"] == "ok"]
            if not runs:
                continue
            line, estimate = _summary_line(runs, len(by_rank[rank]) - len(runs), varied, task)
            lines.append(line)
            if estimate is not None and not line["failed"]:
                estimates[rank] = estimate
        costs = {line["rank"]: line["trainable_params"] for line in lines}
        front = S.pareto_front({r: e.mean for r, e in estimates.items()}, costs, higher)
        choice = S.choose(estimates, costs, higher) if estimates else None
        for line in lines:
            line["pareto"] = "yes" if line["rank"] in front else ""
            marks = [
                m
                for m, r in (("best", choice.best), ("recommended", choice.recommended))
                if choice and r == line["rank"]
            ]
            line["pick"] = ", ".join(marks)
        name = series_name(next(iter(by_rank.values()))[0], varied)
        out.append(Series(name, lines, estimates, choice))
    return out


def summarize(rows: Sequence[dict[str, str]], task: str) -> tuple[list[dict[str, object]], list[str]]:
    """One line per (series, rank): the validation metric's mean over the seeds that finished, its
    standard error and 95% interval (`lora_lab.stats`), the test metric, the costs, and marks: the
    Pareto front (no rank with fewer trainable parameters and as good a mean), the best rank on the
    metric alone, the recommended rank (the cheapest the data cannot tell from the best), and flags
    (a run that predicts one class only, a mean no better than the baseline). Ranks where a seed
    failed are not candidates. Returns the table and one paragraph per series saying why."""
    chosen = metric_for(task)[0]
    table, paragraphs = [], []
    for series in compare_ranks(rows, task):
        table += series.lines
        if series.choice is not None:
            some_failed = len(series.estimates) < len(series.lines)
            paragraphs.append(_why(series.lines, series.estimates, series.choice, chosen, some_failed))
        else:
            paragraphs.append(f"{series.name}: no rank to recommend (every rank lost a seed or has no {chosen})")
    ranked = [s for s in compare_ranks(rows, task) if s.choice is not None]
    if len(ranked) > 1:
        paragraphs.append(_best_series(ranked, chosen, metric_for(task)[2]))
    return table, paragraphs


def _best_series(series: Sequence[Series], chosen: str, higher: bool) -> str:
    """Which series is best at its best rank, and whether the runner-up can be told from it."""
    tops = sorted(
        ((s.estimates[s.choice.best], s.choice.best, s.name) for s in series), key=lambda t: t[0].mean, reverse=higher
    )
    (first, r1, name1), (second, r2, name2) = tops[0], tops[1]
    lead, se = abs(first.mean - second.mean), S.difference_se(first, second)
    verdict = (
        "larger than its standard error of {se}"
        if lead > se
        else "within its standard error of {se}: the data cannot tell them apart"
    ).format(se=_gap(se, chosen))
    return (
        f"Best series: **{name1}** at r={r1} ({chosen} {_show(first.mean, chosen)}); the next, {name2} at r={r2} "
        f"({_show(second.mean, chosen)}), is {_gap(lead, chosen)} behind, {verdict}."
    )


def _data_se(row: dict[str, str], chosen: str) -> float:
    """One run's standard error from its validation set: binomial for an accuracy, the loss's own."""
    if chosen == "val_accuracy":
        n = _float(row.get("val_scored", ""))
        return S.binomial_se(float(row[chosen]), int(n)) if n else math.nan
    se = _float(row.get("final_val_loss_se", ""))
    return se if se is not None else math.nan


def _summary_line(runs: list[dict[str, str]], failed: int, varied: Sequence[str], task: str):
    """A rank's line of the table, and its validation estimate (None when no run has the metric)."""
    chosen, reported, higher = metric_for(task)
    estimate = _estimate(runs, chosen)
    shown = [_float(r.get(reported, "")) for r in runs if _float(r.get(reported, "")) is not None]
    line: dict[str, object] = {
        "series": series_name(runs[0], varied),
        "rank": int(runs[0]["rank"]),
        "alpha": runs[0]["alpha"] if len({r["alpha"] for r in runs}) == 1 else "mixed",
        "seeds": len(runs),
        "failed": failed,
        "trainable_params": int(runs[0]["trainable_params"]),
        chosen: estimate.mean if estimate else math.nan,
        f"{chosen}_se": estimate.se if estimate else math.nan,
        "ci95_low": estimate.low if estimate else math.nan,
        "ci95_high": estimate.high if estimate else math.nan,
        reported: statistics.fmean(shown) if shown else math.nan,
    }
    if Task(task).classifies:
        line["test_f1"] = statistics.fmean(float(r["test_f1"]) for r in runs)
    line["seconds"] = statistics.fmean(float(r["seconds"]) for r in runs)
    line["peak_memory_mib"] = max(float(r["peak_memory_mib"]) for r in runs)
    baselines = [float(r["val_baseline"]) for r in runs if r.get("val_baseline") not in ("", None)]
    line["baseline"] = statistics.fmean(baselines) if baselines else math.nan  # of this model: its own
    line["flags"] = _flags(runs, estimate, line["baseline"], higher)
    return line, estimate


def _estimate(runs: list[dict[str, str]], chosen: str) -> S.Estimate | None:
    """A rank's validation metric over the seeds that have it, with the validation set's noise."""
    scored = [r for r in runs if _float(r.get(chosen, "")) is not None and math.isfinite(float(r[chosen]))]
    if not scored:
        return None
    known = [x for x in (_data_se(r, chosen) for r in scored) if not math.isnan(x)]
    bounds = (0.0, 1.0) if chosen == "val_accuracy" else (0.0, math.inf)
    return S.estimate(
        {r["seed"]: float(r[chosen]) for r in scored}, statistics.fmean(known) if known else math.nan, bounds
    )


def _flags(runs: list[dict[str, str]], estimate: S.Estimate | None, baseline: float, higher: bool) -> str:
    """What makes a rank's figure weak: a run that predicts a single class; a mean no better than the
    baseline (always the most common class, or the untrained model's loss)."""
    flags = []
    one_class = [r["seed"] for r in runs if r.get("val_classes_predicted") == "1"]
    if one_class:
        flags.append(f"predicts one class (seed {', '.join(one_class)})")
    if estimate is not None and not math.isnan(baseline):
        if (estimate.mean <= baseline) if higher else (estimate.mean >= baseline):
            flags.append("no better than the baseline")
    return "; ".join(flags)


def _show(value: float, chosen: str) -> str:
    return f"{100 * value:.2f}%" if chosen.endswith("accuracy") else f"{value:.4f}"


def _gap(value: float, chosen: str) -> str:
    return f"{100 * value:.2f} points" if chosen.endswith("accuracy") else f"{value:.4f}"


def _why(lines: list[dict], estimates: dict[int, S.Estimate], choice: S.Choice, chosen: str, some_failed: bool) -> str:
    """The recommended rank of one series with its reason in a sentence, the best on the metric
    alone beside it, and the baseline."""
    by_rank = {line["rank"]: line for line in lines}
    rec, best = estimates[choice.recommended], estimates[choice.best]
    name = by_rank[choice.recommended]["series"]
    noise = "noise unknown" if math.isnan(rec.se) else (
        f"± {_gap(rec.se, chosen)}, 95% interval {_show(rec.low, chosen)} to {_show(rec.high, chosen)}")  # fmt: skip
    head = f"{name}: recommended rank **r={choice.recommended}** ({chosen} {_show(rec.mean, chosen)}, {noise})"
    how = S.difference_basis(rec, best)
    if choice.recommended == choice.best:
        others = [f"r={r}" for r in choice.tied if r != choice.best]
        why = (
            f"the best mean; {', '.join(others)} cannot be told from it but cost more"
            if others
            else "the best mean, and no cheaper rank comes within one standard error of it"
        )
        text = f"{head}: {why}."
    else:
        ratio = by_rank[choice.best]["trainable_params"] / by_rank[choice.recommended]["trainable_params"]
        text = (
            f"{head}: {_gap(choice.lead, chosen)} behind the best, r={choice.best} ({_show(best.mean, chosen)}), "
            f"whose lead is smaller than its {_gap(choice.lead_se, chosen)} standard error"
            + (f" ({how})" if how else "")
            + f"; {ratio:.3g}x fewer trainable parameters. "
            f"The metric alone would pick r={choice.best}."
        )
    if some_failed:
        text += " Ranks where a seed failed are not candidates."
    if any(math.isnan(e.data_se) for e in estimates.values()):
        text += (
            " The validation set's own noise is unknown for rows written before lora_lab recorded it (no val_scored "
            "or final_val_loss_se): with one seed those ranks show no error bar, so train them again to compare."
        )
    baseline = _baseline_text(lines, chosen)
    if baseline:
        text += " " + baseline
    flagged = [f"r={line['rank']} ({line['flags']})" for line in lines if line["flags"]]
    if flagged:
        text += f" Weak: {'; '.join(flagged)}."
    return text


def write_summary(out: Path, rows: Sequence[dict[str, str]], task: str) -> None:
    """DIR/summary.md (the recommendation and its reason, the table with intervals, failed points)
    and DIR/sweep.png."""
    table, paragraphs = summarize(rows, task)
    failed = [r for r in as_shown(rows) if r["status"] != "ok"]
    chosen, reported, _ = metric_for(task)
    positive = sorted({r.get("positive_class", "") for r in rows if r.get("positive_class")})
    unit = "example" if Task(task).classifies else "response token"
    text = [
        f"# Rank sweep: {len(rows)} points",
        "",
        f"Ranks are compared on the validation `{chosen}` (the test set is reported, never used to choose). The "
        "recommended rank is the one with the fewest trainable parameters whose mean is behind the best by no more "
        "than one standard error of the difference (from the seeds' paired differences when every rank has the same "
        "seeds, never below the validation sets' own noise taken as independent); means equal to 1e-9 tie and go "
        "to fewer parameters. `se`: the larger of the seeds' standard error of the mean and one run's validation "
        "noise (binomial, or the loss's over its items). `95% interval`: the wider of mean ± t(seeds - 1) x the "
        "seeds' standard error and mean ± 1.96 x the validation noise. `pareto`: no rank is both cheaper and better. "
        f"Losses: unweighted mean cross-entropy per {unit}. `seconds`: training time per point, the mean over seeds; "
        "`peak_memory_mib`: the largest over seeds.",
        "",
        *[f"- {p}" for p in paragraphs],
        "",
        markdown_table(_display(table, chosen, reported, positive), {"alpha": 1}) if table else "(no point finished)",
        "",
    ]
    if failed:
        text += ["Points that failed (no metrics):", ""]
        text += [f"- {r['model']} r={r['rank']} alpha={r['alpha']} {r['scaling']} {r['targets']} seed {r['seed']}: "
                 f"{r['status']}" for r in failed]  # fmt: skip
        text += [""]
    if table:
        plot_sweep(table, out / PLOT, chosen, reported)
        text += [f"![sweep]({PLOT})", ""]
    write_text(out / SUMMARY, "\n".join(text))


def _baseline_text(lines: Sequence[dict], chosen: str) -> str:
    """The series' baseline in words (its model's: the untrained loss differs between models)."""
    values = [line["baseline"] for line in lines if not math.isnan(line["baseline"])]
    if not values:
        return ""
    value = statistics.fmean(values)
    if chosen.endswith("accuracy"):
        return f"Baseline: always answering the most common training class scores {100 * value:.2f}% on validation."
    return f"Baseline: the untrained model's validation loss is {value:.4f}."


def _display(table: list[dict], chosen: str, reported: str, positive: list[str]) -> list[dict]:
    """The table as summary.md shows it: the interval in one column, accuracies in percent."""
    percent = chosen.endswith("accuracy")
    shown = []
    for line in table:
        row = {}
        for k, v in line.items():
            if k in ("ci95_low", "ci95_high", "baseline"):
                continue
            if k == f"{chosen}_se":
                row["se (points)" if percent else "se"] = (100 * v if percent else v) if not math.isnan(v) else "-"
                low, high = line["ci95_low"], line["ci95_high"]
                row["95% interval"] = (
                    "-"
                    if math.isnan(low)
                    else (f"{100 * low:.2f} to {100 * high:.2f}" if percent else f"{low:.4f} to {high:.4f}")
                )
                continue
            if k in (chosen, reported) and percent and isinstance(v, float):
                row[f"{k} (%)"] = 100 * v
                continue
            if k == "test_f1" and positive:
                row[f"test_f1 ({'/'.join(positive)})"] = v
                continue
            row[k] = v
        shown.append(row)
    return shown
