"""Configuration objects: the YAML round trip, typed options, and the calibration context."""

import pytest
import torch

from conftest import tiny_model
from prunekit import CalibConfig, PruneConfig, prune
from prunekit.calibration import calibration_forward_context
from prunekit.config import load_yaml, save_yaml
from prunekit.errors import ConfigError
from prunekit.models import decoder_linears, weight_view


def test_yaml_round_trip_keeps_every_field_and_the_option_types(tmp_path):
    cfg = PruneConfig(method="sparsegpt", sparsity=0.6, pattern="unstructured", allocation="owl",
                      include=("mlp",), exclude=("down_proj",), method_options={"percdamp": "0.05", "blocksize": "64"},
                      allocation_options={"lam": 0.1}, refine="dsnot", refine_options={"skip": "", "max_cycles": "7"},
                      calib=CalibConfig("gsm8k", nsamples=16, seqlen=256, seed=3, batch_size=4, packing=True))
    path = tmp_path / "cfg.yaml"
    save_yaml(cfg, path)
    back = load_yaml(path)
    assert back == cfg
    assert back.method_options == {"percdamp": 0.05, "blocksize": 64}
    assert back.refine_options == {"skip": "", "max_cycles": 7}


def test_yaml_with_a_bad_option_fails_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: sparsegpt\nsparsity: 0.5\nmethod_options:\n  percdamp: lots\n")
    with pytest.raises(ConfigError, match=r"^method 'sparsegpt' option percdamp='lots' is invalid"):
        load_yaml(path)


def test_calibration_context_restores_state_after_an_exception():
    model = tiny_model()
    model.train()
    model.config.use_cache = True
    with pytest.raises(RuntimeError, match="boom"):
        with calibration_forward_context(model):
            assert not model.training and model.config.use_cache is False and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert model.training and model.config.use_cache is True and torch.is_grad_enabled()


def test_refiner_around_a_low_rank_method_leaves_replaced_layers_alone(calib_ids):
    model = tiny_model()
    report = prune(model, PruneConfig(method="svd", sparsity=0.6, refine="dsnot", refine_options={"skip": ""}),
                   calib=calib_ids)
    assert {r.info["refine"]["skipped"] for r in report.layers if r.info["lowrank"]} == {"replaced module"}
    assert any(r.info["lowrank"] for r in report.layers)


def test_offload_device_path_gives_the_same_weights(calib_ids):
    """``device`` different from the model's (here cpu:0 vs cpu, so it runs without a GPU): the
    engine moves the embedding stage and each block there and back; results are identical."""
    a, b = tiny_model(), tiny_model()
    prune(a, PruneConfig(method="sparsegpt", sparsity=0.5), calib=calib_ids)
    prune(b, PruneConfig(method="sparsegpt", sparsity=0.5), calib=calib_ids, device=torch.device("cpu", 0))
    for (n, x), y in zip(decoder_linears(a).items(), decoder_linears(b).values()):
        assert torch.equal(weight_view(x), weight_view(y)), n
