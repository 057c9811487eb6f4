"""``prunekit analyze``: per-layer spectral (HT-SR) metrics, plots and the allocations they imply."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from pathlib import Path

from ..errors import ConfigError
from .common import add_model_args, check_out_folder, setup_threads, table

COLUMNS = ("name", "block", "kind", "shape", "n_evals", "alpha", "alpha_peak", "alpha_mid", "ks", "ks_peak",
           "stable_rank", "log_spectral_norm", "alpha_weighted")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="spectral (heavy-tail) metrics of every decoder linear, plots, allocations",
                       description="Eigenvalues of W^T W for every decoder linear; power-law exponent alpha "
                                   "(Hill + KS), stable rank, spectral norm; the per-layer sparsity each "
                                   "allocation would assign. Results are cached by weight hash.")
    add_model_args(p)
    for action in p._actions:  # the model may also be given as --model
        if action.dest == "model":
            action.nargs, action.default, action.required = "?", None, False
    p.add_argument("--model", dest="model_opt", default=None, help="same as the positional MODEL")
    p.add_argument("--compare", default=None, metavar="MODEL2",
                   help="a second model (e.g. a pruned saved folder) to compare layer by layer")
    p.add_argument("--out", default=None, help="output folder for CSV/JSON/PNGs (default analysis-<model>)")
    p.add_argument("--metric", default="alpha_peak",
                   choices=["alpha", "alpha_peak", "alpha_mid", "stable_rank", "log_spectral_norm", "alpha_weighted"],
                   help="metric plotted and used for the alpha allocation (default alpha_peak)")
    p.add_argument("--sparsity", type=float, default=0.7, help="target sparsity for the allocation plot (default 0.7)")
    p.add_argument("--epsilon", type=float, nargs="+", default=[0.1, 0.3],
                   help="AlphaPruning epsilon(s) to show (default 0.1 0.3)")
    p.add_argument("--owl-calib", default=None, metavar="DATASET",
                   help="also show OWL's allocation, calibrated on this dataset (needs a forward pass)")
    p.add_argument("--owl-lam", type=float, default=0.08, help="OWL lambda (default 0.08)")
    p.add_argument("--nsamples", type=int, default=8, help="OWL calibration sequences (default 8)")
    p.add_argument("--seqlen", type=int, default=256, help="OWL calibration sequence length (default 256)")
    p.add_argument("--layers", nargs="*", default=None, metavar="REGEX",
                   help="layers whose ESD is plotted (default: lowest, median and highest alpha)")
    p.add_argument("--include", action="append", metavar="REGEX", help="only analyze linears whose name matches")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="skip linears whose name matches")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-cache", action="store_true", help="recompute (and do not store) the eigenvalues")
    p.add_argument("--brief", action="store_true", help="print the per-block summary only, not every layer")
    p.set_defaults(func=run)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def _analyze(spec: str, args: argparse.Namespace, label: str):
    from tqdm import tqdm

    from ..analysis.esd import analyze_model
    from ..formats import load_model

    t0 = time.perf_counter()
    model, tok = load_model(spec, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)
    from ..models import check_finite

    check_finite(model)  # NaN/Inf weights have no spectrum: named here, not a linalg traceback
    bar = tqdm(total=None, desc=f"ESD {label}", unit="matrix")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        spectra = analyze_model(model, args.include, args.exclude, use_cache=not args.no_cache, keep_evals=True,
                                progress=progress)
    finally:
        bar.close()
    print(f"{label}: {len(spectra)} linears analysed in {time.perf_counter() - t0:.1f}s (load included)")
    return model, tok, spectra


def _label(spec: str) -> str:
    return Path(spec.rstrip("/")).name or spec


def _allocations(model, tok, spectra, args) -> tuple[dict[str, dict[int, float]], dict[int, float] | None]:
    """Per-block sparsity of each allocation, and OWL's per-block outlier ratio (None without --owl-calib)."""
    from ..allocation.alpha import alpha_allocation

    params = {s.name: s.params for s in spectra}
    groups = {s.name: s.block for s in spectra}
    out: dict[str, dict[int, float]] = {"uniform": {s.block: args.sparsity for s in spectra}}

    def per_block(alloc: dict[str, float]) -> dict[int, float]:
        acc: dict[int, list[float]] = {}
        for s in spectra:
            a = acc.setdefault(s.block, [0.0, 0.0])
            a[0] += alloc[s.name] * s.params
            a[1] += s.params
        return {b: v[0] / v[1] for b, v in sorted(acc.items())}

    values = {s.name: getattr(s, args.metric) for s in spectra}
    if all(math.isfinite(v) for v in values.values()):
        for eps in args.epsilon:
            out[f"alpha ({args.metric}, ε={eps:g})"] = per_block(alpha_allocation(values, params, args.sparsity, eps, groups))
    if args.owl_calib:
        from ..allocation import build_allocator
        from ..config import CalibConfig
        from ..data import calibration_ids
        from ..masks import Pattern
        from ..models import decoder_linears

        ids = calibration_ids(CalibConfig(args.owl_calib, args.nsamples, args.seqlen), tok, args.data_dir)
        owl = build_allocator("owl", {"lam": args.owl_lam})
        alloc = owl.allocate(model, decoder_linears(model, args.include, args.exclude), args.sparsity, Pattern(), ids)
        out[f"owl (λ={args.owl_lam:g}, M=5, {args.owl_calib} {args.nsamples}x{args.seqlen})"] = per_block(alloc)
        return out, owl.info["outlier_ratio"]
    return out, None


def _pick_layers(spectra, patterns, metric):
    if patterns:
        rx = [re.compile(p) for p in patterns]
        chosen = [s for s in spectra if any(r.search(s.name) for r in rx)][:4]
        if not chosen:
            raise ConfigError(f"--layers {patterns} match no analysed layer; names look like {spectra[0].name}")
        return chosen
    ok = sorted((s for s in spectra if math.isfinite(getattr(s, metric))), key=lambda s: getattr(s, metric))
    return [ok[0], ok[len(ok) // 2], ok[-1]] if ok else []


def _print_tables(args, runs, spectra, allocs, outliers) -> None:
    """Every layer's metrics (unless --brief), then per block: the metric and each allocation's sparsity."""
    if not args.brief:
        for label, sp in runs.items():
            print(f"\n{label}")
            print(table([[s.name, f"{s.shape[0]}x{s.shape[1]}", *(_fmt(getattr(s, k)) for k in COLUMNS[5:])] for s in sp],
                        ["layer", "shape", *COLUMNS[5:]]))
    print("\nper block (mean over its linears) and the sparsity each allocation assigns at "
          f"{args.sparsity:.0%} overall:")
    names = list(allocs)
    blocks = sorted({s.block for s in spectra})
    brows = []
    for b in blocks:
        row = [str(b)]
        for sp in runs.values():
            vals = [getattr(s, args.metric) for s in sp if s.block == b]
            row.append(_fmt(float(sum(vals) / len(vals))) if vals else "-")
        row += [f"{allocs[n][b]:.3f}" for n in names]
        brows.append(row)
    print(table(brows, ["block", *(f"{args.metric} {lab}" for lab in runs), *names]))
    if outliers:
        print("OWL outlier ratio per block (share of Wanda scores > 5 x the block mean, %): "
              + " ".join(f"{b}:{100 * r:.2f}" for b, r in outliers.items()))


def _plots(args, spec, out, runs, spectra, allocs) -> None:
    """The metric per block and per projection, the ESDs of three layers, the allocations, the comparison."""
    from ..analysis import plots

    title = f"{' vs '.join(runs)}: {args.metric} per decoder block and projection"
    files = [plots.plot_metric_by_block(runs, args.metric, out / f"{args.metric}_by_block.png", title),
             plots.plot_metric_by_kind(runs, args.metric, out / f"{args.metric}_by_kind.png",
                                       f"{' vs '.join(runs)}: {args.metric} per projection type (over blocks)")]
    chosen = _pick_layers(spectra, args.layers, args.metric)
    if chosen:
        files.append(plots.plot_esd(chosen, out / "esd.png",
                                    f"{_label(spec)}: empirical spectral density (log-log) with power-law tail fits"))
    files.append(plots.plot_allocations(allocs, args.sparsity, out / "allocation.png",
                                        f"{_label(spec)}: per-block sparsity each allocation assigns "
                                        f"(parameter-weighted mean {args.sparsity:.0%})"))
    if args.compare:
        labs = tuple(runs)
        files.append(plots.plot_compare_scatter(runs[labs[0]], runs[labs[1]], labs, args.metric,
                                                out / f"{args.metric}_compare.png",
                                                f"{args.metric} per layer: {labs[0]} vs {labs[1]}"))
    print("plots: " + ", ".join(str(f) for f in files))


def run(args: argparse.Namespace) -> int:
    setup_threads(args)
    spec = args.model_opt or args.model
    if not spec:
        raise ConfigError("no model given: prunekit analyze MODEL (or --model MODEL)")
    if args.model_opt and args.model and args.model_opt != args.model:
        raise ConfigError(f"two different models given ({args.model} and --model {args.model_opt}); pass one")
    if not (0.0 < args.sparsity < 0.99):
        raise ConfigError(f"--sparsity={args.sparsity} must lie in (0, 0.99)")
    if any(not (0.0 <= e < 1.0) for e in args.epsilon):
        raise ConfigError(f"--epsilon {args.epsilon}: each must lie in [0, 1)")
    out = Path(args.out or f"analysis-{_label(spec)}")
    check_out_folder(out)
    t0 = time.perf_counter()
    model, tok, spectra = _analyze(spec, args, _label(spec))
    runs = {_label(spec): spectra}
    if args.compare:
        _, _, other = _analyze(args.compare, args, _label(args.compare))
        lab = _label(args.compare) if _label(args.compare) != _label(spec) else f"{_label(args.compare)} (compare)"
        runs[lab] = other
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty folder behind

    rows = []
    for label, sp in runs.items():
        for s in sp:
            rows.append({"model": label, **{k: (list(s.shape) if k == "shape" else getattr(s, k)) for k in COLUMNS}})
    with open(out / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", *COLUMNS])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "shape": "x".join(map(str, r["shape"]))})
    allocs, outliers = _allocations(model, tok, spectra, args)
    with open(out / "layers.json", "w") as f:
        json.dump({"models": list(runs), "layers": rows, "allocation_per_block": allocs, "target": args.sparsity,
                   "owl_outlier_ratio_per_block": outliers}, f, indent=1, default=str)

    _print_tables(args, runs, spectra, allocs, outliers)
    if not args.no_plots:
        _plots(args, spec, out, runs, spectra, allocs)
    print(f"tables: {out / 'layers.csv'}, {out / 'layers.json'}  ({time.perf_counter() - t0:.1f}s)")
    return 0
