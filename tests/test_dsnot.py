"""DSnoT: swaps keep the sparsity and N:M, follow the reference's rules, and reduce the expected error."""

from __future__ import annotations

import pytest
import torch

from prunekit import PruneConfig, prune
from prunekit.masks import Pattern, is_nm_sparse, keep_mask
from prunekit.methods.dsnot import dsnot, expected_error
from prunekit.errors import ConfigError
from prunekit.registry import REFINERS
from prunekit.models import decoder_linears


def _layer(rows=32, cols=576, seed=0):
    """A layer as wide as SmolLM2's attention (with only 64 inputs the reference's unstructured rule,
    which has no sign check, overshoots so often that the expected error can grow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) * torch.rand(cols, generator=g) * 2 + 0.2 * torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, x.mean(0), x.var(0, unbiased=False), x.norm(dim=0)


def _wanda(w, norm, sparsity, pattern=Pattern()):
    return w * keep_mask(w.abs() * norm, sparsity, pattern, per_row=True)


MU = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.05, 1.0])
W = torch.tensor([[0.6, -0.1, 3.0, 0.5, -0.7, 0.05]])
SPARSE = torch.tensor([[0.6, 0.0, 3.0, 0.0, -0.7, 0.0]])  # Wanda (|w|, unit norms) keeps 3 of 6


def test_hand_built_swaps_follow_the_reference_rules():
    ones = torch.ones(6)
    assert float(expected_error(W, SPARSE, MU)) == pytest.approx(0.45)
    # cycle 1: grow idx 3 (largest positive W mu / var), prune idx 4 (kept, negative W mu, lowest Wanda):
    #   e = 0.45 - 0.5 - 0.035 = -0.085; cycle 2 would grow idx 1 and prune idx 0: e = 0.615.
    new, info = dsnot(W, SPARSE, MU, ones, ones, monotone=True)
    assert torch.equal(new, torch.tensor([[0.6, 0.0, 3.0, 0.5, 0.0, 0.0]]))
    assert info["swaps"] == 1 and info["mean_abs_error_after"] == pytest.approx(0.085)
    # the reference (no sign/monotone check for unstructured) accepts the overshooting 2nd swap too
    new, info = dsnot(W, SPARSE, MU, ones, ones)
    assert torch.equal(new, torch.tensor([[0.0, -0.1, 3.0, 0.5, 0.0, 0.0]])) and info["swaps"] == 2
    # same_sign rejects the first swap (it flips the sign of e): nothing changes
    new, info = dsnot(W, SPARSE, MU, ones, ones, same_sign=True)
    assert torch.equal(new, SPARSE) and info["swaps"] == 0
    # stopping rules: no cycles, or error already below the threshold
    assert torch.equal(dsnot(W, SPARSE, MU, ones, ones, max_cycles=0)[0], SPARSE)
    assert torch.equal(dsnot(W, SPARSE, MU, ones, ones, update_threshold=0.5)[0], SPARSE)


def _reference_row(w, keep, mu, var, norm, cycles=50, thr=0.0):
    """One row as zyxxmu/DSnoT lib/prune.py (unstructured) walks it: grow candidates are ALL columns
    sorted by ``W mu / var`` (kept ones sit at 0), read from the top when ``e > 0``, from the bottom
    otherwise; prune candidates are the kept columns with ``W mu < 0`` by ascending Wanda score (used
    when ``e >= 0``) and those with ``W mu > 0`` by ascending Wanda score (used when ``e < 0``); a row
    stops for good once ``|e| <= thr``; no sign check (``--without_same_sign`` is always true)."""
    keep, d = keep.clone(), w * mu
    e = float(d[~keep].sum())
    grow = torch.sort(torch.where(~keep, d / var, torch.zeros_like(d)), stable=True).indices.tolist()
    by_wanda = [j for j in torch.sort(w.abs() * norm, stable=True).indices.tolist() if keep[j]]
    prune_neg, prune_pos = [j for j in by_wanda if d[j] < 0], [j for j in by_wanda if d[j] > 0]
    lo, hi, pn, pp = 0, len(grow) - 1, 0, 0
    for _ in range(cycles):
        if not abs(e) > thr:
            break
        if e > 0:
            g, hi = grow[hi], hi - 1
        else:
            g, lo = grow[lo], lo + 1
        if e < 0:
            p, pp = prune_pos[pp], pp + 1
        else:
            p, pn = prune_neg[pn], pn + 1
        keep[g], keep[p] = True, False
        e += float(d[p]) - float(d[g])
    return keep


@pytest.mark.parametrize("sparsity", [0.6, 0.7])
def test_unstructured_defaults_match_a_per_row_walk_of_the_reference(sparsity):
    w, mu, var, norm = _layer(rows=12, seed=3)
    sparse = _wanda(w, norm, sparsity)
    new, info = dsnot(w, sparse, mu, var, norm, update_threshold=1e-4)
    assert info["swaps"] > 0
    for r in range(w.shape[0]):
        ref = _reference_row(w[r].double(), sparse[r] != 0, mu.double(), var.double(), norm.double(), thr=1e-4)
        assert torch.equal(new[r] != 0, ref), f"row {r}"


@pytest.mark.parametrize("kw", [{}, {"same_sign": True}, {"monotone": True}, {"pow_of_var": 0.0}])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_keeps_sparsity_and_reduces_expected_error(kw, sparsity):
    w, mu, var, norm = _layer()
    sparse = _wanda(w, norm, sparsity)
    new, info = dsnot(w, sparse, mu, var, norm, **kw)
    assert torch.equal((new != 0).sum(1), (sparse != 0).sum(1))  # every row keeps its count
    changed = new != sparse
    assert info["swaps"] > 0 and torch.equal(new[changed & (new != 0)], w[changed & (new != 0)])  # grown = dense
    e0, e1 = expected_error(w, sparse, mu).abs(), expected_error(w, new, mu).abs()
    assert float(e1.square().sum()) < float(e0.square().sum())
    if kw.get("same_sign") or kw.get("monotone"):
        assert bool((e1 <= e0 + 1e-9).all())  # guaranteed row by row under these rules


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("monotone", [False, True])
def test_nm_groups_stay_exactly_n_of_m(n, m, monotone):
    w, mu, var, norm = _layer(seed=n + m)
    pat = Pattern("nm", n, m)
    sparse = _wanda(w, norm, pat.sparsity, pat)
    new, info = dsnot(w, sparse, mu, var, norm, pat, monotone=monotone)
    assert is_nm_sparse(new, n, m) and torch.equal((new != 0).reshape(-1, m).sum(1), (sparse != 0).reshape(-1, m).sum(1))
    e0, e1 = expected_error(w, sparse, mu).abs(), expected_error(w, new, mu).abs()
    assert info["swaps"] > 0 and float(e1.sum()) < float(e0.sum())
    if monotone:
        assert bool((e1 <= e0 + 1e-9).all())


def test_options_are_validated():
    with pytest.raises(ConfigError, match=r"^refiner 'dsnot' option max_cycles=-1 is invalid: it must be an integer >= 0 "
                                          r"\(default 50\)$"):
        REFINERS.build("dsnot", {"max_cycles": "-1"})
    with pytest.raises(ConfigError, match=r"^refiner 'dsnot' skip='\(' is not a valid regex"):
        REFINERS.build("dsnot", {"skip": "("})
    with pytest.raises(ConfigError, match=r"^refiner 'dsnot' has no option 'cycles'; its options are: max_cycles=50, "):
        REFINERS.build("dsnot", {"cycles": 3})
    with pytest.raises(ConfigError, match="without a refiner"):
        PruneConfig(refine_options={"max_cycles": 3})


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_engine_refinement_keeps_each_layers_sparsity(calib_ids, pattern, sparsity):
    from conftest import tiny_model

    plain, refined = tiny_model(), tiny_model()
    prune(plain, PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern), calib=calib_ids)
    rep = prune(refined, PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern, refine="dsnot",
                                     refine_options={"skip": "down_proj"}), calib=calib_ids)
    a, b = decoder_linears(plain), decoder_linears(refined)
    for name in a:
        assert int((a[name].weight == 0).sum()) == int((b[name].weight == 0).sum())
        if pattern == "2:4":
            assert is_nm_sparse(b[name].weight, 2, 4)
    info = {r.name: r.info["refine"] for r in rep.layers}
    assert all("skipped" in v for k, v in info.items() if "down_proj" in k)
    assert sum(v.get("swaps", 0) for v in info.values()) > 0
    assert any(not torch.equal(a[n].weight, b[n].weight) for n in a)


def test_refine_after_magnitude_gathers_statistics(calib_ids):
    from conftest import tiny_model

    plain, model = tiny_model(), tiny_model()
    prune(plain, PruneConfig(method="magnitude", sparsity=0.5), calib=calib_ids)
    rep = prune(model, PruneConfig(method="magnitude", sparsity=0.5, refine="dsnot", refine_options={"skip": ""}),
                calib=calib_ids)
    a, b = decoder_linears(plain), decoder_linears(model)
    for r in rep.layers:  # every swap keeps each row's count of zeros: the same zeros per row as magnitude alone
        assert torch.equal((a[r.name].weight == 0).sum(1), (b[r.name].weight == 0).sum(1))
        assert r.info["refine"]["swaps"] == int(((a[r.name].weight == 0) & (b[r.name].weight != 0)).sum())
    assert sum(r.info["refine"]["swaps"] for r in rep.layers) > 0
