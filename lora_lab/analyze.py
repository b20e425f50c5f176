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
updates act on the same input directions. A starts random and moves little in a short run, so
its subspaces stay near random (the paper's adapters trained long on GPT-3); dW's do not.

A recommended rank: the smallest r whose validation metric is within the noise of the best and
whose top update direction the larger ranks share (mean over modules of phi_dW(1, R) >= 0.5 for
every larger rank R).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import read_safetensors, write_csv

SHARED = 0.5  # phi above this: a shared direction (the paper's threshold in its figure 3 discussion)


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


def read_adapter(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, scaling)} of a lora_lab adapter file."""
    import json

    tensors, metadata = read_safetensors(path, "run the sweep again to write it")
    modules = json.loads(metadata.get("lora_lab", "{}")).get("modules", {})
    out = {}
    for name, spec in modules.items():
        scaling = spec["alpha"] / (math.sqrt(spec["rank"]) if spec.get("use_rslora") else spec["rank"])
        out[name] = (tensors[f"{name}.lora.A"], tensors[f"{name}.lora.B"], scaling)
    return out


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
    (r1's top direction inside r2's subspace) and the shared directions (the largest i with
    phi_dW(i, i) > 0.5). Also returns the A matrices phi(i, j) for the heatmaps."""
    rows, matrices = [], {}
    ranks = sorted(by_rank)
    for a, r1 in enumerate(ranks):
        for r2 in ranks[a + 1 :]:
            for name in sorted(set(by_rank[r1]) & set(by_rank[r2])):
                (a1, b1, _), (a2, b2, _) = by_rank[r1][name], by_rank[r2][name]
                phi = subspace_similarity(right_singular_vectors(a1), right_singular_vectors(a2))
                phi_dw = subspace_similarity(update_right_vectors(a1, b1), update_right_vectors(a2, b2))
                matrices[(r1, r2, name)] = phi
                above = (torch.diagonal(phi_dw) > SHARED).nonzero()
                kind, layer = module_kind(name)
                rows.append({
                    "rank_a": r1, "rank_b": r2, "module": name, "type": kind, "layer": "" if layer is None else layer,
                    "phi_A_top": round(float(phi[0, 0]), 4), "phi_A_all": round(float(phi[-1, -1]), 4),
                    "phi_dW_top": round(float(phi_dw[0, 0]), 4), "phi_dW_top_in_b": round(float(phi_dw[0, -1]), 4),
                    "phi_dW_all": round(float(phi_dw[-1, -1]), 4),
                    "shared_directions": int(above.max()) + 1 if len(above) else 0,
                })  # fmt: skip
    return rows, matrices


def recommend(
    metrics: dict[int, list[float]], higher_is_better: bool, noise: float, sim_rows: Sequence[dict]
) -> tuple[int, str]:
    """The smallest rank within `noise` of the best mean metric whose top update direction every larger
    rank shares (mean phi_dW(1, R) over modules >= 0.5). When no rank below the largest candidate
    passes, the ranks learned different directions, and the metric alone decides: the smallest rank
    within the noise. Returns the rank and why, in words."""
    means = {r: statistics.fmean(v) for r, v in metrics.items() if v}
    sign = 1 if higher_is_better else -1
    best = max(means, key=lambda r: (sign * means[r], -r))  # ties: the smaller rank
    close = sorted(r for r, m in means.items() if abs(m - means[best]) <= noise)
    within = f"within the noise ({noise:.4f}) of the best (r={best}, {means[best]:.4f})"

    def shared_by_larger(r: int) -> dict[int, float]:
        larger = sorted({int(x["rank_b"]) for x in sim_rows if int(x["rank_a"]) == r})
        return {
            R: statistics.fmean(float(x["phi_dW_top_in_b"]) for x in sim_rows
                                if (int(x["rank_a"]), int(x["rank_b"])) == (r, R))
            for R in larger
        }  # fmt: skip

    for r in close[:-1]:
        shared = shared_by_larger(r)
        if shared and all(v >= SHARED for v in shared.values()):
            listed = ", ".join(f"r={R} {v:.2f}" for R, v in shared.items())
            return r, (
                f"r={r}: its metric {means[r]:.4f} is {within}, and every larger rank's update holds its top "
                f"direction (mean phi_dW(1, R): {listed})"
            )
    r = close[0]
    if len(close) == 1:
        return r, f"r={r}: the best metric ({means[r]:.4f}); no other rank comes within the noise ({noise:.4f})"
    shared = shared_by_larger(r)
    listed = ", ".join(f"r={R} {v:.2f}" for R, v in shared.items())
    return r, (
        f"r={r}: the smallest rank {within}. The ranks did not learn shared directions (mean phi_dW(1, R) of "
        f"r={r}: {listed}; 0.5 would be shared), so the metric alone decides"
    )


def _noise(rows: Sequence[dict[str, str]], chosen: str, task: str, val_examples: int | None) -> tuple[float, str]:
    """How far apart two ranks' validation metrics may be and still be the same: the spread over seeds
    when there are several; else the binomial standard error of the best accuracy on the validation
    set; for a loss with one seed, 1% of it."""
    by_rank: dict[str, list[float]] = {}
    for r in rows:
        if r[chosen] not in ("", None):
            by_rank.setdefault(r["rank"], []).append(float(r[chosen]))
    spreads = [statistics.stdev(v) for v in by_rank.values() if len(v) > 1]
    if spreads:
        return max(spreads), "the largest standard deviation over seeds"
    values = [v for vs in by_rank.values() for v in vs]
    if task == "classification" and values:
        p, n = max(values), val_examples
        if n:
            return math.sqrt(max(p * (1 - p), 1 / n) / n), f"the binomial standard error of {p:.4f} on {n} examples"
    if task == "classification":
        return 0.01 * max(values or [0.0]), "1% of the best (one seed)"
    return 0.01 * min(values or [0.0]), "1% of the best loss (one seed)"


def analyze_sweep(out: str | Path) -> dict[str, object]:
    """Spectra and subspace similarities of every adapter a finished sweep saved, per series (model,
    scaling, targets), and the recommended rank: written as DIR/analysis_spectra.csv,
    DIR/analysis_similarity.csv, DIR/analysis.md and figures; returns the recommendations."""
    import json

    from .files import write_text
    from .params import markdown_table
    from .plots import plot_similarity, plot_spectra
    from .sweep import metric_for, read_rows, series_columns, series_name

    out = Path(out)
    if not (out / "sweep.csv").is_file() or not (out / "sweep.json").is_file():
        raise FileNotFoundError(f"{out} is not a lora-lab sweep directory (no sweep.csv and sweep.json in it)")
    every = read_rows(out)
    rows = [r for r in every if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"no point of {out} finished ({len(every)} failed): nothing to analyze")
    for r in rows:
        if not (out / r["run"] / "adapter.safetensors").is_file():
            raise FileNotFoundError(
                f"{out / r['run']} (rank {r['rank']}, seed {r['seed']}) holds no adapter, though sweep.csv lists it: "
                "delete its row from sweep.csv and run the sweep again to train it anew"
            )
    settings = json.loads((out / "sweep.json").read_text())
    task = "causal-lm" if settings["dataset"] == "instructions" else "classification"

    chosen, _, higher = metric_for(task)
    columns, varied = series_columns(rows)
    several_seeds = len({r["seed"] for r in rows}) > 1
    all_spectra, all_sims, lines, recommendations, figures = [], [], [], {}, []
    for key in dict.fromkeys(tuple(r[k] for k in columns) for r in rows):
        series = [r for r in rows if tuple(r[k] for k in columns) == key]
        name = series_name(series[0], varied)
        adapters = {id(r): read_adapter(out / r["run"] / "adapter.safetensors") for r in series}
        metrics_file = out / series[0]["run"] / "metrics.json"  # every run of a sweep splits the data alike
        val_examples = json.loads(metrics_file.read_text()).get("val_examples") if metrics_file.is_file() else None
        all_spectra += [{"series": name, **row} for row in spectra_rows([(r, adapters[id(r)]) for r in series])]
        sims = []
        for seed in dict.fromkeys(r["seed"] for r in series):
            by_rank = {int(r["rank"]): adapters[id(r)] for r in series if r["seed"] == seed}
            seed_rows, matrices = similarity_rows(by_rank)
            sims += [{"series": name, "seed": seed, **row} for row in seed_rows]
            ranks = sorted(by_rank)
            pairs = {(ranks[0], ranks[-1])} | ({(8, 64)} if {8, 64} <= set(ranks) else set())
            for r1, r2 in sorted(p for p in pairs if p[0] != p[1]):
                suffix = ("_" + re.sub(r"[^A-Za-z0-9]+", "-", name) if varied else "") + (
                    f"_seed{seed}" if several_seeds else "")  # fmt: skip
                figures.append(out / f"analysis_similarity_r{r1}_r{r2}{suffix}.png")
                plot_similarity(matrices, r1, r2, figures[-1], f"{name}, seed {seed}")
        all_sims += sims
        # as in the summary, a rank where a seed failed is no candidate
        failed = {r["rank"] for r in every if r["status"] != "ok" and tuple(r[k] for k in columns) == key}
        metrics = {}
        for r in series:
            if r[chosen] not in ("", None) and r["rank"] not in failed:
                metrics.setdefault(int(r["rank"]), []).append(float(r[chosen]))
        if not metrics:
            lines.append(f"- {name}: no rank to recommend (every rank lost a seed or has no validation metric).")
            continue
        noise, noise_why = _noise(series, chosen, task, val_examples)
        rank, why = recommend(metrics, higher, noise, [s for s in sims if s["seed"] == series[0]["seed"]])
        recommendations[name] = rank
        lines.append(f"- {name}: recommended rank **r={rank}**. {why}; noise: {noise_why}.")
    spectra_path, sims_path = out / "analysis_spectra.csv", out / "analysis_similarity.csv"
    write_csv(spectra_path, all_spectra)
    write_csv(sims_path, all_sims, SIMILARITY_COLUMNS)
    plot_spectra(all_spectra, out / "analysis_spectra.png")
    table = _effective_rank_table(all_spectra)
    pairs = _similarity_table(all_sims)
    text = [
        "# What the adapters learned", "",
        *lines, "",
        "Effective rank of dW = scaling * B A (exp of the entropy of its normalised singular values), mean over "
        "layers, per module type and LoRA rank:", "",
        markdown_table(table), "",
        "Subspace similarity between ranks (LoRA paper, section 7), mean over modules, over the right-singular "
        "vectors of A (phi_A, as the paper) and of the update dW = B A (phi_dW): _top = phi(1, 1), _all = "
        "phi(r_a, r_b), phi_dW_top_in_b = phi_dW(1, r_b) (rank a's top direction inside rank b's update), "
        f"shared = directions i with phi_dW(i, i) > {SHARED}. Random subspaces give about r_b / in.", "",
        markdown_table(pairs), "",
        f"Files: {spectra_path.name}, {sims_path.name}, analysis_spectra.png"
        + "".join(f", {f.name}" for f in figures) + ("" if figures else " (one rank: no similarity to draw)"), "",
    ]  # fmt: skip
    write_text(out / "analysis.md", "\n".join(text))
    return recommendations


SIMILARITY_COLUMNS = ["series", "seed", "rank_a", "rank_b", "module", "type", "layer", "phi_A_top", "phi_A_all",
                      "phi_dW_top", "phi_dW_top_in_b", "phi_dW_all", "shared_directions"]  # fmt: skip


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
    out = []
    for (series, a, b), rows in groups.items():
        out.append({"series": series, "rank_a": a, "rank_b": b,
                    **{k: round(statistics.fmean(float(r[k]) for r in rows), 3)
                       for k in ("phi_A_top", "phi_A_all", "phi_dW_top", "phi_dW_top_in_b", "phi_dW_all",
                                 "shared_directions")}})  # fmt: skip
    return out
