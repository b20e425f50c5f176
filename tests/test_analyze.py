import math

import pytest
import torch
from conftest import tiny_model

from lora_lab import inject_lora, mark_only_lora_trainable, save_adapter
from lora_lab.analyze import (
    recommend,
    right_singular_vectors,
    similarity_rows,
    spectrum_of,
    subspace_similarity,
    update_right_vectors,
    update_spectrum,
)
from lora_lab.lora import lora_modules
from lora_lab.updates import update_factors as read_adapter


def _random_lora(A_shape, B_shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(A_shape, generator=g), torch.randn(B_shape, generator=g)


def test_spectrum_of_the_update_is_that_of_the_dense_product():
    A, B = _random_lora((8, 96), (64, 8), 0)
    spec = update_spectrum(A, B, scaling=0.5)
    dense = torch.linalg.svdvals((0.5 * B @ A).double())[:8]
    torch.testing.assert_close(torch.tensor(spec.singular_values, dtype=torch.float64), dense)
    p = dense / dense.sum()
    assert spec.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert spec.stable_rank == pytest.approx(((dense**2).sum() / dense[0] ** 2).item())


def test_effective_stable_and_90_percent_ranks_in_closed_form():
    flat = spectrum_of(torch.ones(8))  # eight equal directions
    assert flat.effective_rank == pytest.approx(8) and flat.stable_rank == pytest.approx(8) and flat.rank90 == 8
    one = spectrum_of(torch.tensor([3.0, 0, 0, 0]))
    assert one.effective_rank == pytest.approx(1) and one.stable_rank == 1 and one.rank90 == 1
    # energies 9, 4, 1 of 14: the first two hold 92.9%
    assert spectrum_of(torch.tensor([3.0, 2.0, 1.0])).rank90 == 2
    untrained = update_spectrum(torch.randn(4, 16), torch.zeros(8, 4))
    assert untrained.effective_rank == 0 and untrained.rank90 == 0


def test_update_directions_are_the_right_singular_vectors_of_dw():
    A, B = _random_lora((6, 40), (30, 6), 1)
    U = update_right_vectors(A, B)
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))
    Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False).Vh[:6]
    torch.testing.assert_close((U.T @ Vh.T).abs(), torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)


def _saved_adapter(path, seed, rank=8, width=256):
    model = tiny_model(seed, d=width)
    inject_lora(model, ["W_query", "W_key", "W_value", "out_proj"], rank=rank, alpha=2 * rank)
    mark_only_lora_trainable(model)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, w in lora_modules(model):
            w.lora.A.copy_(torch.randn(w.lora.A.shape, generator=g))
            w.lora.B.copy_(torch.randn(w.lora.B.shape, generator=g))
    save_adapter(model, path)
    return read_adapter(path)


def test_similarity_of_saved_adapters_is_one_for_identical_and_near_zero_for_independent(tmp_path):
    same = _saved_adapter(tmp_path / "a.safetensors", seed=0)
    twin = _saved_adapter(tmp_path / "b.safetensors", seed=0)
    rows, matrices = similarity_rows({8: same, 16: twin})  # the same update saved twice, read as two ranks
    assert rows and all(r["phi_A_top"] == r["phi_A_all"] == r["phi_dW_top"] == r["phi_dW_all"] == 1 for r in rows)
    for phi in matrices.values():
        torch.testing.assert_close(phi, torch.ones_like(phi))
    other = _saved_adapter(tmp_path / "c.safetensors", seed=1, rank=64)
    rows, matrices = similarity_rows({8: same, 64: other})
    width = 256
    assert len(rows) == 2 * 4
    for r in rows:  # random subspaces of inputs of width 256: phi(1, 1) ~ 1 / in, phi(8, 64) ~ 64 / in
        assert r["phi_A_top"] < 0.05 and r["phi_dW_top"] < 0.05, r
        assert r["phi_A_all"] == pytest.approx(64 / width, abs=0.06), r
        assert r["shared_directions"] == 0


def test_subspace_similarity_matches_the_paper_definition():
    U1 = right_singular_vectors(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
    U2 = right_singular_vectors(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)))
    phi = subspace_similarity(U1, U2)
    for i in range(1, 5):
        for j in range(1, 7):
            expected = torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
            assert phi[i - 1, j - 1].item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="different input widths"):
        subspace_similarity(U1, torch.eye(16, 2, dtype=torch.float64))


def test_recommended_rank():
    """Among the candidates (cheapest first), the first whose top direction every larger rank holds above
    chance; else the cheapest."""
    sims = [{"rank_a": a, "rank_b": b, "above_chance_top_in_b": v}
            for a, b, v in [(2, 4, 0.9), (2, 8, 0.8), (4, 8, 0.9), (1, 4, 0.1), (1, 8, 0.1)]]  # fmt: skip
    rank, why = recommend([1, 2, 4], sims, "within the noise")
    assert rank == 2 and "every larger rank" in why
    rank, why = recommend([1, 4], [dict(s, above_chance_top_in_b=0.1) for s in sims], "within the noise")
    assert rank == 1 and "metric alone decides" in why
    assert recommend([8], [], "the best")[0] == 8


def test_unrelated_updates_share_nothing_above_chance():
    """Random, unrelated updates of a 64-wide layer at ranks 1, 4 and 48 with equal metrics: phi_dW(1, 48)
    is about 48/64 = 0.75 by chance alone, which passed the old 0.5 threshold and moved the recommendation
    to r=4; measured against chance nothing is shared and r=1 stands."""
    width = 64
    by_rank = {r: {"layer.0.q": (*_random_lora((r, width), (width, r), seed=r), 1.0)} for r in (1, 4, 48)}
    rows, _ = similarity_rows(by_rank)
    pair = next(row for row in rows if (row["rank_a"], row["rank_b"]) == (4, 48))
    assert pair["chance_top_in_b"] == pytest.approx(48 / 64)
    assert pair["phi_dW_top_in_b"] > 0.5  # what chance alone gives
    assert abs(pair["above_chance_top_in_b"]) < 0.5 and pair["in_features"] == width
    rank, why = recommend([1, 4, 48], rows, "equal metrics")
    assert rank == 1 and "metric alone decides" in why
    held = dict(by_rank[4])  # r=48 holding r=4's update exactly: its top direction is held whole
    a4, b4, _ = by_rank[4]["layer.0.q"]
    a48, b48, _ = by_rank[48]["layer.0.q"]
    a48, b48 = a48.clone(), b48.clone()
    a48[:4], b48[:, :4], b48[:, 4:] = a4, b4, 0.0
    rows, _ = similarity_rows({1: by_rank[1], 4: held, 48: {"layer.0.q": (a48, b48, 1.0)}})
    assert next(r for r in rows if (r["rank_a"], r["rank_b"]) == (4, 48))["above_chance_top_in_b"] > 0.99


def test_chance_counts_the_directions_an_update_can_have():
    """An update of rank 48 on a layer 64 in, 16 out has at most 16 directions: its chance level is
    16/64, not 48/64; a rank at the layer's full input width tells nothing (left out, not counted as 0)."""
    by_rank = {r: {"m": (*_random_lora((r, 64), (16, r), seed=r), 1.0)} for r in (1, 48)}
    rows, _ = similarity_rows(by_rank)
    assert rows[0]["chance_top_in_b"] == pytest.approx(16 / 64)
    assert -0.6 < rows[0]["above_chance_top_in_b"] < 0.6  # unrelated: near chance
    full = {r: {"m": (*_random_lora((r, 8), (8, r), seed=r), 1.0)} for r in (1, 8)}
    rows, _ = similarity_rows(full)
    assert rows[0]["chance_top_in_b"] == 1.0 and rows[0]["above_chance_top_in_b"] == ""
    rank, why = recommend([1, 8], rows, "equal metrics")
    assert rank == 1 and "no larger rank" in why


def test_chance_level_is_the_mean_similarity_of_random_subspaces():
    """E[phi(i, j)] = max(i, j) / in for unrelated random subspaces: checked by sampling."""
    from lora_lab.analyze import chance_level

    g = torch.Generator().manual_seed(0)
    width, r1, r2 = 32, 3, 12
    samples = []
    for _ in range(300):
        u1 = torch.linalg.qr(torch.randn(width, r1, generator=g, dtype=torch.float64)).Q
        u2 = torch.linalg.qr(torch.randn(width, r2, generator=g, dtype=torch.float64)).Q
        samples.append(subspace_similarity(u1, u2))
    mean = torch.stack(samples).mean(0)
    for i, j in [(1, 1), (1, 12), (3, 12), (2, 5)]:
        assert float(mean[i - 1, j - 1]) == pytest.approx(chance_level(i, j, width), abs=0.02)
