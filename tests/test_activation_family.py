"""Activation sparsity as a compression family: ``prunekit.compress(model, ActivationSparsityConfig(...))``.

Dispatch by type, one-line validation, the report's ``extra["activation"]``, layering on a weight family,
the thresholds saved and reloaded through the registered format, and the pipeline's two ways in.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from conftest import rand_ids, tiny_model, tiny_tokenizer
import prunekit
from prunekit import ActivationSparsityConfig, SparseConfig, compress
from prunekit.errors import ConfigError
from prunekit.families import ActivationFamily, prepare
from prunekit.models.activation import state_of


def _cfg(**kw) -> ActivationSparsityConfig:
    return ActivationSparsityConfig(**{"sparsity": 0.4, "max_tokens": 256, **kw})


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make,match", [
    (lambda: _cfg(sparsity=1.5), r"activation sparsity=1.5 is out of range: it must be a fraction in \[0, 1\)"),
    (lambda: _cfg(sparsity=True), "activation sparsity=True is out of range"),
    (lambda: _cfg(method="nope"), "nope"),
    (lambda: _cfg(allocation="owl"), "activation allocation='owl' is unknown; choose uniform or greedy"),
    (lambda: _cfg(method="cats", allocation="greedy"), "works with method teal or wina, not 'cats'"),
    (lambda: _cfg(max_tokens=3), "activation max_tokens=3 is invalid"),
    (lambda: _cfg(greedy_step=0.0), r"activation greedy_step=0.0 is out of range: it must be in \(0, 0.5\]"),
    (lambda: _cfg(include=("(",)), r"activation include regex '\(' is invalid"),
])
def test_the_config_fails_in_one_line_naming_value_and_fix(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_compress_dispatches_to_the_activation_family_as_sparsify_activations_does():
    ids = rand_ids(4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    before = _weights(a)
    assert type(prepare(_cfg(method="chess"))) is ActivationFamily
    report = compress(a, _cfg(method="chess"), calib=ids)
    state = prunekit.sparsify_activations(b, _cfg(method="chess"), calib=ids)
    got = state_of(a)
    assert got is not None and got.thresholds.keys() == state.thresholds.keys()
    assert all(torch.equal(got.thresholds[n], state.thresholds[n]) for n in state.thresholds)
    after = _weights(a)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights are left as they are
    timeless = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert report.extra["activation"] is got.report and timeless(got.report) == timeless(state.report)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_the_report_is_a_report_with_the_thresholds_summary_in_extra():
    report = compress(tiny_model("llama"), _cfg(method="teal"), calib=rand_ids(4, 32))
    assert isinstance(report, prunekit.Report)
    assert (report.method, report.target_sparsity, report.pattern, report.layers) == ("none", 0.0, "unstructured", [])
    act = report.extra["activation"]
    assert act["method"] == "teal" and act["target"] == 0.4 and act["allocation"] == "uniform"
    assert abs(act["mean_sparsity"] - 0.4) < 0.05 and 0 < act["skipped_fraction"] < 1
    assert act["calibration"]["source"] == "given" and report.calibration is act["calibration"]
    assert set(act["sites"]) == {n for n in act["sites"] if n.startswith("model.layers.")} and act["sites"]
    json.loads(report.to_json())  # serialisable, as every family's report


def test_calibration_is_drawn_from_the_config_with_a_tokenizer(prose_file):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    cfg = _cfg(calib=prunekit.CalibConfig(str(prose_file), nsamples=2, seqlen=16))
    report = compress(model, cfg, tokenizer=tok)
    assert report.calibration["source"] == str(prose_file) and report.calibration["nsamples"] == 2
    with pytest.raises(ConfigError, match="activation sparsity needs calibration: pass calib token ids or a tokenizer"):
        compress(tiny_model("llama"), cfg)


def test_a_site_the_model_lacks_is_refused_before_calibration():
    with pytest.raises(ConfigError, match="not a gated MLP"):
        compress(tiny_model("opt"), _cfg(method="cats"), calib=rand_ids(2, 16))
    with pytest.raises(ConfigError, match="select no site of method 'teal'"):
        compress(tiny_model("llama"), _cfg(include=("nothing_matches",)), calib=rand_ids(2, 16))


def test_it_layers_on_a_weight_family():
    """Weights first, then thresholds calibrated on the compressed weights: both stay."""
    ids = rand_ids(4, 32)
    model = tiny_model("llama")
    weights = compress(model, SparseConfig(method="magnitude", sparsity=0.5), calib=ids)
    pruned = _weights(model)
    act = compress(model, _cfg(), calib=ids)
    assert weights.sparsity == pytest.approx(0.5) and state_of(model) is not None
    assert all(torch.equal(pruned[k], v) for k, v in _weights(model).items())
    again = tiny_model("llama")
    compress(again, SparseConfig(method="magnitude", sparsity=0.5), calib=ids)
    dense_act = compress(tiny_model("llama"), _cfg(), calib=ids)
    # calibrated on the pruned weights, not on the dense ones
    assert act.extra["activation"]["sites"] != dense_act.extra["activation"]["sites"]


def test_thresholds_save_and_reload_through_the_format(tmp_path):
    from prunekit.formats import ACTIVATION, detect, load_model

    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    ids = rand_ids(4, 32, vocab=len(tok))
    report = compress(model, _cfg(method="chess"), calib=ids)
    with torch.no_grad():
        masked = model(ids).logits
    out, how = ACTIVATION.save(model, tok, tmp_path / "m", report.to_dict())
    assert ACTIVATION.detect(out) and detect(out).name == "dense" and "activation thresholds (chess)" in how
    loaded, _ = load_model(str(out))
    state, saved = state_of(loaded), state_of(model)
    assert state.method == "chess" and state.config == saved.config and state.report == json.loads(
        json.dumps(saved.report, default=str))
    assert all(torch.equal(state.thresholds[n], saved.thresholds[n].float()) for n in saved.thresholds)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked)


def test_the_pipeline_takes_the_activation_family_alone_or_after_weights(tiny_folder, prose_file, tmp_path):
    from prunekit.pipeline import RunSpec, run

    calib = prunekit.CalibConfig(str(prose_file), nsamples=2, seqlen=16)
    common = dict(eval_datasets=(str(prose_file),), eval_seqlen=32, max_windows=2)
    alone = RunSpec(str(tiny_folder), compression=_cfg(calib=calib), **common)
    assert alone.compression is None and alone.activation == _cfg(calib=calib)
    res = run(alone)
    assert res.report.method == "none" and list(res.report.extra) == ["model", "dtype", "activation"]
    both = run(RunSpec(str(tiny_folder), compression=SparseConfig(method="wanda", sparsity=0.5, calib=calib),
                       activation=_cfg(calib=calib), out=tmp_path / "both", **common))
    assert both.report.method == "wanda" and both.report.extra["activation"]["method"] == "teal"
    loaded, _ = prunekit.load_model(str(both.saved))
    assert state_of(loaded) is not None
    with pytest.raises(ConfigError, match="give the weight compression as compression=..., the activation"):
        RunSpec(str(tiny_folder), compression=_cfg(), activation=_cfg())
    with pytest.raises(ConfigError, match="activation=SparseConfig is not an ActivationSparsityConfig"):
        RunSpec(str(tiny_folder), compression=None, activation=SparseConfig())


def test_the_old_import_path_of_the_config_warns_and_gives_the_same_class():
    config = importlib.import_module("prunekit.config")
    with pytest.warns(DeprecationWarning, match="prunekit.families.activation.ActivationSparsityConfig"):
        assert config.ActivationSparsityConfig is ActivationSparsityConfig
    assert prunekit.ActivationSparsityConfig is ActivationSparsityConfig
