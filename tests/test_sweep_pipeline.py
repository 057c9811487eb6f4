"""A sweep cell is one ``prunekit.pipeline.run``: a loaded model, calibration ids drawn once, tasks prepared
once, nothing loaded, drawn, prepared or saved per cell — and the same row as pruning and scoring directly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit import api
from prunekit.config import CalibConfig
from prunekit.data import calibration_ids
from prunekit.eval.tasks import TaskSettings, prepare_tasks, run_tasks
from prunekit.sweep import SweepConfig, run_cell
from prunekit.sweep.results import metric_values
from prunekit.sweep.run import prune_config


@pytest.fixture
def cell_setup(prose_file, tmp_path):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": c, "choices": ["fox", "dog"], "label": i % 2})
                            for i, c in enumerate(["the quick brown", "the lazy", "It is a"])) + "\n")
    cfg = SweepConfig(methods=("wanda",), sparsities=(0.0, 0.5), calibs=(str(prose_file),),
                      calib=CalibConfig(str(prose_file), nsamples=2, seqlen=16, batch_size=2),
                      tasks=(f"ppl:{prose_file}", f"mc:{mc}"))
    settings = TaskSettings(batch_size=2, ppl_seqlen=32, ppl_max_windows=2)
    tasks = prepare_tasks(list(cfg.tasks))
    cell = cfg.cells()[0]
    calib = calibration_ids(prune_config(cfg, cell).calib, tok)
    return model, tok, cfg, cell, tasks, settings, calib


def test_a_cell_is_one_pipeline_run_that_loads_draws_prepares_and_saves_nothing(cell_setup, monkeypatch):
    import prunekit.families.base as family_base
    import prunekit.formats as formats
    import prunekit.eval.tasks as task_mod
    import prunekit.sweep.run as sweep_mod

    model, tok, cfg, cell, tasks, settings, calib = cell_setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    specs = []
    from prunekit.pipeline import run as real_run


    def recording_run(spec, events=None):
        specs.append(spec)
        return real_run(spec, events)

    monkeypatch.setattr(sweep_mod, "run", recording_run)
    for mod, name in [(formats, "load_model"), (formats, "save_with_thresholds"), (formats, "save_folder"),
                      (family_base, "calibration_ids"), (task_mod, "prepare_tasks")]:
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"a sweep cell called {_n}"))
    row = run_cell(model, tok, cfg, cell, tasks, settings, calib, "tiny")
    assert len(specs) == 1
    spec = specs[0]
    assert spec.loaded and spec.model is not model and spec.tokenizer is tok and spec.calib_ids is calib
    assert spec.tasks is tasks and spec.out is None and not spec.dense_eval and spec.name == "tiny"
    assert row["key"] == "wanda|uniform|" + cell["calib"] + "|0.5000" and row["actual_sparsity"] == pytest.approx(0.5)
    assert row["prune_seconds"] > 0 and row["eval_seconds"] > 0
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())  # the dense model is untouched


def test_the_row_is_what_pruning_and_scoring_directly_gives(cell_setup):
    """What run_cell did before it went through the pipeline: prune a copy, score the tasks."""
    model, tok, cfg, cell, tasks, settings, calib = cell_setup
    row = run_cell(model, tok, cfg, cell, tasks, settings, calib)
    work = copy.deepcopy(model)
    report = api.prune(work, prune_config(cfg, cell), calib=calib, tokenizer=tok, data_dir=settings.data_dir)
    direct = run_tasks(work, tok, tasks, settings)
    assert row["actual_sparsity"] == report.sparsity
    assert json.dumps(row["metrics"]) == json.dumps(metric_values(direct))
