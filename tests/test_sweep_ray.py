"""Sweeps on Ray: the same results file and numbers as the serial sweep, resume after the driver dies,
resources declared per cell, and a one-line error without ray.

One local Ray instance (2 CPUs) serves the whole module; tests that need it skip when ray is absent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, save_tiny
from prunekit.cli import main
from prunekit.config import CalibConfig
from prunekit.errors import ConfigError
from prunekit.eval.tasks import TaskSettings, prepare_tasks
from prunekit.sweep import SweepConfig, run_sweep
from prunekit.sweep.ray_executor import ModelSpec, RayResources, _check_feasible, cell_memory_bytes, run_sweep_ray

TEXT = "the quick brown fox jumps over the lazy dog. It is a truth universally acknowledged. " * 60


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; its GCS address lets a second driver (a subprocess) join it."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, its data, and a sweep of 4 pruned cells + dense (2 methods x 2 sparsities)."""
    d = tmp_path_factory.mktemp("ray")
    folder = save_tiny(d / "tiny-llama")
    text = d / "t.txt"
    text.write_text(TEXT)
    mc = d / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": c, "choices": ["fox", "dog"], "label": i % 2})
                            for i, c in enumerate(["the quick brown", "the lazy", "It is a"])) + "\n")
    cfg = SweepConfig(methods=("magnitude", "wanda"), sparsities=(0.0, 0.3, 0.6), calibs=(str(text),),
                      calib=CalibConfig(str(text), nsamples=2, seqlen=16),
                      tasks=(f"ppl:{text}", f"mc:{mc}"))
    return d, str(folder), cfg, TaskSettings(ppl_seqlen=32, ppl_max_windows=2)  # what the CLI test's flags give


def _serial(model_dir: str, cfg: SweepConfig, settings: TaskSettings, out) -> dict:
    """The serial sweep with one torch thread, as every Ray cell runs by default."""
    from prunekit import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(model_dir)
        return run_sweep(model, tok, cfg, prepare_tasks(list(cfg.tasks)), settings, out, model_dir)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def serial(setup):
    d, folder, cfg, settings = setup
    return _serial(folder, cfg, settings, d / "serial")


def numbers(data: dict) -> list:
    """What must be identical: every row's key, actual sparsity and every metric (value, stderr, n), in file order."""
    return [(r["key"], r["actual_sparsity"], r["metrics"], {k: t["n"] for k, t in r["tasks"].items()})
            for r in data["rows"]]


def test_ray_sweep_writes_the_serial_results(ray_local, setup, serial, tmp_path):
    d, folder, cfg, settings = setup
    seen = []
    data = run_sweep_ray(ModelSpec(folder), cfg, prepare_tasks(list(cfg.tasks)), settings, tmp_path / "sw",
                         on_cell=lambda key, row, i, n: seen.append((key, row is not None, i, n)))
    assert len(data["rows"]) == 5 and data["rows"][0]["key"] == "dense"
    assert numbers(data) == numbers(serial)
    stored = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert numbers(stored) == numbers(json.loads((d / "serial" / "results.json").read_text()))
    assert stored["signature"] == serial["signature"] and stored["signature"]["threads"] == 1
    assert stored["knees"] == serial["knees"]
    assert sorted(k for k, *_ in seen) == sorted(r["key"] for r in serial["rows"])
    assert [i for *_, i, _ in seen] == [1, 2, 3, 4, 5] and all(new for _, new, *_ in seen)
    assert stored["ray"]["cpus_per_cell"] == 1 and stored["ray"]["worker_peak_rss_mb"] > 100


def test_interrupted_ray_sweep_resumes_to_the_serial_results(ray_local, setup, serial, tmp_path):
    _, folder, cfg, settings = setup
    out, tasks = tmp_path / "sw", prepare_tasks(list(cfg.tasks))

    def die_after_two(key, row, i, n):
        if i == 2:
            raise KeyboardInterrupt  # the driver goes away with cells still in flight

    with pytest.raises(KeyboardInterrupt):
        run_sweep_ray(ModelSpec(folder), cfg, tasks, settings, out, on_cell=die_after_two)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 2
    seen = []
    data = run_sweep_ray(ModelSpec(folder), cfg, tasks, settings, out,
                         on_cell=lambda key, row, i, n: seen.append(row is not None))
    assert seen.count(False) == 2 and seen.count(True) == 3  # only the 3 missing cells ran again
    assert numbers(data) == numbers(serial)
    # and a serial rerun accepts the Ray file as its own: nothing left to do
    resumed = _serial(folder, cfg, settings, out)
    assert numbers(resumed) == numbers(serial)


def test_killed_cli_driver_resumes_and_matches_the_serial_sweep(ray_local, setup, serial, tmp_path, capsys):
    d, folder, _, _ = setup
    argv = ["sweep", folder, "--methods", "magnitude", "wanda", "--sparsities", "0", "0.3", "0.6", "--calib",
            str(d / "t.txt"), "--nsamples", "2", "--seqlen", "16", "--eval", str(d / "t.txt"), "--eval-seqlen", "32",
            "--max-windows", "2", "--tasks", f"mc:{d / 'mc.jsonl'}"]
    out = tmp_path / "ray"
    # a second driver joins the module's instance by address; after its first row it stalls and is SIGKILLed
    code = ("import sys, time, prunekit.sweep.ray_executor as rx\n"
            "real = rx.add_row\n"
            "def stall(*a, **k):\n    real(*a, **k)\n    print('row', flush=True)\n    time.sleep(120)\n"
            "rx.add_row = stall\n"
            "from prunekit.cli import main\n"
            f"sys.exit(main({argv + ['--ray=' + ray_local, '--out', str(out)]!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        lines = iter(proc.stdout.readline, "")
        assert next(line for line in lines if line == "row\n" or line.startswith("Traceback")) == "row\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1
    capsys.readouterr()
    assert main(argv + ["--ray", "--out", str(out)]) == 0  # joins the running instance; skips the saved cell
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 1 and "[5/5]" in printed
    ray_data = json.loads((out / "results.json").read_text())
    assert numbers(ray_data) == numbers(serial) and ray_data["signature"] == serial["signature"]
    assert (out / "report.md").is_file()


def test_a_failing_cell_raises_its_own_error(ray_local, setup, tmp_path):
    d, folder, _, settings = setup
    cfg = SweepConfig(methods=("magnitude",), sparsities=(0.0, 0.5), calibs=(str(d / "t.txt"),),
                      tasks=(f"ppl:{d / 't.txt'}",))
    missing = str(tmp_path / "gone")
    # the driver needs no model when the memory is given and nothing calibrates: the workers find it missing
    with pytest.raises(FileNotFoundError, match="gone"):
        run_sweep_ray(ModelSpec(missing), cfg, prepare_tasks(list(cfg.tasks)), settings, tmp_path / "sw",
                      RayResources(memory_per_cell_gb=0.5))
    assert not (tmp_path / "sw" / "results.json").exists()  # nothing finished, nothing written


def test_ray_flag_without_ray_is_one_line(setup, tmp_path, capsys, monkeypatch):
    _, folder, _, _ = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    rc = main(["sweep", folder, "--methods", "magnitude", "--sparsities", "0", "0.5", "--ray", "--out",
               str(tmp_path / "sw")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.endswith("--ray needs the ray package, which is not installed: pip install 'prunekit[ray]'")
    assert not (tmp_path / "sw").exists()


def test_resources_declared_per_cell(setup):
    _, folder, cfg, _ = setup
    assert RayResources().gpus(ModelSpec(folder)) == 0 and RayResources().gpus(ModelSpec(folder, device="cuda")) == 1
    assert RayResources(gpus_per_cell=0.5).gpus(ModelSpec(folder, device="cuda:1")) == 0.5
    with pytest.raises(ConfigError, match="must declare a GPU"):
        RayResources(gpus_per_cell=0).gpus(ModelSpec(folder, device="cuda"))
    with pytest.raises(ConfigError, match="--device auto with --ray"):
        ModelSpec(folder, device="auto")
    with pytest.raises(ConfigError, match="--ray-workers applies to a local Ray instance"):
        RayResources(address="auto", workers=2)
    with pytest.raises(ConfigError, match=r"--ray-cpus-per-cell=0 is invalid"):
        RayResources(cpus_per_cell=0)
    assert RayResources(cpus_per_cell=2).threads_per_cell == 2 and RayResources(threads=3).threads_per_cell == 3
    # derived memory: 3 x fp32 weights + 2 x calibration activations + 1 GiB, from the config alone
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    assert cell_memory_bytes(ModelSpec(folder), cfg) == 3 * 4 * n_params + 2 * 2 * 16 * 64 * 4 + (1 << 30)
    assert cell_memory_bytes(ModelSpec(folder, dtype="bf16"), cfg) == 3 * 2 * n_params + 2 * 2 * 16 * 64 * 2 + (1 << 30)


def test_ray_init_keeps_the_callers_sigterm_handler():
    from prunekit.sweep.ray_executor import ray_init

    class FakeRay:  # what ray.init does to the handler (ray/_private/worker.py: sigterm_handler -> sys.exit)
        def init(self, **kwargs):
            self.kwargs = kwargs
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    try:
        fake = FakeRay()
        ray_init(fake, address="local", num_cpus=2)
        assert signal.getsignal(signal.SIGTERM) is ours and fake.kwargs == {"address": "local", "num_cpus": 2}
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_cell_no_node_can_hold_is_refused(ray_local):
    import ray

    with pytest.raises(ConfigError, match=r"no Ray node can run a cell: each asks for CPU=64, memory=4096.0 GiB"):
        _check_feasible(ray, {"CPU": 64.0, "memory": 4096.0 * (1 << 30)}, strict=True)
    _check_feasible(ray, {"CPU": 1.0, "memory": float(1 << 20)}, strict=True)  # fits: no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ray_sweep_on_cuda_declares_a_gpu_and_matches_serial(ray_local, setup, tmp_path):
    from prunekit import load_model

    _, folder, cfg, settings = setup
    tasks = prepare_tasks(list(cfg.tasks))
    data = run_sweep_ray(ModelSpec(folder, device="cuda"), cfg, tasks, settings, tmp_path / "ray")
    assert data["ray"]["gpus_per_cell"] == 1 and data["signature"]["device"] == "cuda"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(folder, device="cuda")
        serial = run_sweep(model, tok, cfg, prepare_tasks(list(cfg.tasks)), settings, tmp_path / "serial", folder)
    finally:
        torch.set_num_threads(before)
    assert numbers(data) == numbers(serial)


def test_an_unreachable_cluster_address_is_one_line_naming_it():
    from prunekit.sweep.ray_executor import _connect

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    with pytest.raises(ConfigError, match=r"no Ray cluster answers at --ray 10\.0\.0\.9:6379 .*--ray alone"):
        _connect(FakeRay, RayResources(address="10.0.0.9:6379"))
