"""The pure functions behind RIA, SparseSwaps, ALPS and block reconstruction, on hand-built tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.masks import Pattern, is_nm_sparse, keep_mask
from prunekit.methods.alps import alps_prune
from prunekit.methods.blockfit import linear_schedule
from prunekit.methods.lstsq import layer_error, masked_lstsq
from prunekit.methods.nm_permute import kept_score, lsa_refine, permuted_nm_mask, reallocation_order
from prunekit.methods.ria import ria_scores
from prunekit.methods.swaps import sparse_swaps, swap_gain


def _layer(rows=16, cols=32, tokens=512, seed=0):
    """A weight and the Gram matrix of correlated inputs (a few strong features, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 3 + 0.1)
    gram = x.t() @ x
    return torch.randn(rows, cols, generator=g), (gram + gram.t()) / 2, x  # exactly symmetric


# --- RIA ---------------------------------------------------------------------------------------

def test_ria_scores_exact_values_on_a_hand_built_layer():
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -6.0]])
    norm = torch.tensor([1.0, 4.0, 9.0])  # ||X_j||: to the power 0.5 -> 1, 2, 3
    # column sums of |W|: 5, 2, 9; row sums: 6, 10
    expect = torch.tensor([[1 / 5 + 1 / 6, (2 / 2 + 2 / 6) * 2, (3 / 9 + 3 / 6) * 3],
                           [4 / 5 + 4 / 10, 0.0, (6 / 9 + 6 / 10) * 3]])
    assert torch.allclose(ria_scores(w, norm), expect, rtol=1e-6, atol=0)
    assert torch.allclose(ria_scores(w, norm, a=0.0), expect / torch.tensor([1.0, 2.0, 3.0]), rtol=1e-6)


def test_ria_scores_equal_the_reference_expression_bit_for_bit():
    """biomedical-cybernetics/Relative-importance-and-activation-pruning lib/prune.py, prune_ria:
    W_metric = (abs(W)/sum(abs(W), dim=0) + abs(W)/sum(abs(W), dim=1).reshape(-1, 1)) * (sqrt(scaler_row))**a"""
    w, _, x = _layer()
    scaler_row = (x.norm(dim=0) ** 2) / 4
    ref = (torch.abs(w) / torch.sum(torch.abs(w), dim=0) + torch.abs(w) / torch.sum(torch.abs(w), dim=1).reshape(-1, 1)) \
        * (torch.sqrt(scaler_row.reshape((1, -1)))) ** 0.5
    assert torch.equal(ria_scores(w, torch.sqrt(scaler_row)), ref)


def test_ria_per_matrix_rule_is_the_references_threshold():
    from prunekit.methods.ria import matrix_threshold_mask

    scores = torch.tensor([[0.5, 0.1, 0.3], [0.3, 0.9, 0.2]])
    # int(6 * 0.5) = 3 -> threshold sorted[3] = 0.3: both 0.3s go too (ties), four pruned
    assert matrix_threshold_mask(scores, 0.5).tolist() == [[True, False, False], [False, True, False]]
    assert matrix_threshold_mask(scores, 0.0).all()


def test_reallocation_deals_every_quantile_to_every_group():
    # column sums 8, 1, 7, 2, 6, 3, 5, 4 -> ascending order 1, 3, 5, 7, 6, 4, 2, 0
    scores = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]])
    # quarter k fills position k-1 of each group, reversed for even k
    assert reallocation_order(scores, 4).tolist() == [1, 7, 6, 0, 3, 5, 4, 2]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_channel_permutation_keeps_nm_valid_and_only_raises_the_kept_score(n, m):
    g = torch.Generator().manual_seed(n * m)
    scores = torch.rand(12, 64, generator=g) ** 3
    keep, perm, info = permuted_nm_mask(scores, n, m)
    assert sorted(perm.tolist()) == list(range(64))  # a permutation
    assert is_nm_sparse(keep[:, perm].float(), n, m)  # N:M in the permuted order
    assert torch.equal(keep.sum(1), torch.full((12,), 64 * n // m))
    assert info["kept_score_lsa"] >= info["kept_score_reallocated"] - 1e-4
    assert info["kept_score_lsa"] == pytest.approx(float((scores * keep).sum()), rel=1e-6)


def test_linear_sum_assignment_makes_the_best_re_deal_at_each_position():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 12, generator=g)  # 3 groups of 4
    index = torch.arange(12)
    for position in range(4):  # brute force over the 3! ways to re-deal this position, then the next
        index = max((_redeal(index, position, order) for order in itertools.permutations(range(3))),
                    key=lambda ix: kept_score(scores[:, ix], 2, 4))
    assert kept_score(scores[:, lsa_refine(scores, torch.arange(12), 2, 4)], 2, 4) == pytest.approx(
        kept_score(scores[:, index], 2, 4), rel=1e-6)


def _redeal(index, position, order):
    """Group ``g`` takes, at ``position``, the channel that group ``order[g]`` had there."""
    out = index.clone()
    for grp, k in enumerate(order):
        out[grp * 4 + position] = index[k * 4 + position]
    return out


# --- SparseSwaps ---------------------------------------------------------------------------------

def _row_error(w, v, g):
    d = (w - v).double()
    return float(d @ g.double() @ d)


def test_swap_gain_formula_equals_the_brute_force_change_of_the_error():
    w, g, _ = _layer(rows=1, cols=10)
    w = w[0]
    keep = keep_mask(w.abs().unsqueeze(0), 0.5, Pattern(), True)[0]
    v = w * keep * 1.1  # kept values need not be the dense ones (SparseGPT's updates)
    for i in torch.nonzero(keep).flatten().tolist():
        for j in torch.nonzero(~keep).flatten().tolist():
            after = v.clone()
            after[i], after[j] = 0.0, w[j]
            brute = _row_error(w, after, g) - _row_error(w, v, g)
            assert swap_gain(w, v, g, i, j) == pytest.approx(brute, rel=1e-9, abs=1e-9)


def test_one_iteration_applies_the_optimal_swap_of_every_row():
    w, g, _ = _layer(rows=6, cols=12, seed=1)
    cur = w * keep_mask(w.abs(), 0.5, Pattern(), True)
    new, info = sparse_swaps(w, cur, g, max_iters=1)
    for r in range(6):
        keep = cur[r] != 0
        pairs = [(swap_gain(w[r], cur[r], g, i, j), i, j) for i in torch.nonzero(keep).flatten().tolist()
                 for j in torch.nonzero(~keep).flatten().tolist()]
        gain, i, j = min(pairs)
        if gain < 0:
            assert new[r, i] == 0 and new[r, j] == w[r, j]
            assert _row_error(w[r], new[r], g) == pytest.approx(_row_error(w[r], cur[r], g) + gain, rel=1e-5)


@pytest.mark.parametrize("pattern,candidates", [(Pattern(), 0), (Pattern(), 4), (Pattern("nm", 2, 4), 0),
                                                (Pattern("nm", 4, 8), 0)])
def test_swaps_keep_every_row_count_and_nm_and_never_raise_a_row_error(pattern, candidates):
    w, g, _ = _layer(rows=10, cols=32, seed=2)
    cur = w * keep_mask(w.abs(), 0.6 if not pattern.is_nm else pattern.sparsity, pattern, True)
    new, info = sparse_swaps(w, cur, g, pattern, max_iters=50, candidates=candidates)
    assert torch.equal((new != 0).sum(1), (cur != 0).sum(1))
    if pattern.is_nm:
        assert is_nm_sparse(new, pattern.n, pattern.m)
    grown = (new != 0) & (cur == 0)
    assert torch.equal(new[grown], w[grown])  # restored weights take their dense values
    for r in range(10):
        assert _row_error(w[r], new[r], g) <= _row_error(w[r], cur[r], g) + 1e-9
    assert info["swaps"] > 0 and info["error_after"] < info["error_before"]


def test_swaps_stop_at_a_local_optimum():
    w, g, _ = _layer(rows=4, cols=16, seed=5)
    cur = w * keep_mask(w.abs(), 0.5, Pattern(), True)
    done, info = sparse_swaps(w, cur, g, max_iters=1000)
    again, info2 = sparse_swaps(w, done, g, max_iters=1000)
    assert info["iters"] < 1000 and info2["swaps"] == 0 and torch.equal(again, done)


# --- least squares on a support, ALPS ----------------------------------------------------------

def test_masked_lstsq_reaches_the_exact_row_solutions():
    w, h, _ = _layer(rows=8, cols=24, seed=4)
    keep = keep_mask(w.abs(), 0.6, Pattern(), True)
    new, info = masked_lstsq(w, w * keep, h, keep, maxiter=200, rtol=1e-7, percdamp=0.01)
    hd = h.double().clone()
    hd += 0.01 * torch.mean(torch.diag(hd)) * torch.eye(24, dtype=torch.float64)
    for r in range(8):
        s = keep[r]
        exact = torch.linalg.solve(hd[s][:, s], (hd @ w[r].double())[s])
        assert torch.allclose(new[r, s].double(), exact, rtol=1e-4, atol=1e-5)
        assert torch.all(new[r, ~s] == 0)
    assert info["error_after"] < info["error_before"]


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.7), (Pattern("nm", 2, 4), 0.5)])
def test_alps_meets_the_pattern_and_beats_magnitude_on_the_layer_objective(pattern, sparsity):
    w, h, _ = _layer(rows=16, cols=32, seed=6)
    new, info = alps_prune(w, h, sparsity, pattern)
    if pattern.is_nm:
        assert is_nm_sparse(new, 2, 4) and int((new != 0).sum()) == w.numel() // 2
    else:
        assert int((new != 0).sum()) == round(0.3 * w.numel())  # one budget for the whole matrix
    mag = w * keep_mask(w.abs(), sparsity, pattern, per_row=False)
    assert layer_error(w, new, h) < layer_error(w, mag, h)
    assert info["error"] <= info["error_admm"] + 1e-6  # the refit on the support never hurts


def test_linear_schedule_is_the_transformers_one():
    total, warm = 20, 2
    assert [linear_schedule(s, total, warm) for s in (0, 1, 2, 11, 20, 25)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
