"""Sweeps on Ray: every cell (and the dense baseline) a Ray task; the driver alone writes ``results.json``.

Design (docs/sweeps.md#ray):

* **Resources.** Each task declares ``num_cpus`` (``cpus_per_cell``, default 1), ``num_gpus`` (1 when
  the device is CUDA, else 0) and ``memory`` (given, or :func:`cell_memory_bytes`: three copies of the
  weights — the one the task loads, the pruned copy, the transient of loading — plus the calibration
  activations of one block, inputs and outputs, plus 1 GiB of runtime). Ray schedules by these numbers;
  it does not enforce them.
* **Model.** Each task loads the model itself from the same spec, dtype and device (nothing big goes
  through the object store). The driver loads only the tokenizer, to draw the calibration ids once per
  calibration source; the ids and the prepared tasks are put in the object store once and shared.
* **Determinism.** A task runs :func:`~prunekit.sweep.run.run_cell` (one :func:`prunekit.pipeline.run`) /
  :func:`~prunekit.sweep.run.dense_row` — the serial code — with ``torch.set_num_threads(threads)`` fixed (default ``cpus_per_cell``), on the
  same calibration ids, so its numbers equal a serial sweep run with ``--threads`` equal to that count.
  The thread count is in the results file's signature, as it is for serial sweeps.
* **Resume.** Rows are written by the driver as tasks finish (atomically, sorted in the config's cell
  order), into the same file with the same signature checks as a serial sweep: a driver killed mid-way
  loses only the cells in flight, and a rerun — serial or Ray — skips the finished ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError
from ..eval.tasks import Task, TaskSettings
from ..formats.load import load_model, load_tokenizer, model_folder
from ..models.runtime import resolve_dtype
from .config import SweepConfig, cell_key
from .results import knees, save_results, signature_for
from .run import OnCell, add_row, calibration_for, dense_row, needs_calibration, resume_results, run_cell

log = logging.getLogger(__name__)

GIB = 1 << 30
INSTALL_HINT = "pip install 'prunekit[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line :class:`ConfigError` naming the install command."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the ray package, which is not installed: {INSTALL_HINT}") from None
    return ray


_ADDRESS = re.compile(r"^(auto|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}|ray://[A-Za-z0-9_.\-]+)$")


def ray_client_missing() -> str | None:
    """Why a ``ray://`` (Ray Client) address cannot work here — its gRPC dependency is missing — or ``None``."""
    try:
        import grpc  # noqa: F401 - what ray[client] adds to core ray
    except ImportError as e:
        return str(e)
    return None


def check_address(address: str) -> None:
    """A ``--ray`` address Ray can use: ``auto``, ``HOST:PORT`` or ``ray://HOST[:PORT]`` (with ray[client])."""
    if not _ADDRESS.match(address):
        raise ConfigError(f"--ray {address!r} is not a Ray address: give auto, HOST:PORT (e.g. 10.0.0.5:6379) or "
                          "ray://HOST:PORT, or --ray alone for a local Ray instance")
    if address.startswith("ray://"):
        why = ray_client_missing()
        if why is not None:
            raise ConfigError(f"--ray {address}: a ray:// address needs Ray Client, which is not installed ({why}): "
                              "pip install 'ray[client]', or give the cluster's HOST:PORT (GCS) address instead")


@dataclass(frozen=True)
class ModelSpec:
    """How every task loads the model: what :func:`prunekit.load_model` is given."""

    name: str
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        if str(self.device) == "auto":
            raise ConfigError("--device auto with --ray: name the workers' device (cpu or cuda); the driver's "
                              "hardware says nothing about the workers'")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device {self.device!r} is not a torch device such as cpu or cuda") from None

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


@dataclass(frozen=True)
class RayResources:
    """Where the cells run and what each one asks for.

    Attributes:
        address: a Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); ``None`` starts a local instance.
        workers: local instance only: cells at once (it gets ``workers × cpus_per_cell`` CPUs; default:
            all cores divided by ``cpus_per_cell``).
        cpus_per_cell: CPUs a cell declares (an integer).
        memory_per_cell_gb: memory a cell declares; ``None``: :func:`cell_memory_bytes`.
        gpus_per_cell: GPUs a cell declares; ``None``: 1 on CUDA, 0 on CPU (fractions share a GPU).
        threads: torch threads in each cell; ``None``: ``cpus_per_cell``.
        object_store_mb: object store of a local instance (only calibration ids and tasks go through it).
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_cell: int = 1
    memory_per_cell_gb: float | None = None
    gpus_per_cell: float | None = None
    threads: int | None = None
    object_store_mb: int = 500

    def __post_init__(self) -> None:
        if self.address is not None:
            check_address(self.address)
        for name in ("workers", "cpus_per_cell", "threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--ray-{name.replace('_', '-')}={v!r} is invalid: give a whole number >= 1")
        if self.workers is not None and self.address is not None:
            raise ConfigError(f"--ray-workers applies to a local Ray instance; the cluster at {self.address!r} has "
                              "its own nodes (drop --ray-workers, or drop the address)")
        if self.memory_per_cell_gb is not None and not self.memory_per_cell_gb > 0:
            raise ConfigError(f"--ray-memory-per-cell={self.memory_per_cell_gb!r} is invalid: give GB > 0, e.g. 4")
        if self.gpus_per_cell is not None and not self.gpus_per_cell >= 0:
            raise ConfigError(f"--ray-gpus-per-cell={self.gpus_per_cell!r} is invalid: give a number >= 0, e.g. 1")
        if self.object_store_mb < 80:
            raise ConfigError(f"object_store_mb={self.object_store_mb} is below Ray's minimum of 80 MB")

    @property
    def threads_per_cell(self) -> int:
        return self.threads or self.cpus_per_cell

    def gpus(self, spec: ModelSpec) -> float:
        gpus = self.gpus_per_cell if self.gpus_per_cell is not None else (1.0 if spec.device_type == "cuda" else 0.0)
        if spec.device_type == "cuda" and gpus <= 0:
            raise ConfigError("--device cuda with --ray-gpus-per-cell 0: a CUDA cell must declare a GPU (e.g. 1, or "
                              "0.5 to run two cells on one GPU)")
        return gpus


def cell_memory_bytes(spec: ModelSpec, config: SweepConfig) -> int:
    """The memory one cell declares when none is given (see the module docstring), from the model's
    config alone: the parameters are counted on the ``meta`` device, nothing is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_folder(spec.name), trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, trust_remote_code=spec.trust_remote_code)
    nbytes = torch.finfo(spec.torch_dtype).bits // 8
    weights = sum(p.numel() for p in meta.parameters()) * nbytes
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    acts = 2 * config.calib.nsamples * config.calib.seqlen * hidden * nbytes
    return int(3 * weights + acts + GIB)


def run_one(spec: ModelSpec, config: SweepConfig, cell: Mapping[str, Any] | None, tasks: dict[str, Task],
            settings: TaskSettings, calib: Tensor | None, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of one Ray task: load the model, run the serial code for ``cell`` (``None``: dense).

    Returns ``(row, facts)``; the facts (host, process, load time, peak RSS) are logged by the driver,
    never stored in the row, so rows stay comparable with serial ones.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's bars would interleave in the driver's output
    torch.set_num_threads(threads)
    device = "cuda" if spec.device_type == "cuda" else spec.device  # Ray exposes the GPU it assigned as cuda:0
    t0 = time.perf_counter()
    model, tok = load_model(spec.name, spec.dtype, device, spec.trust_remote_code, spec.allow_pickle)
    load_s = time.perf_counter() - t0
    if cell is None:
        row = dense_row(model, tok, tasks, settings)
    else:
        row = run_cell(model, tok, config, cell, tasks, settings, calib, spec.name)
    del model
    facts = {"host": socket.gethostname(), "pid": os.getpid(), "load_seconds": load_s, "threads": threads,
             "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return row, facts


def _connect(ray, resources: RayResources) -> bool:
    """Join the cluster or start a local instance; ``True`` when this call started (and so must stop) Ray."""
    if ray.is_initialized():
        return False
    if resources.address is not None:
        try:
            ray_init(ray, address=resources.address, log_to_driver=True)
        except (ConnectionError, ValueError) as e:  # ValueError: an address Ray itself cannot parse
            raise ConfigError(f"no Ray cluster answers at --ray {resources.address} ({e}); give the head node's "
                              "address as `ray status` on it prints it, or --ray alone for a local Ray") from None
        return True
    workers = resources.workers or max(1, (os.cpu_count() or 1) // resources.cpus_per_cell)
    ray_init(ray, address="local", num_cpus=workers * resources.cpus_per_cell, include_dashboard=False,
             object_store_memory=resources.object_store_mb << 20, log_to_driver=True)
    return True


def ray_init(ray, **kwargs) -> None:
    """``ray.init`` that keeps the caller's SIGTERM handler: Ray installs ``sys.exit`` there, which would skip
    the CLI's handling of SIGTERM like Ctrl-C ("interrupted; N finished cells are saved")."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(**kwargs)
    if before is not None:
        signal.signal(signal.SIGTERM, before)


def _check_feasible(ray, need: dict[str, float], strict: bool) -> None:
    """Fail (or warn, on a cluster that may grow) when no node can ever hold one cell: Ray would wait forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        return
    have = "; ".join(", ".join(f"{k}={_fmt(k, r.get(k, 0))}" for k in need) for r in nodes) or "none"
    msg = (f"no Ray node can run a cell: each asks for {', '.join(f'{k}={_fmt(k, v)}' for k, v in need.items())}, "
           f"the nodes have {have}; lower --ray-memory-per-cell / --ray-cpus-per-cell / --ray-gpus-per-cell, "
           "or give the instance more (--ray-workers)")
    if strict:
        raise ConfigError(msg)
    log.warning("%s (waiting: an autoscaler may add one)", msg)


def _fmt(key: str, v: float) -> str:
    return f"{v / GIB:.1f} GiB" if key == "memory" else f"{v:g}"


def _result(ray, ref):
    """``ray.get`` that re-raises a task's own exception (a ConfigError stays one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def run_sweep_ray(spec: ModelSpec, config: SweepConfig, tasks: dict[str, Task], settings: TaskSettings,
                  out_dir: str | Path, resources: RayResources = RayResources(),
                  extra: Mapping[str, Any] | None = None, on_cell: OnCell | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep with one Ray task per cell; the same file and numbers as :func:`run_sweep`.

    Args:
        spec: how each task loads the model (``spec.name`` is also the model name in the signature).
        tasks: prepared tasks (``prepare_tasks(config.tasks)``).
        resources: cluster address or local instance size, and what each cell declares.
        extra: facts to record (environment, command line).
        on_cell: called as ``on_cell(key, row_or_None_if_skipped, i, total)``, ``i`` counting finished cells.
    """
    if list(tasks) != list(config.tasks):
        raise ValueError(f"prepared tasks {list(tasks)} differ from the sweep's tasks {list(config.tasks)}")
    ray = require_ray()
    gpus = resources.gpus(spec)
    sig = signature_for(spec.name, spec.torch_dtype, spec.device_type, resources.threads_per_cell, config, settings)
    data, _ = resume_results(out_dir, sig, config, extra)
    done = {r["key"] for r in data["rows"]}
    todo: list[Mapping[str, Any] | None] = ([None] if "dense" not in done else []) + [
        c for c in config.cells() if cell_key(c) not in done]
    total, finished = len(config.cells()) + 1, 0
    notify = on_cell or (lambda *a: None)
    for key in ["dense"] + [cell_key(c) for c in config.cells()]:
        if key in done:
            finished += 1
            notify(key, None, finished, total)
    if todo:
        mem = int(resources.memory_per_cell_gb * GIB) if resources.memory_per_cell_gb else cell_memory_bytes(spec, config)
        need = {"CPU": float(resources.cpus_per_cell), "memory": float(mem), **({"GPU": gpus} if gpus else {})}
        data["ray"] = {"address": resources.address or "local", "cpus_per_cell": resources.cpus_per_cell,
                       "gpus_per_cell": gpus, "memory_per_cell_gb": round(mem / GIB, 2),
                       "memory_derived": resources.memory_per_cell_gb is None,
                       "threads_per_cell": resources.threads_per_cell}
        calibs = _calibrations(spec, config, todo, settings)
        with contextlib.closing(_completed(ray, spec, config, todo, tasks, settings, calibs, resources, need)) as rows:
            for key, row, facts in rows:
                data["ray"]["worker_peak_rss_mb"] = max(data["ray"].get("worker_peak_rss_mb", 0.0),
                                                        facts["worker_peak_rss_mb"])
                add_row(out_dir, data, config, row)
                finished += 1
                notify(key, row, finished, total)
    data["knees"] = knees(data, config)
    save_results(out_dir, data)
    return data


def _completed(ray, spec: ModelSpec, config: SweepConfig, todo: list, tasks: dict[str, Task], settings: TaskSettings,
               calibs: dict[str, Tensor], resources: RayResources, need: dict[str, float]):
    """Submit every cell, then yield ``(key, row, facts)`` as each finishes.

    Closing the generator early (the driver fails or is interrupted) cancels the cells in flight and
    stops a Ray instance this call started.
    """
    owned = _connect(ray, resources)
    pending: dict[Any, str] = {}
    try:
        _check_feasible(ray, need, strict=owned and resources.address is None)
        pending = _submit(ray, spec, config, todo, tasks, settings, calibs, resources.threads_per_cell, need)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            row, facts = _result(ray, ready[0])
            log.info("%s done on %s (pid %d): model loaded in %.1fs, worker peak RSS %.0f MB", key, facts["host"],
                     facts["pid"], facts["load_seconds"], facts["worker_peak_rss_mb"])
            yield key, row, facts
    finally:
        _abandon(ray, list(pending))
        if owned:
            ray.shutdown()


def _abandon(ray, refs: list) -> None:
    """Cancel the cells still in flight (the driver is leaving: they are lost, not left running), and take
    their outcome so that Ray does not print the errors of abandoned tasks at exit."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - cancelled or failed: either way the cell is redone by a rerun
            pass


def _calibrations(spec: ModelSpec, config: SweepConfig, todo: list, settings: TaskSettings) -> dict[str, Tensor]:
    """Calibration ids per source, drawn once on the driver (with the tokenizer alone) for the cells to run."""
    cells = [c for c in todo if c is not None and needs_calibration(c)]
    if not cells:
        return {}
    tok = load_tokenizer(spec.name, spec.trust_remote_code)
    cache: dict[str, Tensor] = {}
    for cell in cells:
        calibration_for(config, cell, tok, settings, cache)
    return cache


def _submit(ray, spec: ModelSpec, config: SweepConfig, todo: list, tasks: dict[str, Task], settings: TaskSettings,
            calibs: dict[str, Tensor], threads: int, need: dict[str, float]) -> dict[Any, str]:
    """One task per cell, in cell order; ``{ObjectRef: key}``. Shared inputs go into the object store once."""
    remote = ray.remote(run_one).options(num_cpus=need["CPU"], num_gpus=need.get("GPU", 0), memory=int(need["memory"]))
    tasks_ref = ray.put(tasks)
    calib_refs = {name: ray.put(ids) for name, ids in calibs.items()}
    pending = {}
    for cell in todo:
        calib = calib_refs.get(cell["calib"]) if cell is not None and needs_calibration(cell) else None
        ref = remote.remote(spec, config, cell, tasks_ref, settings, calib, threads)
        pending[ref] = "dense" if cell is None else cell_key(cell)
    return pending
