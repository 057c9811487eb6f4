"""``rotate="pca"``: the residual stream rotated into its principal axes before activation thresholds.

The rotation is exact (same logits), its basis is the calibration stream's principal axes, it lowers
what a 40 % TEAL threshold costs on a stream with unequal axes, it saves and reloads as a stock
checkpoint, and what it cannot rotate is refused in one line before anything changes.
"""

from __future__ import annotations

import pytest
import torch

from conftest import error_line, rand_ids, run_cli, tiny_model, tiny_tokenizer
from prunekit import ActivationSparsityConfig, compress
from prunekit.activation.rotate import rotate_residual, rotation_plan
from prunekit.errors import ConfigError


def _model(arch="llama", seed=0, **over):
    """A tiny model whose norms have real scales and whose embeddings have axes of very unequal energy."""
    model = tiny_model(arch, seed=seed, **over)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        emb = model.get_input_embeddings().weight
        spectrum = torch.logspace(0, -2, emb.shape[1])
        mix, _ = torch.linalg.qr(torch.randn(emb.shape[1], emb.shape[1], generator=g))
        emb.copy_(torch.randn(emb.shape, generator=g) * spectrum @ mix.T)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,over", [("llama", {"tie_word_embeddings": True}), ("llama", {}), ("qwen2", {}),
                                       ("mistral", {})])
def test_the_rotation_keeps_the_logits_and_unties_the_head(arch, over):
    ids = rand_ids(4, 32)
    model = _model(arch, **over)
    before = _logits(model, ids)
    report = rotate_residual(model, ids, batch_size=2)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert report["logits_rel_change"] < 1e-5 and report["lm_head_untied"]
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.config.tie_word_embeddings
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_the_basis_is_the_principal_axes_of_the_calibration_stream():
    ids = rand_ids(4, 32)
    model = _model()
    rotate_residual(model, ids, batch_size=4)
    seen = []
    hooks = [n.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1]).double()))
             for p in rotation_plan(model) for n in p[:2]]
    _logits(model, ids)
    for h in hooks:
        h.remove()
    x = torch.cat(seen)
    c = x.T @ x
    diag = torch.diagonal(c)
    assert (c - torch.diag(diag)).abs().max() < 1e-6 * diag.max()  # diagonal: the axes are uncorrelated
    assert torch.all(diag[:-1] >= diag[1:] * (1 - 1e-9))  # sorted by energy, largest first


def test_it_lowers_what_a_40_percent_threshold_costs():
    ids, held = rand_ids(8, 32), rand_ids(4, 32, seed=1)
    errs = {}
    for rotate in ("none", "pca"):
        model = _model(seed=3)
        dense = _logits(model, held)
        report = compress(model, ActivationSparsityConfig(sparsity=0.4, max_tokens=256, rotate=rotate), calib=ids)
        errs[rotate] = float((_logits(model, held) - dense).norm() / dense.norm())
        assert ("rotation" in report.extra["activation"]) == (rotate == "pca")
    assert errs["pca"] < 0.7 * errs["none"], errs


def test_a_rotated_model_saves_and_reloads_as_a_stock_checkpoint(tmp_path):
    from prunekit.formats import ACTIVATION, load_model

    tok = tiny_tokenizer(320)
    model = _model(vocab_size=len(tok), tie_word_embeddings=True)
    ids = rand_ids(4, 32, vocab=len(tok))
    report = compress(model, ActivationSparsityConfig(sparsity=0.4, max_tokens=256, rotate="pca"), calib=ids)
    out, _ = ACTIVATION.save(model, tok, tmp_path / "m", report.to_dict())
    loaded, _ = load_model(str(out))
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("make,match", [
    (lambda: tiny_model("gemma3"), "needs pre-norm blocks|RMS final norm"),
    (lambda: tiny_model("gpt2"), "needs token embeddings|needs pre-norm blocks"),
])
def test_an_architecture_it_cannot_rotate_is_refused_before_anything_changes(make, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as e:
        compress(model, ActivationSparsityConfig(sparsity=0.4, rotate="pca"), calib=rand_ids(2, 16))
    assert "\n" not in str(e.value) and "drop --act-rotate" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_weights_and_unknown_bases_are_refused():
    from prunekit import SparseConfig

    model = _model()
    compress(model, SparseConfig(method="magnitude", sparsity=0.5))
    with pytest.raises(ConfigError, match=r"decoder weights are 50\.0% zeros \(pruned\): a rotation makes them dense"):
        compress(model, ActivationSparsityConfig(sparsity=0.4, rotate="pca"), calib=rand_ids(2, 16))
    with pytest.raises(ConfigError, match="activation rotate='svd' is unknown; choose none or pca"):
        ActivationSparsityConfig(rotate="svd")


def test_the_cli_refuses_rotation_with_weight_pruning_before_loading(capsys, tiny_folder, prose_file, tmp_path,
                                                                     no_weights):
    rc, err, _ = run_cli(capsys, "prune", tiny_folder, "--method", "wanda", "--sparsity", "0.5",
                         "--activation-sparsity", "0.4", "--act-rotate", "pca", "--calib", prose_file,
                         "--nsamples", "2", "--seqlen", "16", "--out", tmp_path / "o")
    assert rc != 0 and "--act-rotate pca rotates dense weights" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_the_cli_rotates_and_thresholds(capsys, tiny_folder, prose_file, tmp_path):
    from prunekit.formats import load_model
    from prunekit.models.activation import state_of

    rc, err, out = run_cli(capsys, "prune", tiny_folder, "--activation-sparsity", "0.4", "--act-rotate", "pca",
                           "--calib", prose_file, "--nsamples", "2", "--seqlen", "16", "--eval", prose_file,
                           "--eval-seqlen", "32", "--max-windows", "1", "--out", tmp_path / "o")
    assert rc == 0, err
    assert "residual stream rotated (pca)" in out
    loaded, _ = load_model(str(tmp_path / "o"))
    state = state_of(loaded)
    assert state is not None and state.config["rotate"] == "pca" and "rotation" in state.report


def test_bfloat16_weights_rotate_within_their_rounding():
    model = _model().to(torch.bfloat16)
    report = rotate_residual(model, rand_ids(4, 32), batch_size=2)
    assert 0 < report["logits_rel_change"] < 2e-2  # bf16 re-rounds every rotated weight: checked, not exact


def test_thresholds_of_the_old_basis_are_removed_before_rotating():
    from prunekit.models.activation import state_of

    ids = rand_ids(4, 32)
    model = _model()
    dense = _logits(model, ids)
    compress(model, ActivationSparsityConfig(sparsity=0.4, max_tokens=256), calib=ids)
    rotate_residual(model, ids, batch_size=2)
    assert state_of(model) is None  # they thresholded the old coordinates
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_sparsify_activations_rotates_exactly_as_compress_does():
    # prunekit.sparsify_activations(rotate="pca") once calibrated on the unrotated stream and said nothing: the
    # issue 29 benchmark's "rotated" rows were plain TEAL. Both entry points must give the same model and report.
    from prunekit import sparsify_activations

    ids, held = rand_ids(8, 32), rand_ids(4, 32, seed=1)
    cfg = ActivationSparsityConfig(sparsity=0.4, max_tokens=256, rotate="pca")
    via_api, via_compress = _model(seed=3), _model(seed=3)
    state = sparsify_activations(via_api, cfg, calib=ids)
    report = compress(via_compress, cfg, calib=ids)
    assert state.report["rotation"]["basis"] == "pca"
    assert report.extra["activation"]["rotation"]["basis"] == "pca"
    assert not via_api.config.tie_word_embeddings
    torch.testing.assert_close(_logits(via_api, held), _logits(via_compress, held))
    with pytest.raises(ConfigError, match="drop --act-rotate"):
        sparsify_activations(tiny_model("gpt2"), cfg, calib=rand_ids(2, 16))
