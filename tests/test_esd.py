"""Spectral analysis: exact values on hand-built spectra, power-law recovery, cache, WeightWatcher parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunekit.analysis import esd
from prunekit.analysis.esd import fit_power_law, hill_ks_table, peak_range, spectrum_metrics


def _pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    """Samples of p(x) = (alpha-1) x^-alpha on x >= 1 by inverse CDF."""
    u = np.random.default_rng(seed).random(n)
    return (1.0 - u) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0, 4.0])
def test_alpha_recovered_within_5_percent(alpha):
    for seed in range(2):
        x = _pareto(alpha, 2000, seed)
        fit = fit_power_law(x, "search")
        assert abs(fit.alpha - alpha) / alpha < 0.05, (seed, fit)
        assert fit.ks < 0.05
        assert abs(fit_power_law(x, "mid").alpha - alpha) / alpha < 0.08


def test_hill_ks_table_matches_a_naive_loop():
    e = torch.tensor(sorted(_pareto(2.5, 60, 1)), dtype=torch.float64)
    alphas, ds = hill_ks_table(e, chunk=7)
    n_all = len(e)
    for k in range(n_all - 1):
        tail = e[k:]
        n = n_all - k
        a = 1 + n / float(torch.log(tail / e[k]).sum())
        d = max(abs(1 - (float(tail[j]) / float(e[k])) ** (1 - a) - j / n) for j in range(n))
        assert alphas[k].item() == pytest.approx(a, rel=1e-12)
        assert ds[k].item() == pytest.approx(d, rel=1e-9, abs=1e-12)


def test_hand_computed_fit_on_three_values():
    # evals 1, e, e^2: candidates k=0 (n=3, sum log = 0+1+2 = 3 -> alpha 2) and k=1 (n=2, sum = 0+1 -> alpha 3)
    e = np.exp([0.0, 1.0, 2.0])
    alphas, ds = hill_ks_table(torch.tensor(e))
    assert alphas.tolist() == pytest.approx([2.0, 3.0])
    # D for k=1: |1 - e^{-2} - 1/2| at j=1, 0 at j=0
    assert ds[1].item() == pytest.approx(abs(0.5 - math.exp(-2.0)))
    d0 = max(abs(1 - math.exp(-1.0) - 1 / 3), abs(1 - math.exp(-2.0) - 2 / 3))
    assert ds[0].item() == pytest.approx(d0)
    fit = fit_power_law(e, "search")
    assert fit.alpha == pytest.approx(2.0 if d0 < ds[1].item() else 3.0)


def test_spectrum_metrics_exact_on_a_diagonal_matrix():
    w = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 1e-4]))  # 1e-8 eigenvalue is below the threshold
    ev = esd.eigenvalues([w])[0]
    assert ev.tolist() == pytest.approx([1e-8, 1.0, 4.0, 9.0, 16.0], rel=1e-5)
    m = spectrum_metrics(ev)
    assert m["n_evals"] == 4
    assert m["stable_rank"] == pytest.approx((1 + 4 + 9 + 16) / 16, rel=1e-5)
    assert m["log_spectral_norm"] == pytest.approx(math.log10(16), rel=1e-6)
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(16), rel=1e-9)
    # alpha_mid: x_min = the median (index 2 of [1, 4, 9, 16] -> 9), tail 9, 16
    assert m["alpha_mid"] == pytest.approx(1 + 2 / math.log(16 / 9), rel=1e-5)


def test_peak_range_reference_and_intended():
    e = torch.tensor(sorted(_pareto(3.0, 500, 0)) + [5.0] * 200, dtype=torch.float64)
    lo, hi = peak_range(e, "intended")
    assert lo <= 5.0 * 1.0001 and hi >= 5.0 * 0.99 and hi / lo == pytest.approx(1.5 / 0.95)
    lo_r, hi_r = peak_range(e, "reference")
    assert hi_r == pytest.approx(hi) and lo_r == pytest.approx(math.log10(lo))
    with pytest.raises(ValueError, match="peak_bounds"):
        peak_range(e, "nope")
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(e, "nope")


def test_eigenvalues_batched_equal_single():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 12, generator=g) for _ in range(3)] + [torch.randn(12, 8, generator=g)]
    batched = esd.eigenvalues(ws)
    for w, ev in zip(ws, batched):
        ref = np.sort(torch.linalg.eigvalsh((w.double().T @ w.double()))[-min(w.shape):].numpy())
        np.testing.assert_allclose(ev, ref, rtol=1e-4, atol=1e-5)


def test_analyze_model_caches_by_weight_hash(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    first = esd.analyze_model(tiny_llama, keep_evals=True)
    assert len(first) == 14 and len(list((tmp_path / "esd").glob("*.npz"))) == 14
    calls = []
    monkeypatch.setattr(esd, "spectrum_metrics", lambda *a, **k: calls.append(1))
    again = esd.analyze_model(tiny_llama, keep_evals=True)
    assert not calls  # everything came from the cache
    assert [r.row() for r in again] == [r.row() for r in first]
    assert first[0].block == 0 and first[-1].block == 1 and first[0].kind == "q_proj"
    with torch.no_grad():  # a changed weight is a new hash
        tiny_llama.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    monkeypatch.setattr(esd, "spectrum_metrics", _count(calls))
    esd.analyze_model(tiny_llama)
    assert len(calls) == 1


def _count(calls):
    real = spectrum_metrics

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)

    return wrapped


def test_alpha_matches_weightwatcher_on_the_same_matrices():
    """Cross-check with WeightWatcher (optional dependency): same eigenvalues, same fit settings."""
    ww_fit = pytest.importorskip("weightwatcher.WW_powerlaw")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        w = torch.distributions.StudentT(3.0).sample((120, 240)) if i % 2 else torch.randn(120, 240, generator=g)
        ev = esd.eigenvalues([w])[0]
        ref = ww_fit.WWFit(ev[ev > esd.EVALS_THRESH])
        ours = fit_power_law(ev, "search")
        assert ours.alpha == pytest.approx(ref.alpha, rel=1e-9)
        assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12)
        assert ours.ks == pytest.approx(ref.D, rel=1e-9)


def test_alpha_peak_matches_weightwatcher_xmin_peak_on_the_same_matrices():
    """WeightWatcher's ``fix_fingers='xmin_peak'`` fit (``pl_package='powerlaw'``; its default ``'ww'``
    package cannot take an x_min range and returns -1): the same window and KS search. ``powerlaw.Fit``
    drops the largest *in-window* eigenvalue from the candidates, prunekit (like AlphaPruning's loop)
    only the global largest, so prunekit's fit minimises D over a superset of powerlaw's candidates."""
    pytest.importorskip("powerlaw")
    ww_fit = pytest.importorskip("weightwatcher.WW_powerlaw")
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # StudentT.sample takes no generator
    for i in range(4):
        w = torch.distributions.StudentT(3.0).sample((120, 240)) if i % 2 else torch.randn(120, 240, generator=g)
        ev = esd.eigenvalues([w])[0]
        nz = ev[ev > esd.EVALS_THRESH]
        counts, edges = np.histogram(np.log10(nz), bins=100)  # WeightWatcher's fit_powerlaw, xmin_peak branch
        peak = 10 ** edges[np.argmax(counts)]
        lo, hi = np.log10(0.95 * peak), 1.5 * peak
        e = torch.tensor(np.sort(nz), dtype=torch.float64)
        assert peak_range(e) == pytest.approx((lo, hi), rel=1e-12)
        ref = ww_fit.pl_fit(data=nz, xmin=(lo, hi), pl_package="powerlaw")
        alphas, ds = hill_ks_table(e)
        inwin = torch.nonzero((e >= lo) & (e <= hi)).flatten()
        k = int(inwin[:-1][torch.argmin(ds[inwin[:-1]])])  # powerlaw's candidate set
        assert alphas[k].item() == pytest.approx(ref.alpha, rel=1e-9)
        assert e[k].item() == pytest.approx(ref.xmin, rel=1e-12)
        assert ds[k].item() == pytest.approx(ref.D, rel=1e-9)
        ours = fit_power_law(ev, "peak")
        cand = inwin[inwin < e.numel() - 1]
        assert ours.ks == pytest.approx(float(ds[cand].min()), rel=1e-12)
        assert ours.ks <= ref.D + 1e-12
        if ours.ks < ref.D - 1e-12:  # then prunekit chose the top in-window eigenvalue
            assert ours.xmin == pytest.approx(e[inwin[-1]].item(), rel=1e-12)
