"""``prunekit sweep``: methods × allocations × calibration × sparsities → table, knees, plots, report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..registry import ALLOCATORS, METHODS
from ._tasks import add_task_args, prepare, task_settings
from ..errors import ConfigError
from .common import DatasetList, add_model_args, check_out_folder, load_from_args, setup_threads


def parse_sparsities(items: list[str]) -> list[float]:
    """``["0:0.8:0.1"]`` (start:stop:step, stop included) or ``["0", "0.5", "0.7"]``."""
    out: list[float] = []
    for item in items:
        if ":" in item:
            try:
                start, stop, step = (float(x) for x in item.split(":"))
            except ValueError:
                raise ConfigError(f"--sparsities {item!r} is not START:STOP:STEP, e.g. 0:0.8:0.1") from None
            if step <= 0 or stop < start:
                raise ConfigError(f"--sparsities {item!r}: need STEP > 0 and STOP >= START")
            n = int(round((stop - start) / step))
            out += [round(start + k * step, 6) for k in range(n + 1)]
        else:
            try:
                out.append(float(item))
            except ValueError:
                raise ConfigError(f"--sparsities {item!r} is not a number or START:STOP:STEP") from None
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="sparsity sweep with essential-sparsity knees, plots and a report",
                       description="Prune fresh copies of the dense model for every method × allocation × "
                                   "calibration source × sparsity, score every cell on the same tasks, find each "
                                   "curve's knee and write results.json/.csv, plots/*.png and report.md to --out. "
                                   "Re-running the same command resumes (finished cells are skipped).")
    add_model_args(p)
    p.add_argument("--methods", nargs="+", default=["wanda", "magnitude"], choices=METHODS.names())
    p.add_argument("--allocations", nargs="+", default=["uniform"], choices=ALLOCATORS.names())
    p.add_argument("--sparsities", nargs="+", default=["0:0.8:0.1"], metavar="S|START:STOP:STEP",
                   help="target sparsities (default 0:0.8:0.1); 0 is the dense baseline")
    p.add_argument("--calib", nargs="+", default=["austen"], metavar="DATASET", help="calibration sources (default austen)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per block forward (default 8)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--option", action="append", metavar="METHOD.K=V", help="method option, e.g. sparsegpt.percdamp=0.1")
    p.add_argument("--alloc-option", action="append", metavar="ALLOC.K=V", help="allocation option, e.g. owl.lam=0.08")
    p.add_argument("--eval", dest="eval_datasets", nargs="*", default=["wikitext2"], metavar="DATASET",
                   action=DatasetList, help="perplexity datasets (become ppl:DATASET tasks; default wikitext2; none "
                                            "to skip)")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--max-windows", type=int, default=10, help="perplexity windows (default 10)")
    add_task_args(p)
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="tolerance knee for accuracy-like metrics: absolute drop (default 0.02 = 2 points)")
    p.add_argument("--ppl-tolerance", type=float, default=0.05,
                   help="tolerance knee for perplexity: relative rise (default 0.05 = +5%%)")
    p.add_argument("--out", required=True, help="output folder (results.json/csv, plots/, report.md)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--report-only", action="store_true", help="redraw plots and report from results.json; run nothing")
    add_ray_args(p)
    p.set_defaults(func=run)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (docs/sweeps.md#ray; needs pip install 'prunekit[ray]')")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run every cell as a Ray task: alone, on a local Ray instance; with an address (auto, "
                        "HOST:PORT, ray://HOST:PORT), on that cluster. Write it after the model, or as --ray=ADDRESS")
    g.add_argument("--ray-workers", type=int, default=None,
                   help="local instance: cells at once (default: CPU cores / --ray-cpus-per-cell)")
    g.add_argument("--ray-cpus-per-cell", type=int, default=1,
                   help="CPUs each cell declares; also its torch threads unless --threads is given (default 1)")
    g.add_argument("--ray-memory-per-cell", type=float, default=None, metavar="GB",
                   help="memory each cell declares (default: 3 x the weights + calibration activations + 1 GiB)")
    g.add_argument("--ray-gpus-per-cell", type=float, default=None,
                   help="GPUs each cell declares (default: 1 with --device cuda, else 0; 0.5 puts two cells on a GPU)")


def _scoped(items: list[str] | None, names: list[str], what: str) -> dict[str, dict]:
    from ..options import parse_pairs

    out: dict[str, dict] = {}
    for key, value in parse_pairs(items, what).items():
        scope, dot, opt = key.partition(".")
        if not dot or scope not in names:
            raise ConfigError(f"{what} option {key!r} must be NAME.KEY=VALUE with NAME one of {names}")
        out.setdefault(scope, {})[opt] = value
    return out


def write_report(out: Path, data: dict, title: str | None) -> Path:
    from ..sweep.plots import markdown_report, plot_sweep

    model = data.get("signature", {}).get("model", "")
    plots = plot_sweep(data, out / "plots", title=f"{model} ({data.get('dtype', '')})")
    text = markdown_report(data, plots, "plots", title or f"Sparsity sweep: {model}")
    path = out / "report.md"
    path.write_text(text)
    return path


def run(args: argparse.Namespace) -> int:
    from ..config import CalibConfig
    from ..sweep import SweepConfig, load_results

    out = Path(args.out)
    if args.report_only:
        data = load_results(out)
        if data is None:
            raise ConfigError(f"--report-only: {out}/results.json does not exist; run the sweep first")
        print(f"report: {write_report(out, data, args.title)}")
        return 0
    setup_threads(args)
    ppl = [f"ppl:{d}" for d in args.eval_datasets]
    args.tasks = ppl + [t for t in (args.tasks or []) if t not in ppl]
    config = SweepConfig(
        methods=tuple(args.methods), allocations=tuple(args.allocations), sparsities=tuple(parse_sparsities(args.sparsities)),
        calibs=tuple(args.calib), calib=CalibConfig(args.calib[0], args.nsamples, args.seqlen, args.seed, args.batch_size),
        method_options=_scoped(args.option, args.methods, "method"),
        allocation_options=_scoped(args.alloc_option, args.allocations, "allocation"),
        tasks=tuple(args.tasks), tolerance=args.tolerance, ppl_tolerance=args.ppl_tolerance)
    settings = task_settings(args, args.eval_seqlen, args.max_windows)
    ray_run = _ray_runner(args, config, settings) if args.ray is not None else None
    tasks = prepare(args)
    check_out_folder(out)
    from ..report import environment

    command = "prunekit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("prunekit") else None
    extra = {"environment": environment(), "dtype": args.dtype, **({"command": command} if command else {})}
    if ray_run is not None:
        data = _reporting_progress(lambda on_cell: ray_run(tasks, out, extra, on_cell), out)
    else:
        from ..sweep import run_sweep

        t0 = time.perf_counter()
        model, tok = load_from_args(args)
        print(f"loaded {args.model} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
        _check_windows(model, args, config)
        data = _reporting_progress(
            lambda on_cell: run_sweep(model, tok, config, tasks, settings, out, args.model, extra, on_cell), out)
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    print(f"report: {write_report(out, data, args.title)}")
    return 0


def _check_windows(model, args: argparse.Namespace, config) -> None:
    """Windows longer than the model's context, named by their flag, before the first cell."""
    from ..eval import check_seqlen
    from ..sweep.run import needs_calibration

    if any(needs_calibration({"method": m, "allocation": a}) for m in config.methods for a in config.allocations):
        check_seqlen(model, args.seqlen, "--seqlen")
    if args.eval_datasets:
        check_seqlen(model, args.eval_seqlen, "--eval-seqlen")


def _ray_runner(args: argparse.Namespace, config, settings):
    """Check the Ray settings (and that ray is installed) before anything is loaded; return the runner."""
    from ..sweep.ray_executor import ModelSpec, RayResources, require_ray, run_sweep_ray

    require_ray()
    spec = ModelSpec(args.model, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)
    resources = RayResources(address=args.ray or None, workers=args.ray_workers, cpus_per_cell=args.ray_cpus_per_cell,
                             memory_per_cell_gb=args.ray_memory_per_cell, gpus_per_cell=args.ray_gpus_per_cell,
                             threads=args.threads)
    resources.gpus(spec)  # a CUDA cell without a GPU fails now
    where = f"the Ray cluster at {resources.address}" if resources.address else "a local Ray instance"
    print(f"running cells on {where}: {resources.cpus_per_cell} CPU(s) and {resources.threads_per_cell} torch "
          f"thread(s) per cell", flush=True)
    return lambda tasks, out, extra, on_cell: run_sweep_ray(spec, config, tasks, settings, out, resources, extra,
                                                            on_cell)


def _reporting_progress(run_sweep, out: Path) -> dict:
    """Run a sweep (``run_sweep(on_cell)``) with one line per cell; an interruption says how much was kept."""
    from ..sweep import load_results

    def on_cell(key: str, row, i: int, total: int) -> None:
        if row is None:
            print(f"[{i}/{total}] {key}: done earlier, skipped")
            return
        main = ", ".join(f"{m}={v['value']:.4g}" for m, v in row["metrics"].items() if v.get("main"))
        print(f"[{i}/{total}] {key}: sparsity {row['actual_sparsity']:.3f}, {main} "
              f"(prune {row['prune_seconds']:.0f}s, eval {row['eval_seconds']:.0f}s)", flush=True)

    try:
        return run_sweep(on_cell)
    except KeyboardInterrupt:
        data = load_results(out)
        n = len(data["rows"]) if data else 0
        print(f"interrupted; {n} finished cell(s) are saved in {out / 'results.json'}: rerun the same command "
              "to resume", file=sys.stderr)
        raise SystemExit(130) from None
