"""What the adapters of a sweep learned: the spectrum of each update dW = scaling * B A, and how
much the ranks agree (the LoRA paper, Hu et al. 2021, section 7).

Spectrum of one dW (out x in, rank <= r), from its singular values s_1 >= s_2 >= ...:
- effective rank: exp(H(p)) with p_k = s_k / sum(s), H the Shannon entropy (Roy & Vetterli 2007);
  1 when one direction holds everything, r when all r are equal;
- stable rank: sum(s^2) / s_1^2;
- rank90: the fewest directions that hold 90% of the energy sum(s^2).

Subspace similarity of two adapters of the same module, ranks r1 and r2: with U1 (in x r1) and
U2 (in x r2) the right-singular vectors of A1 and A2 (columns by falling singular value),
    phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j),  1 <= i <= r1, 1 <= j <= r2,
which is 1 when one top subspace holds the other and about max(i, j) / in for random ones. The
same measure over the right-singular vectors of the updates dW1 and dW2 asks whether the two
updates act on the same input directions (A's row space, ordered by what B makes of it).

Chance: for unrelated random subspaces E[phi(i, j)] = max(i, j) / in, so on a narrow layer or at a
large rank chance alone comes near 1 (phi(1, 48) is about 0.75 at in = 64). A similarity counts only
above its chance level c, as the share of the way from chance to 1: (phi - c) / (1 - c), 0 for a
random pair and 1 for a subspace held whole; where c = 1 (R >= in) nothing can be told from chance.

A recommended rank: among the ranks the sweep's summary cannot tell from the best (the one-standard-
error rule, `lora_lab.stats`), cheapest first, the first whose top update direction every larger rank
holds well above chance (mean over modules of (phi_dW(1, R) - R/in) / (1 - R/in) >= 0.5 for every
larger rank R); when none does, the cheapest of them: the metric alone decides.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import ADAPTER_FILE
from .files import write_csv
from .updates import update_factors

SHARED = 0.5  # above chance by this share of the way to 1: a shared direction (the paper reads phi > 0.5)


def chance_level(i: int, j: int, width: int) -> float:
    """E[phi(i, j)] for two unrelated random subspaces of an input of `width` dimensions."""
    return min(max(i, j) / width, 1.0)


def above_chance(phi: float, chance: float) -> float:
    """How far `phi` is above its chance level, as a share of the way from chance to 1 (0 when
    chance is 1: nothing can be told)."""
    return (phi - chance) / (1 - chance) if chance < 1 else 0.0


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one dW and what they say about its rank."""

    singular_values: list[float]
    effective_rank: float
    stable_rank: float
    rank90: int


def update_spectrum(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> Spectrum:
    """The spectrum of dW = scaling * B A (B: out x r, A: r x in), without forming dW: its singular
    values are those of the r x r matrix R_B R_A^T from the QR factors of B and A^T."""
    A, B = A.detach().double(), B.detach().double()
    r_b = torch.linalg.qr(B, mode="r").R  # (r, r)
    r_a = torch.linalg.qr(A.T, mode="r").R  # (r, r)
    s = torch.linalg.svdvals(scaling * r_b @ r_a.T)
    return spectrum_of(s)


def spectrum_of(s: torch.Tensor) -> Spectrum:
    s = s.clamp_min(0)
    if float(s.sum()) == 0.0:  # an adapter that never trained (B = 0)
        return Spectrum([0.0] * len(s), 0.0, 0.0, 0)
    p = s / s.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    energy = (s**2).cumsum(0) / (s**2).sum()
    rank90 = int((energy < 0.9 - 1e-12).sum()) + 1
    return Spectrum([float(v) for v in s], math.exp(entropy), float((s**2).sum() / s[0] ** 2), rank90)


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """(in, r): the right-singular vectors of A (r x in), by falling singular value."""
    return torch.linalg.svd(A.detach().double(), full_matrices=False).Vh.T


def update_right_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(in, r): the right-singular vectors of dW = B A, by falling singular value: the input
    directions the update acts on (A's row space, ordered by what B makes of it)."""
    q_a, r_a = torch.linalg.qr(A.detach().double().T)  # A^T = Q_A R_A, Q_A: (in, r)
    _, _, vh = torch.linalg.svd(B.detach().double() @ r_a.T, full_matrices=False)  # B A = (B R_A^T) Q_A^T
    return q_a @ vh.T


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for 1 <= i <= r1, 1 <= j <= r2 as an (r1, r2) tensor (entry [i-1, j-1]), between
    two sets of orthonormal columns (in, r1) and (in, r2), best first: `right_singular_vectors` of
    two A matrices (the paper), or `update_right_vectors` of two updates."""
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"subspaces of different input widths ({U1.shape[0]} and {U2.shape[0]}): not one module")
    u1, u2 = U1.double(), U2.double()
    overlap = (u1.T @ u2) ** 2  # (r1, r2): squared cosines between single directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1]: ||U1_i^T U2_j||_F^2
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


# ---- a sweep's adapters --------------------------------------------------------------------------


def module_kind(name: str) -> tuple[str, int | None]:
    """(module type, layer index): 'bert.encoder.layer.3.attention.self.query' -> ('attention.self.query', 3)."""
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    if not match:
        return name, None
    return name[match.end() :], int(match[1])


def spectra_rows(runs: Sequence[tuple[dict[str, str], dict]]) -> list[dict[str, object]]:
    """One row per (sweep point, module): the spectrum of its dW."""
    rows = []
    for point, adapter in runs:
        for name, (A, B, scaling) in adapter.items():
            kind, layer = module_kind(name)
            spec = update_spectrum(A, B, scaling)
            rows.append(
                {
                    **{k: point[k] for k in ("model", "rank", "alpha", "scaling", "targets", "seed")},
                    "module": name,
                    "type": kind,
                    "layer": "" if layer is None else layer,
                    "effective_rank": round(spec.effective_rank, 4),
                    "stable_rank": round(spec.stable_rank, 4),
                    "rank90": spec.rank90,
                    "top_singular_value": round(spec.singular_values[0], 6),
                    "frobenius_norm": round(math.sqrt(sum(v * v for v in spec.singular_values)), 6),
                }
            )
    return rows


def similarity_rows(by_rank: dict[int, dict]) -> tuple[list[dict[str, object]], dict]:
    """For every pair of ranks r1 < r2 and every module both adapted, over A (the paper) and over dW:
    phi(1, 1), phi(r1, r2) (how much of r1's whole subspace lies in r2's), for dW also phi(1, r2)
    (r1's top direction inside r2's subspace) with its chance level r2 / in and how far above it it
    is, and the shared directions (the largest i with phi_dW(i, i) above chance by half the way to 1).
    Also returns the A matrices phi(i, j) for the heatmaps."""
    rows, matrices = [], {}
    ranks = sorted(by_rank)
    for a, r1 in enumerate(ranks):
        for r2 in ranks[a + 1 :]:
            for name in sorted(set(by_rank[r1]) & set(by_rank[r2])):
                (a1, b1, _), (a2, b2, _) = by_rank[r1][name], by_rank[r2][name]
                width = a1.shape[1]
                phi = subspace_similarity(right_singular_vectors(a1), right_singular_vectors(a2))
                phi_dw = subspace_similarity(update_right_vectors(a1, b1), update_right_vectors(a2, b2))
                matrices[(r1, r2, name)] = phi
                diagonal = torch.diagonal(phi_dw).tolist()
                shared = [i for i, v in enumerate(diagonal, 1) if above_chance(v, chance_level(i, i, width)) > SHARED]
                # dW of rank r2 has at most min(r2, in, out) directions: phi(1, j) and its chance at that j
                chance = chance_level(1, phi_dw.shape[1], width)
                kind, layer = module_kind(name)
                rows.append({
                    "rank_a": r1, "rank_b": r2, "module": name, "type": kind, "layer": "" if layer is None else layer,
                    "in_features": width,
                    "phi_A_top": round(float(phi[0, 0]), 4), "phi_A_all": round(float(phi[-1, -1]), 4),
                    "phi_dW_top": round(float(phi_dw[0, 0]), 4), "phi_dW_top_in_b": round(float(phi_dw[0, -1]), 4),
                    "chance_top_in_b": round(chance, 4),
                    # empty where chance is 1: a subspace that spans the whole input says nothing
                    "above_chance_top_in_b": round(above_chance(float(phi_dw[0, -1]), chance), 4) if chance < 1 else "",
                    "phi_dW_all": round(float(phi_dw[-1, -1]), 4),
                    "shared_directions": max(shared, default=0),
                })  # fmt: skip
    return rows, matrices


def recommend(candidates: Sequence[int], sim_rows: Sequence[dict], metric_reason: str) -> tuple[int, str]:
    """The first of `candidates` (ranks the data cannot tell from the best, cheapest first) whose top
    update direction every larger rank holds well above chance (mean over modules of
    above_chance_top_in_b >= 0.5); else the first candidate. Returns the rank and why, in words."""

    def held_by_larger(r: int) -> dict[int, float]:
        """Mean over modules of how far above chance rank R holds r's top direction, for every larger R
        where some module can tell (chance below 1)."""
        told: dict[int, list[float]] = {}
        for x in sim_rows:
            if int(x["rank_a"]) == r and x["above_chance_top_in_b"] not in ("", None):
                told.setdefault(int(x["rank_b"]), []).append(float(x["above_chance_top_in_b"]))
        return {R: statistics.fmean(v) for R, v in sorted(told.items())}

    def listed(held: dict[int, float]) -> str:
        return ", ".join(f"r={R} {v:.2f}" for R, v in held.items()) or "no larger rank"

    for r in candidates:
        held = held_by_larger(r)
        if held and all(v >= SHARED for v in held.values()):
            return r, (
                f"r={r}: {metric_reason}; every larger rank's update holds its top direction well above chance "
                f"(mean (phi_dW(1, R) - R/in) / (1 - R/in): {listed(held)})"
            )
    r = candidates[0]
    return r, (
        f"r={r}: {metric_reason}. No candidate's top direction is held by every larger rank above chance "
        f"(r={r}: {listed(held_by_larger(r))}; {SHARED} would be), so the metric alone decides"
    )


@dataclass
class Collected:
    """What a sweep's adapters say, before any choice: spectra and similarity rows (every series and
    seed), the A matrices' phi(i, j) of the pairs drawn, and the figures' names."""

    spectra: list[dict] = field(default_factory=list)
    sims: list[dict] = field(default_factory=list)
    heatmaps: list[tuple[Path, dict, int, int, str]] = field(default_factory=list)


def analyze_sweep(out: str | Path) -> dict[str, int]:
    """Spectra and subspace similarities of every adapter a finished sweep saved, per series (model,
    scaling, targets), and the recommended rank: written as DIR/analysis_spectra.csv,
    DIR/analysis_similarity.csv, DIR/analysis.md and figures; returns the recommendations."""
    out = Path(out)
    every, task = _read_sweep(out)
    collected = collect(out, every, task)
    recommendations, lines = recommend_ranks(every, task, collected.sims)
    write_analysis(out, collected, lines)
    return recommendations


def _read_sweep(out: Path) -> tuple[list[dict[str, str]], str]:
    """The rows of a sweep directory and its task, or an error that says what is missing."""
    import json

    from .config import TrainConfig
    from .sweep import CSV_NAME, SETTINGS, read_rows

    if not (out / CSV_NAME).is_file() or not (out / SETTINGS).is_file():
        raise FileNotFoundError(f"{out} is not a lora-lab sweep directory (no {CSV_NAME} and {SETTINGS} in it)")
    every = read_rows(out)
    rows = [r for r in every if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"no point of {out} finished ({len(every)} failed): nothing to analyze")
    for r in rows:
        if not (out / r["run"] / ADAPTER_FILE).is_file():
            raise FileNotFoundError(
                f"{out / r['run']} (rank {r['rank']}, seed {r['seed']}) holds no adapter, though {CSV_NAME} lists "
                "it: delete its row and run the sweep again to train it anew"
            )
    task = TrainConfig(dataset=json.loads((out / SETTINGS).read_text())["dataset"]).task()
    return every, task


def collect(out: Path, every: Sequence[dict[str, str]], task: str = "classification") -> Collected:
    """Read every finished point's adapter; spectra per module, similarities between the ranks of
    each series and seed. DoRA's adapters are read with their base model's weights (loaded once a
    model), so their update includes the magnitudes' rescaling."""
    from .report import series_columns, series_name

    rows = [r for r in every if r["status"] == "ok"]
    bases: dict[str, torch.nn.Module] = {}

    def base_of(row: dict[str, str]) -> torch.nn.Module | None:
        if row.get("variant") != "dora":
            return None
        if row["model"] not in bases:
            from .models import load_pretrained

            bases[row["model"]] = load_pretrained(row["model"], task).model
        return bases[row["model"]]

    columns, varied = series_columns(every)
    several_seeds = len({r["seed"] for r in rows}) > 1
    collected = Collected()
    for key in dict.fromkeys(tuple(r[k] for k in columns) for r in rows):
        series = [r for r in rows if tuple(r[k] for k in columns) == key]
        name = series_name(series[0], varied)
        adapters = {id(r): update_factors(out / r["run"] / ADAPTER_FILE, base_of(r)) for r in series}
        collected.spectra += [{"series": name, **row} for row in spectra_rows([(r, adapters[id(r)]) for r in series])]
        for seed in dict.fromkeys(r["seed"] for r in series):
            by_rank = {int(r["rank"]): adapters[id(r)] for r in series if r["seed"] == seed}
            seed_rows, matrices = similarity_rows(by_rank)
            collected.sims += [{"series": name, "seed": seed, **row} for row in seed_rows]
            suffix = ("_" + re.sub(r"[^A-Za-z0-9]+", "-", name) if varied else "") + (
                f"_seed{seed}" if several_seeds else "")  # fmt: skip
            collected.heatmaps += _heatmaps(out, sorted(by_rank), matrices, suffix, f"{name}, seed {seed}")
    return collected


def _heatmaps(out: Path, ranks: list[int], matrices: dict, suffix: str, title: str) -> list[tuple]:
    """The similarity figures of one series and seed: smallest against largest rank, and 8 against 64."""
    pairs = {(ranks[0], ranks[-1])} | ({(8, 64)} if {8, 64} <= set(ranks) else set())
    drawn = []
    for r1, r2 in sorted(p for p in pairs if p[0] != p[1]):
        cells = {module_kind(k[2]): v for k, v in matrices.items() if k[:2] == (r1, r2)}
        drawn.append((out / f"analysis_similarity_r{r1}_r{r2}{suffix}.png", cells, r1, r2, title))
    return drawn


def recommend_ranks(
    every: Sequence[dict[str, str]], task: str, sims: Sequence[dict]
) -> tuple[dict[str, int], list[str]]:
    """Per series: the candidates the summary's one-standard-error rule leaves (`report.compare_ranks`),
    then `recommend` over the similarities. Returns {series: rank} and a line per series."""
    from .report import compare_ranks, metric_for

    chosen = metric_for(task)[0]
    recommendations, lines = {}, []
    for series in compare_ranks(every, task):
        if series.choice is None:
            lines.append(f"- {series.name}: no rank to recommend (every rank lost a seed or has no validation metric).")
            continue
        choice, estimates = series.choice, series.estimates
        best = estimates[choice.best]
        tied = ", ".join(f"r={r}" for r in choice.tied)
        reason = (
            f"the ranks the data cannot tell from the best on {chosen} (r={choice.best}, {best.mean:.4f}; within one "
            f"standard error of the difference) are {tied}"
        )
        rank, why = recommend(list(choice.tied), [s for s in sims if s["series"] == series.name], reason)
        recommendations[series.name] = rank
        lines.append(f"- {series.name}: recommended rank **r={rank}**. {why}.")
    return recommendations, lines


def write_analysis(out: Path, collected: Collected, lines: Sequence[str]) -> None:
    """The CSVs, the figures and DIR/analysis.md."""
    from .files import write_text
    from .plots import plot_similarity, plot_spectra
    from .report import markdown_table

    spectra_path, sims_path = out / "analysis_spectra.csv", out / "analysis_similarity.csv"
    write_csv(spectra_path, collected.spectra)
    write_csv(sims_path, collected.sims, SIMILARITY_COLUMNS)
    plot_spectra(collected.spectra, out / "analysis_spectra.png")
    for path, matrices, r1, r2, title in collected.heatmaps:
        plot_similarity(matrices, r1, r2, path, title)
    figures = [path.name for path, *_ in collected.heatmaps]
    text = [
        "# What the adapters learned", "",
        *lines, "",
        "Effective rank of dW = scaling * B A (exp of the entropy of its normalised singular values), mean over "
        "layers, per module type and LoRA rank:", "",
        markdown_table(_effective_rank_table(collected.spectra)), "",
        "Subspace similarity between ranks (LoRA paper, section 7), mean over modules, over the right-singular "
        "vectors of A (phi_A, as the paper) and of the update dW = B A (phi_dW): _top = phi(1, 1), _all = "
        "phi(r_a, r_b), phi_dW_top_in_b = phi_dW(1, r_b) (rank a's top direction inside rank b's update). "
        "Unrelated random subspaces give phi(i, j) = max(i, j) / in on average: chance_top_in_b = r_b / in is that "
        "level, above_chance_top_in_b = (phi - chance) / (1 - chance) how far above it (0: chance, 1: held "
        f"whole). shared = directions i whose phi_dW(i, i) is above chance by more than {SHARED} of the way.", "",
        markdown_table(_similarity_table(collected.sims)), "",
        f"Files: {spectra_path.name}, {sims_path.name}, analysis_spectra.png" + "".join(f", {f}" for f in figures)
        + ("" if figures else " (one rank: no similarity to draw)"), "",
    ]  # fmt: skip
    write_text(out / "analysis.md", "\n".join(text))


SIMILARITY_COLUMNS = ["series", "seed", "rank_a", "rank_b", "module", "type", "layer", "in_features", "phi_A_top",
                      "phi_A_all", "phi_dW_top", "phi_dW_top_in_b", "chance_top_in_b", "above_chance_top_in_b",
                      "phi_dW_all", "shared_directions"]  # fmt: skip


def _effective_rank_table(spectra: Sequence[dict]) -> list[dict[str, object]]:
    """Mean effective rank per (series, module type, rank): over layers, and over seeds when there are several."""
    groups: dict[tuple, list[float]] = {}
    for row in spectra:
        groups.setdefault((row["series"], row["type"], int(row["rank"])), []).append(float(row["effective_rank"]))
    return [
        {"series": m, "type": t, "rank": r, "effective_rank": round(statistics.fmean(v), 3), "modules": len(v)}
        for (m, t, r), v in groups.items()
    ]


def _similarity_table(sims: Sequence[dict]) -> list[dict[str, object]]:
    groups: dict[tuple, list[dict]] = {}
    for row in sims:
        groups.setdefault((row["series"], row["rank_a"], row["rank_b"]), []).append(row)

    def mean(rows: list[dict], key: str) -> float:  # modules where a figure says nothing (chance 1) left out
        values = [float(r[key]) for r in rows if r[key] not in ("", None)]
        return round(statistics.fmean(values), 3) if values else math.nan

    keys = ("phi_A_top", "phi_A_all", "phi_dW_top", "phi_dW_top_in_b", "chance_top_in_b", "above_chance_top_in_b",
            "phi_dW_all", "shared_directions")  # fmt: skip
    return [{"series": s, "rank_a": a, "rank_b": b, **{k: mean(rows, k) for k in keys}}
            for (s, a, b), rows in groups.items()]  # fmt: skip
