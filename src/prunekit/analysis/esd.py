"""Empirical spectral densities (ESD) of weight matrices and their heavy-tail metrics.

Heavy-tailed self-regularization (HT-SR; Martin & Mahoney, 2021, JMLR 22(165)) reads how well
trained a layer is from the eigenvalues of its correlation matrix ``W^T W``: the more
heavy-tailed the ESD (the smaller the power-law exponent ``alpha`` of its tail), the more
structure training put into it. AlphaPruning (Lu et al., NeurIPS 2024, arXiv:2410.10912) prunes
heavy-tailed layers less.

For each matrix this module computes, in float64 from float32 singular values:

* ``alpha`` — the Hill / maximum-likelihood exponent of a continuous power law
  ``p(x) ~ x^-alpha`` on ``x >= x_min`` (Clauset et al., 2009, eq. 3.1):
  ``alpha(k) = 1 + n_k / sum_{i>=k} ln(lambda_i / lambda_k)`` with ``x_min`` chosen among all
  eigenvalues as the one whose fit has the smallest Kolmogorov-Smirnov distance
  ``D_k = max_{i>=k} |1 - (lambda_i/lambda_k)^(1-alpha) - (i-k)/n_k|`` (WeightWatcher's
  default ``WWFit``);
* ``alpha_peak`` — the same search restricted to candidates around the peak of the histogram
  of ``log10(lambda)`` (100 bins), as WeightWatcher's ``fix_fingers='xmin_peak'`` and
  AlphaPruning's default metric do. The references bound the range by
  ``[log10(0.95 * peak), 1.5 * peak]`` (the lower bound is, literally, a *log*); we reproduce
  that for comparability (``peak_bounds="reference"``), ``"intended"`` uses ``0.95 * peak``;
* ``alpha_mid`` — ``x_min`` fixed at the median eigenvalue (AlphaPruning's ``xmin_mid``);
* ``stable_rank`` ``sum(lambda) / lambda_max``; ``log_spectral_norm`` ``log10(lambda_max)``;
  ``alpha_weighted`` ``alpha * log10(lambda_max)``; the KS distances of the fits.

Eigenvalues ``<= 1e-5`` are dropped before fitting (WeightWatcher's ``EVALS_THRESH``).
Eigenvalues are cached by a hash of the weight bytes under ``cache_root()/esd``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

EVALS_THRESH = 1e-5
HIST_BINS = 100
METRICS = ("alpha", "alpha_peak", "alpha_mid", "stable_rank", "log_spectral_norm", "alpha_weighted")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class PowerLawFit:
    """One power-law tail fit: exponent, chosen ``x_min``, tail size and KS distance."""

    alpha: float
    xmin: float
    n_tail: int
    ks: float


def _sorted_nz(evals: Tensor | np.ndarray, thresh: float = EVALS_THRESH) -> Tensor:
    e = torch.as_tensor(np.asarray(evals) if not isinstance(evals, Tensor) else evals).to(torch.float64).flatten()
    e = torch.sort(e).values
    return e[e > thresh]


def hill_ks_table(evals: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Hill exponent and KS distance for every candidate ``x_min = lambda_k`` (k < N-1).

    Args:
        evals: eigenvalues sorted ascending, all positive (float64).
        chunk: candidates processed at once (memory ``chunk x N``).

    Returns:
        ``(alphas, ds)`` of length ``N - 1``; ``D = 1`` where ``alpha <= 1`` or is not finite
        (WeightWatcher's convention: such fits are never chosen over a real one).
    """
    n_all = evals.numel()
    if n_all < 2:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    loge = evals.log()
    suffix = torch.flip(torch.cumsum(torch.flip(loge, [0]), 0), [0])  # sum_{i>=k} log lambda_i
    k = torch.arange(n_all - 1, dtype=torch.float64)
    n_k = n_all - k
    denom = suffix[:-1] - n_k * loge[:-1]
    alphas = 1.0 + n_k / denom  # torch division: denom <= 0 gives inf/nan silently, masked next
    alphas = torch.where(denom > 0, alphas, torch.full_like(alphas, math.inf))
    ds = torch.ones(n_all - 1, dtype=torch.float64)
    cols = torch.arange(n_all, dtype=torch.float64)
    for s in range(0, n_all - 1, chunk):
        ks = torch.arange(s, min(s + chunk, n_all - 1))
        a = alphas[ks].unsqueeze(1)
        rel = loge.unsqueeze(0) - loge[ks].unsqueeze(1)  # log(lambda_i / lambda_k)
        cdf = 1.0 - torch.exp((1.0 - a) * rel)
        emp = (cols.unsqueeze(0) - ks.unsqueeze(1)) / n_k[ks].unsqueeze(1)
        valid = cols.unsqueeze(0) >= ks.unsqueeze(1)
        dev = torch.where(valid, (cdf - emp).abs(), torch.zeros((), dtype=torch.float64))
        d = dev.amax(1)
        ok = torch.isfinite(a.squeeze(1)) & (a.squeeze(1) > 1)
        ds[ks] = torch.where(ok, d, torch.ones_like(d))
    return alphas, ds


def peak_range(evals: Tensor, bounds: str = "reference") -> tuple[float, float]:
    """Candidate ``x_min`` range around the peak of the ``log10`` histogram (100 bins)."""
    h = torch.log10(evals)
    lo_e, hi_e = float(h.min()), float(h.max())
    counts = torch.histc(h, bins=HIST_BINS, min=lo_e, max=hi_e) if hi_e > lo_e else torch.ones(1)
    edges = torch.linspace(lo_e, hi_e, HIST_BINS + 1, dtype=torch.float64)
    peak = 10.0 ** float(edges[int(torch.argmax(counts))])
    if bounds == "reference":
        a, b = math.log10(0.95 * peak), 1.5 * peak
    elif bounds == "intended":
        a, b = 0.95 * peak, 1.5 * peak
    else:
        raise ValueError(f"peak_bounds={bounds!r} must be 'reference' or 'intended'")
    return min(a, b), max(a, b)


def fit_power_law(evals: Tensor | np.ndarray, xmin: str = "search", peak_bounds: str = "reference",
                  thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit the ESD tail.

    Args:
        evals: eigenvalues of ``W^T W`` (any order).
        xmin: ``"search"`` (every eigenvalue a candidate), ``"peak"`` (candidates around the
            histogram peak) or ``"mid"`` (the median eigenvalue).
        peak_bounds: see :func:`peak_range`.
    """
    e = _sorted_nz(evals, thresh)
    n_all = e.numel()
    if n_all < 3:
        return PowerLawFit(math.nan, math.nan, n_all, math.nan)
    if xmin == "mid":
        i = n_all // 2
        tail = e[i:]
        n = tail.numel()
        s = float(torch.log(tail / e[i]).sum())
        alpha = 1.0 + n / s if s > 0 else math.inf
        rel = torch.log(tail / e[i])
        d = float(((1.0 - torch.exp((1.0 - alpha) * rel)) - torch.arange(n, dtype=torch.float64) / n).abs().max())
        return PowerLawFit(alpha, float(e[i]), n, d)
    alphas, ds = hill_ks_table(e)
    if xmin == "peak":
        a, b = peak_range(e, peak_bounds)
        cand = (e[:-1] >= a) & (e[:-1] <= b)
        if not bool(cand.any()):
            cand = torch.ones_like(cand)
        ds = torch.where(cand, ds, torch.full_like(ds, math.inf))
    elif xmin != "search":
        raise ValueError(f"xmin={xmin!r} must be 'search', 'peak' or 'mid'")
    k = int(torch.argmin(ds))
    return PowerLawFit(float(alphas[k]), float(e[k]), n_all - k, float(ds[k]))


@dataclass
class LayerSpectrum:
    """Spectral metrics of one linear (see the module docstring for definitions)."""

    name: str
    block: int
    kind: str
    shape: tuple[int, int]
    params: int
    n_evals: int
    alpha: float
    alpha_peak: float
    alpha_mid: float
    stable_rank: float
    log_spectral_norm: float
    alpha_weighted: float
    ks: float
    ks_peak: float
    xmin: float
    xmin_peak: float
    evals: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("evals")
        d["shape"] = list(self.shape)
        return d


def spectrum_metrics(evals: np.ndarray | Tensor, peak_bounds: str = "reference") -> dict[str, float]:
    """Every metric of one eigenvalue set (pure function; exact-value tested)."""
    e = _sorted_nz(evals)
    full = torch.as_tensor(np.asarray(evals), dtype=torch.float64)
    lmax = float(full.max()) if full.numel() else math.nan
    plain, peak, mid = (fit_power_law(e, x, peak_bounds, thresh=0.0) for x in ("search", "peak", "mid"))
    log_sn = math.log10(lmax) if lmax > 0 else math.nan
    return {
        "n_evals": int(e.numel()),
        "alpha": plain.alpha, "alpha_peak": peak.alpha, "alpha_mid": mid.alpha,
        "stable_rank": float(full.sum()) / lmax if lmax > 0 else math.nan,
        "log_spectral_norm": log_sn,
        "alpha_weighted": plain.alpha * log_sn,
        "ks": plain.ks, "ks_peak": peak.ks, "xmin": plain.xmin, "xmin_peak": peak.xmin,
    }


def weight_hash(w: Tensor) -> str:
    """Content hash of a weight (bytes, dtype, shape)."""
    t = w.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy().tobytes())
    return h.hexdigest()


def _cache_dir() -> Path:
    from ..formats.sources import cache_root

    return cache_root() / "esd"


def eigenvalues(weights: list[Tensor]) -> list[np.ndarray]:
    """Eigenvalues of ``W^T W`` (squared fp32 singular values), batched by shape."""
    out: list[np.ndarray | None] = [None] * len(weights)
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), 16):
            part = idx[s : s + 16]
            stack = torch.stack([weights[i].detach().to(torch.float32) for i in part])
            sv = torch.linalg.svdvals(stack).to(torch.float64).square().cpu().numpy()
            for j, i in enumerate(part):
                out[i] = np.sort(sv[j])
    return out  # type: ignore[return-value]


def analyze_linears(
    linears: dict[str, nn.Module],
    block_of: Callable[[str], int],
    use_cache: bool = True,
    keep_evals: bool = False,
    peak_bounds: str = "reference",
    progress: Callable[[int, int], None] | None = None,
    batch: int = 16,
) -> list[LayerSpectrum]:
    """Spectral metrics of every linear, cached by weight hash.

    Args:
        linears: qualified name → module (e.g. ``decoder_linears(model)``).
        block_of: qualified name → decoder block index.
        use_cache: read/write ``cache_root()/esd/<hash>.npz`` (eigenvalues + metrics).
        keep_evals: keep the eigenvalues on the results (for plots).
        progress: called with ``(done, total)`` after every batch of matrices.
    """
    from ..models import weight_view

    names = list(linears)
    cdir = _cache_dir()
    tag = f"v{_CACHE_VERSION}-{peak_bounds}"
    results: dict[str, tuple[np.ndarray, dict]] = {}
    todo: list[tuple[str, str | None]] = []
    for name in names:
        key = weight_hash(weight_view(linears[name])) if use_cache else None
        f = cdir / f"{key}.npz" if key else None
        if f is not None and f.is_file():
            try:
                z = np.load(f, allow_pickle=False)
                metrics = json.loads(str(z["metrics"])).get(tag)
                if metrics is not None:
                    results[name] = (z["evals"], metrics)
                    continue
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable ESD cache file %s", f)
        todo.append((name, key))
    done = len(results)
    if progress:
        progress(done, len(names))
    for s in range(0, len(todo), batch):
        part = todo[s : s + batch]
        evs = eigenvalues([weight_view(linears[n]) for n, _ in part])
        for (name, key), ev in zip(part, evs):
            metrics = spectrum_metrics(ev, peak_bounds)
            results[name] = (ev, metrics)
            if key is not None:
                _write_cache(cdir / f"{key}.npz", ev, {tag: metrics})
        done += len(part)
        if progress:
            progress(done, len(names))
    out = []
    for name in names:
        ev, m = results[name]
        w = weight_view(linears[name])
        out.append(LayerSpectrum(
            name=name, block=block_of(name), kind=name.rsplit(".", 1)[-1], shape=tuple(w.shape), params=w.numel(),
            evals=ev if keep_evals else None, **m))
    return out


def _write_cache(path: Path, evals: np.ndarray, metrics: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(evals)}.npz")
        np.savez(tmp, evals=evals, metrics=np.array(json.dumps(metrics)))
        tmp.replace(path)
    except OSError as e:  # a read-only cache must not break analysis
        log.warning("cannot write ESD cache %s: %s", path, e)


def analyze_model(model: nn.Module, include=None, exclude=None, **kw) -> list[LayerSpectrum]:
    """:func:`analyze_linears` over every selected decoder linear of ``model``."""
    from ..models import block_lookup, decoder_linears

    return analyze_linears(decoder_linears(model, include, exclude), block_lookup(model), **kw)
