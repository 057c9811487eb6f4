"""``prunekit.pipeline.run`` from Python: the CLI's prune sequence as one library call."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.config import CalibConfig, PruneConfig
from prunekit.errors import ConfigError
from prunekit.families import ActivationSparsityConfig, SparseConfig
from prunekit.formats import load_model
from prunekit.pipeline import Events, RunSpec, run


def _spec(folder, prose, out_dir, **over) -> RunSpec:
    calib = CalibConfig(dataset=str(prose), nsamples=2, seqlen=32)
    kw = dict(compression=PruneConfig(method="wanda", sparsity=0.5, calib=calib), eval_datasets=(str(prose),),
              max_windows=2, out=str(out_dir))
    return RunSpec(str(folder), **{**kw, **over})


def test_in_memory_and_streamed_runs_save_the_same_weights(tiny3_folder, prose_file, tmp_path):
    mem = run(_spec(tiny3_folder, prose_file, tmp_path / "mem", offload="none"))
    disk = run(_spec(tiny3_folder, prose_file, tmp_path / "disk", offload="disk"))
    assert not mem.streamed and disk.streamed and disk.model is None
    assert mem.saved == tmp_path / "mem" and disk.saved == tmp_path / "disk"
    a, _ = load_model(str(mem.saved))
    b, _ = load_model(str(disk.saved))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert mem.report.sparsity == pytest.approx(0.5, abs=0.01) and disk.report.sparsity == mem.report.sparsity
    ds = str(prose_file)
    assert mem.compressed[ds].ppl == pytest.approx(disk.compressed[ds].ppl, rel=1e-5)
    assert mem.dense[ds].ppl == pytest.approx(disk.dense[ds].ppl, rel=1e-5)
    saved = json.loads((disk.saved / "prunekit_report.json").read_text())
    assert saved["extra"]["offload"] == "disk" and set(saved["evaluation"]) == {"dense", "pruned"}


def test_a_family_config_runs_and_the_events_come_in_order(tiny_folder, prose_file, tmp_path):
    seen = []

    class Recorder(Events):
        def loaded(self, spec, model, seconds):
            seen.append("loaded")

        def perplexity(self, model, tokenizer, spec, label, token_cache):
            seen.append(f"perplexity {label}")
            return super().perplexity(model, tokenizer, spec, label, token_cache)

        def evaluated(self, result):
            seen.append("evaluated")

        def saved(self, out, how):
            seen.append("saved")

    calib = CalibConfig(dataset=str(prose_file), nsamples=2, seqlen=32)
    spec = _spec(tiny_folder, prose_file, tmp_path / "o", compression=SparseConfig(method="magnitude", sparsity=0.5,
                                                                                   calib=calib),
                 dense_eval=False, report_json=tmp_path / "r.json", offload="none")
    result = run(spec, Recorder())
    assert seen == ["loaded", "perplexity pruned", "evaluated", "saved"]
    assert result.dense == {} and result.report.method == "magnitude"
    assert json.loads((tmp_path / "r.json").read_text())["evaluation"]["pruned"][str(prose_file)]["ppl"] == \
        pytest.approx(result.compressed[str(prose_file)].ppl)
    assert result.model is not None and result.report.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("over, needle", [
    ({"offload": "sometimes"}, "offload='sometimes' is not one of"),
    ({"save_format": "zip"}, "save_format='zip' is not one of"),
    ({"compression": None}, "nothing to do"),
    ({"max_windows": 0}, "--max-windows=0 must be >= 1"),
])
def test_a_bad_spec_fails_in_one_line_when_it_is_made(tiny_folder, prose_file, tmp_path, over, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _spec(tiny_folder, prose_file, tmp_path / "o", **over)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over, needle", [
    ({"compression": PruneConfig(method="magnitude", pattern="channels", sparsity=0.3), "offload": "disk"},
     "reshapes the model as a whole"),
    ({"report_json": "/nonexistent-folder/r.json"}, "does not exist"),
    ({"eval_datasets": ("no-such-dataset",)}, "no-such-dataset"),
    ({"offload": "disk", "out": None}, "give --out"),
    ({"tasks": ("no-such-task",)}, "unknown task"),
])
def test_a_bad_spec_fails_in_one_line_before_any_weight_loads(tiny_folder, prose_file, tmp_path, no_weights, over,
                                                             needle):
    with pytest.raises(ConfigError, match=needle) as e:
        run(_spec(tiny_folder, prose_file, tmp_path / "o", **over))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a model already in memory (what a sweep cell gives)

def _loaded():
    tok = tiny_tokenizer(320)
    return tiny_model("llama", vocab_size=len(tok)), tok


def test_a_spec_with_a_loaded_model_is_checked_when_made():
    model, tok = _loaded()
    cfg = SparseConfig(method="magnitude", sparsity=0.5)
    with pytest.raises(ConfigError, match="a loaded model needs its tokenizer"):
        RunSpec(model, compression=cfg)
    with pytest.raises(ConfigError, match="already in memory: use offload='none'"):
        RunSpec(model, compression=cfg, tokenizer=tok, offload="disk")
    with pytest.raises(ConfigError, match="tokenizer= goes with a loaded model"):
        RunSpec("smollm2-135m", compression=cfg, tokenizer=tok)
    with pytest.raises(ConfigError, match="calib_ids are the weight compression's calibration"):
        RunSpec(model, tokenizer=tok, activation=ActivationSparsityConfig(),
                calib_ids=torch.zeros(1, 4, dtype=torch.long))
    spec = RunSpec(model.to(torch.bfloat16), compression=cfg, tokenizer=tok, tasks={})
    assert spec.loaded and spec.dtype == "bfloat16" and spec.source is None and spec.tasks == {}


def test_a_loaded_model_is_compressed_in_place_scored_saved_and_reported(prose_file, tmp_path):
    model, tok = _loaded()
    res = run(RunSpec(model, compression=SparseConfig(method="magnitude", sparsity=0.5), tokenizer=tok,
                      model_name="tiny", eval_datasets=(str(prose_file),), eval_seqlen=32, max_windows=2,
                      out=tmp_path / "out"))
    assert res.model is model and res.report.extra["model"] == "tiny" and res.report.extra["dtype"] == "float32"
    assert res.dense and res.compressed and (tmp_path / "out" / "config.json").is_file()
    assert set(res.seconds) == {"compress", "evaluate"}  # nothing was loaded
