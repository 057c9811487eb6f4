"""Ray sweep vs serial sweep on SmolLM2-135M: wall time, identical numbers, a killed driver resumed.

Writes ``benchmarks/results/scale_ray.md`` and ``.json``. Heavy (~15 min on the shared 2-core CPU)::

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_ray_sweep.py

Every run is the real ``prunekit sweep`` command in a subprocess, timed end to end (imports, model or
worker start-up, every cell, report):

1. serial, ``--threads 1`` — the reference numbers;
2. serial, ``--threads 2`` — the same two cores as the Ray run, for the wall-time comparison;
3. ``--ray --ray-workers 2`` (1 CPU and 1 torch thread per cell) — its results must equal run 1's;
4. the same Ray command SIGKILLed once ``--kill-after`` rows are saved, then rerun: how many cells
   were kept, how many redone, and the final file must again equal run 1's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--dtype", "float32", "--methods", "wanda", "magnitude", "--sparsities", "0", "0.5", "0.7", "--calib", "austen",
         "--nsamples", "2", "--seqlen", "64", "--eval", "wikitext2", "--eval-seqlen", "64", "--max-windows", "1"]
SWEEP = ["--dtype", "float32", "--methods", "wanda", "magnitude", "--sparsities", "0", "0.3", "0.5", "0.7",
         "--calib", "austen", "--nsamples", "8", "--seqlen", "512", "--batch-size", "8", "--seed", "0",
         "--eval", "wikitext2", "--eval-seqlen", "512", "--max-windows", "4"]


def prunekit() -> str:
    exe = shutil.which("prunekit")
    if exe is None:
        raise SystemExit("the prunekit command is not on PATH (pip install -e .)")
    return exe


def run(argv: list[str], log: Path) -> tuple[float, str]:
    """Run one command to the end; ``(wall seconds, stdout)``."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}); see {log}")
    return wall, p.stdout


def numbers(out: Path) -> list:
    """Every row's key, actual sparsity and metrics, in file order: what must be identical."""
    data = json.loads((out / "results.json").read_text())
    return [(r["key"], r["actual_sparsity"], r["metrics"]) for r in data["rows"]]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), to see whether a killed driver's Ray instance goes away."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_and_resume(argv: list[str], out: Path, kill_after: int, logs: Path) -> dict:
    """Start the Ray sweep, SIGKILL its driver once ``kill_after`` rows are saved, wait for its Ray
    processes to go, rerun the same command and count what was skipped and redone."""
    results = out / "results.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=(logs / "killed.log").open("w"), stderr=subprocess.STDOUT)
    rows = 0
    while rows < kill_after:
        if proc.poll() is not None:
            raise SystemExit(f"the Ray sweep ended before {kill_after} rows; see {logs / 'killed.log'}")
        time.sleep(0.5)
        try:
            rows = len(json.loads(results.read_text())["rows"]) if results.exists() else 0
        except json.JSONDecodeError as e:  # never expected: the file is replaced atomically
            raise SystemExit(f"{results} was read half-written: {e}") from None
    ray_pids = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - t0
    kept = len(json.loads(results.read_text())["rows"])
    t1 = time.perf_counter()
    while any(alive(p) for p in ray_pids) and time.perf_counter() - t1 < 180:
        time.sleep(1)
    left = [p for p in ray_pids if alive(p)]
    gone_s = time.perf_counter() - t1
    for p in left:  # our own grandchildren: do not leave them on a shared machine
        os.kill(p, signal.SIGKILL)
    wall, stdout = run(argv, logs / "resumed.log")
    new = [line for line in stdout.splitlines() if line.startswith("[") and "done earlier" not in line]
    return {"killed_after_s": round(killed_at, 1), "rows_saved_at_kill": kept,
            "ray_processes_of_killed_driver": len(ray_pids), "seconds_until_they_exited": round(gone_s, 1),
            "left_after_180s_and_killed": len(left), "resume_wall_s": round(wall, 1),
            "skipped_on_resume": stdout.count("done earlier, skipped"), "redone_on_resume": len(new),
            "resumed_equals_serial": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kill-after", type=int, default=3, help="rows saved before the driver is killed")
    ap.add_argument("--work", default="/tmp/prunekit-bench-ray", help="scratch folder for the runs' outputs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale_ray"))
    ap.add_argument("--quick", action="store_true", help="check the script itself: tiny settings, output in --work")
    args = ap.parse_args()
    if args.quick:
        args.out = str(Path(args.work) / "quick")
    os.environ.setdefault("PRUNEKIT_DATA", str(REPO.parent / "shared" / "data"))
    import ray
    import torch
    import transformers

    from prunekit.report import environment

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    base = [prunekit(), "sweep", args.model, *(QUICK if args.quick else SWEEP)]
    commands = {"serial_threads1": base + ["--threads", "1"], "serial_threads2": base + ["--threads", "2"],
                "ray_2_workers": base + ["--ray", "--ray-workers", "2"]}
    load = {"start": os.getloadavg()}
    runs = {}
    for name, argv in commands.items():
        wall, _ = run(argv + ["--out", str(work / name)], work / f"{name}.log")
        data = json.loads((work / name / "results.json").read_text())
        runs[name] = {"wall_s": round(wall, 1), "cells": len(data["rows"]),
                      "sum_of_cell_seconds": round(sum(r["prune_seconds"] + r["eval_seconds"] for r in data["rows"]), 1),
                      "signature_threads": data["signature"]["threads"], **({"ray": data["ray"]} if "ray" in data else {})}
        print(f"{name}: {wall:.1f}s", flush=True)
    ref = numbers(work / "serial_threads1")
    same = numbers(work / "ray_2_workers") == ref
    if not same:
        raise SystemExit("the Ray results differ from the serial ones: not recording a benchmark of a wrong result")
    kill = kill_and_resume(commands["ray_2_workers"] + ["--out", str(work / "ray_killed")], work / "ray_killed",
                           args.kill_after, work)
    kill["resumed_equals_serial"] = numbers(work / "ray_killed") == ref
    if not kill["resumed_equals_serial"]:
        raise SystemExit("the resumed Ray results differ from the serial ones")
    load["end"] = os.getloadavg()
    serial2_same = numbers(work / "serial_threads2") == ref
    record = {"commands": {k: " ".join(["prunekit", *v[1:]]) + " --out OUT" for k, v in commands.items()},
              "runs": runs, "ray_equals_serial_threads1": same, "serial_threads2_equals_threads1": serial2_same,
              "kill_and_resume": kill, "rows": [{"key": k, "actual_sparsity": s,
                                                 "ppl": m["ppl:wikitext2/ppl"]["value"]} for k, s, m in ref],
              "environment": {**environment(), "cores": os.cpu_count(), "ray": ray.__version__,
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "load_average_1_5_15": load, "commit": _commit()}}
    out = Path(args.out)
    write_results(out.with_suffix(""), record, markdown)
    print(f"wrote {out.with_suffix('.md')}")


def _commit() -> str:
    p = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "?"


def markdown(r: dict) -> str:
    env, runs, k = r["environment"], r["runs"], r["kill_and_resume"]
    ray = runs["ray_2_workers"]["ray"]
    lines = ["# Sweeps on Ray vs serial (SmolLM2-135M)", "",
             "Made by `flock /tmp/prunekit-heavy.lock python benchmarks/bench_ray_sweep.py`; each run is the real "
             "command below in a subprocess, timed end to end (start-up, every cell, report).", "",
             f"- machine: {env['processor']}, {env['cores']} cores shared with other jobs (load average "
             f"{', '.join(f'{x:.1f}' for x in env['load_average_1_5_15']['start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in env['load_average_1_5_15']['end'])} at the end)",
             f"- versions: prunekit {env['prunekit']} ({env['commit']}), torch {env['torch']}, transformers "
             f"{env['transformers']}, ray {env['ray']}, Python {env['python']}",
             f"- sweep: {len(r['rows'])} rows (dense + {len(r['rows']) - 1} pruned cells)", ""]
    lines += ["| run | command (+ `--out OUT`) | wall time | sum of cell times | threads in signature |",
              "|---|---|---|---|---|"]
    for name, v in runs.items():
        lines.append(f"| {name} | `{r['commands'][name]}` | {v['wall_s']:.0f} s | {v['sum_of_cell_seconds']:.0f} s "
                     f"| {v['signature_threads']} |")
    lines += ["", f"- Ray results file equal to serial `--threads 1` in numbers (every key, actual sparsity, metric "
              f"value, stderr, n): **{r['ray_equals_serial_threads1']}** (checked in the script)",
              f"- serial `--threads 2` equal to serial `--threads 1`: {r['serial_threads2_equals_threads1']} (a different "
              "thread count is a different signature: the two files cannot resume each other)",
              f"- Ray resources per cell: {ray['cpus_per_cell']} CPU, {ray['threads_per_cell']} torch thread, "
              f"{ray['memory_per_cell_gb']} GiB memory declared ({'derived: 3 x weights + calibration activations + 1 GiB' if ray['memory_derived'] else 'given'}); "
              f"largest worker peak RSS measured: {ray.get('worker_peak_rss_mb', 0):.0f} MB", "",
              "## Kill the driver mid-way, rerun", "",
              f"The Ray command was SIGKILLed {k['killed_after_s']:.0f} s in, when {k['rows_saved_at_kill']} of "
              f"{len(r['rows'])} rows were saved; the cells in flight were lost. Its local Ray instance "
              f"({k['ray_processes_of_killed_driver']} processes) was gone {k['seconds_until_they_exited']:.0f} s later "
              f"({k['left_after_180s_and_killed']} left after 180 s). The same command rerun: "
              f"{k['skipped_on_resume']} rows skipped, {k['redone_on_resume']} cells run, {k['resume_wall_s']:.0f} s; "
              f"final file equal to serial: **{k['resumed_equals_serial']}**.", "",
              "## Numbers (identical in the serial `--threads 1`, Ray and resumed Ray files)", "", "| cell | actual sparsity | wikitext2 ppl |", "|---|---|---|"]
    cell = {row["key"]: row["key"].replace("|", " / ") for row in r["rows"]}  # a "|" would split the table cell
    lines += [f"| {cell[row['key']]} | {row['actual_sparsity']:.4f} | {row['ppl']:.4f} |" for row in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
