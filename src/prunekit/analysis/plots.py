"""Plots of spectral metrics and allocations (matplotlib, optional extra ``plots``).

Every function writes one PNG and returns its path; figures are closed after saving so a long
analysis does not accumulate memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .esd import LayerSpectrum
from ..errors import ConfigError

METRIC_LABELS = {
    "alpha": "α (Hill, KS-chosen x_min over all eigenvalues)",
    "alpha_peak": "α (Hill, x_min searched around the ESD peak)",
    "alpha_mid": "α (Hill, x_min = median eigenvalue)",
    "stable_rank": "stable rank Σλ / λ_max",
    "log_spectral_norm": "log10 λ_max",
    "alpha_weighted": "α · log10 λ_max",
}


def _plt():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("plots need matplotlib: pip install 'prunekit[plots]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_kind(spectra: Sequence[LayerSpectrum], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for s in spectra:
        xs, ys = out.setdefault(s.kind, ([], []))
        xs.append(s.block)
        ys.append(getattr(s, metric))
    return out


def _block_mean(spectra: Sequence[LayerSpectrum], metric: str) -> tuple[list[int], list[float]]:
    acc: dict[int, list[float]] = {}
    for s in spectra:
        acc.setdefault(s.block, []).append(getattr(s, metric))
    blocks = sorted(acc)
    return blocks, [float(np.mean(acc[b])) for b in blocks]


def plot_metric_by_block(runs: Mapping[str, Sequence[LayerSpectrum]], metric: str, path: Path, title: str) -> Path:
    """Metric per decoder block, one colour per projection type; block mean in black.

    With two runs (``--compare``) the second is drawn dashed with hollow markers.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.2))
    cmap = plt.get_cmap("tab10")
    styles = [("-", "o", None), ("--", "s", "none")]
    kinds: list[str] = []
    for r, (label, spectra) in enumerate(runs.items()):
        ls, mk, face = styles[min(r, 1)]
        for kind, (xs, ys) in _by_kind(spectra, metric).items():
            if kind not in kinds:
                kinds.append(kind)
            c = cmap(kinds.index(kind) % 10)
            ax.plot(xs, ys, ls, marker=mk, ms=4, lw=1, color=c, alpha=0.75, markerfacecolor=face or c,
                    label=f"{kind}" + (f" ({label})" if len(runs) > 1 else ""))
        bx, by = _block_mean(spectra, metric)
        ax.plot(bx, by, ls, color="black", lw=2.5, label="block mean" + (f" ({label})" if len(runs) > 1 else ""))
    ax.set_xlabel("decoder block (0 = first)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2 if len(runs) > 1 else 1, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_by_kind(runs: Mapping[str, Sequence[LayerSpectrum]], metric: str, path: Path, title: str) -> Path:
    """Distribution of the metric per projection type (box plot over blocks)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = list(runs)
    kinds = list(dict.fromkeys(s.kind for s in next(iter(runs.values()))))
    width = 0.8 / len(labels)
    for r, label in enumerate(labels):
        data = _by_kind(runs[label], metric)
        pos = [i + (r - (len(labels) - 1) / 2) * width for i in range(len(kinds))]
        bp = ax.boxplot([data[k][1] for k in kinds], positions=pos, widths=width * 0.9, patch_artist=True)
        for b in bp["boxes"]:
            b.set_facecolor(f"C{r}")
            b.set_alpha(0.6)
        ax.plot([], [], "s", color=f"C{r}", label=label)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_xlabel("projection type")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_esd(spectra: Sequence[LayerSpectrum], path: Path, title: str) -> Path:
    """Log-log ESD histogram of each given layer with its fitted power-law tail (both fits)."""
    plt = _plt()
    n = len(spectra)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    for ax, s in zip(axes[0], spectra):
        ev = np.asarray(s.evals, dtype=np.float64)
        ev = ev[ev > 1e-5]
        bins = np.logspace(math.log10(ev.min()), math.log10(ev.max()), 60)
        dens, edges = np.histogram(ev, bins=bins, density=True)
        centers = np.sqrt(edges[:-1] * edges[1:])
        ax.step(centers, np.where(dens > 0, dens, np.nan), where="mid", color="0.3", label=f"ESD ({len(ev)} eigenvalues)")
        for a, xmin, c, lab in ((s.alpha_peak, s.xmin_peak, "C3", "peak fit"), (s.alpha, s.xmin, "C0", "full search")):
            if not (math.isfinite(a) and a > 1):
                continue
            frac = float((ev >= xmin).mean())  # the tail's share of the mass
            x = np.logspace(math.log10(xmin), math.log10(ev.max()), 50)
            y = frac * (a - 1) / xmin * (x / xmin) ** (-a)
            ax.plot(x, y, "--", color=c, lw=2, label=f"{lab}: α={a:.2f}, x_min={xmin:.3g}")
            ax.axvline(xmin, color=c, lw=0.8, alpha=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue λ of WᵀW")
        ax.set_ylabel("density")
        ax.set_title(s.name.replace("model.layers.", "block "), fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_allocations(per_block: Mapping[str, Mapping[int, float]], target: float, path: Path, title: str) -> Path:
    """Per-block sparsity that each allocation would assign (same target mean)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, (label, blocks) in enumerate(per_block.items()):
        xs = sorted(blocks)
        ax.plot(xs, [blocks[b] for b in xs], "-o" if i else "-", ms=3, lw=2 if not i else 1.3, label=label)
    ax.axhline(target, color="black", lw=0.8, ls=":", label=f"target mean {target:.0%}")
    ax.set_xlabel("decoder block (0 = first)")
    ax.set_ylabel("sparsity (fraction of weights removed)")
    ax.set_title(title)
    return _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout, write the PNG, free the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare_scatter(a: Sequence[LayerSpectrum], b: Sequence[LayerSpectrum], labels: tuple[str, str], metric: str,
                         path: Path, title: str) -> Path:
    """Metric of each layer in model A (x) against the same layer in model B (y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    bmap = {s.name: s for s in b}
    kinds = list(dict.fromkeys(s.kind for s in a))
    for i, kind in enumerate(kinds):
        pts = [(getattr(s, metric), getattr(bmap[s.name], metric)) for s in a if s.kind == kind and s.name in bmap]
        if pts:
            ax.scatter(*zip(*pts), s=14, color=f"C{i}", label=kind)
    vals = [v for s in a for v in [getattr(s, metric)] if math.isfinite(v)]
    vals += [getattr(s, metric) for s in b if math.isfinite(getattr(s, metric))]
    lo, hi = min(vals), max(vals)
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="y = x")
    ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric)}\n{labels[0]}", fontsize=9)
    ax.set_ylabel(f"{labels[1]}", fontsize=9)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, ax, path)
