"""Block reconstruction with learned masks (reconstruct mask=learned): the straight-through fit keeps every
row's count and every N:M group, starts from the one-shot mask, finds a better support than the fixed-mask
fit, and is refused where it would break a structure."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_model
from prunekit import PruneConfig, prune
from prunekit.errors import ConfigError
from prunekit.masks import Pattern, is_nm_sparse
from prunekit.methods.blockfit import FitSettings, fit_block
from prunekit.methods.maskfit import rule_for
from prunekit.models import decoder_linears, weight_view

LEARN = {"epochs": 2, "lr": 1e-3, "lstsq_iters": 5, "mask": "learned"}


def _problem(seed=0, rows=8, cols=32, tokens=256):
    """A linear layer pruned on the wrong support: the target is a sparse map whose support the start misses."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < 0.25)
    start = torch.randn(rows, cols, generator=g) * 0.1
    start[:, cols // 2:] = 0.0  # the start keeps only the first half of the inputs
    x = torch.randn(4, tokens, cols, generator=g)
    return truth, start, [x], [x @ truth.t()]


def _fit(start, inputs, targets, learned, epochs=30):
    lin = nn.Linear(start.shape[1], start.shape[0], bias=False)
    lin.weight.data.copy_(start)
    w = lin.weight
    rules = {w: rule_for(w.data, Pattern(), torch.ones(start.shape[1]))} if learned else None
    info = fit_block(lambda b, x, rows: lin(x[rows]), inputs, targets, [w], {w: w.data == 0}, {},
                     FitSettings(epochs, 1e-2, 1, 0.1, "none", 0, 1 if learned else 0), rules)
    return w.data, info


def test_the_first_selection_is_the_one_shot_mask_for_rows_and_nm():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    w[torch.rand(6, 16, generator=g) < 0.6] = 0.0
    norms = torch.rand(16, generator=g) + 0.5
    assert torch.equal(rule_for(w, Pattern(), norms).select(w), w != 0)
    nm = w.clone()
    nm.view(6, 4, 4)[:, :, 2:] = 0.0
    nm[nm == 0] = 0.0
    dense_groups = torch.randn(6, 4, 2, generator=g)
    nm.view(6, 4, 4)[:, :, :2] = dense_groups
    assert torch.equal(rule_for(nm, Pattern.parse("2:4"), norms).select(nm), nm != 0)
    assert torch.equal(rule_for(w.t().contiguous().t(), Pattern(), norms, transposed=True).select(w.t()), (w != 0).t())


def test_learned_masks_find_the_support_the_fixed_fit_cannot_and_keep_each_rows_count():
    truth, start, inputs, targets = _problem()
    fixed, info_fixed = _fit(start, inputs, targets, learned=False)
    learned, info_learned = _fit(start, inputs, targets, learned=True)
    assert torch.equal(fixed != 0, start != 0)  # the fixed fit never leaves the start's support
    assert torch.equal((learned != 0).sum(1), (start != 0).sum(1))
    assert info_learned["mask_changed"] > 0.2
    assert info_learned["loss_last_epoch"] < 0.5 * info_fixed["loss_last_epoch"]
    assert not torch.signbit(learned[learned == 0]).any()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_learned_masks_through_the_engine_keep_counts_and_patterns(pattern, calib_ids):
    base = tiny_model("llama")
    sparsity = 0.6 if pattern == "unstructured" else None
    plain, learned = copy.deepcopy(base), copy.deepcopy(base)
    cfg = dict(method="wanda", sparsity=sparsity, pattern=pattern, calib={"batch_size": 2})
    one_shot = prune(plain, PruneConfig(**cfg), calib=calib_ids)
    rep = prune(learned, PruneConfig(**cfg, refine="reconstruct", refine_options=LEARN), calib=calib_ids)
    a, b = decoder_linears(plain), decoder_linears(learned)
    moved = 0
    for name in a:
        wa, wb = weight_view(a[name]), weight_view(b[name])
        assert torch.equal((wa != 0).sum(1), (wb != 0).sum(1)), name  # Wanda's per-row counts, kept
        if pattern == "2:4":
            assert is_nm_sparse(wb, 2, 4), name
        moved += int(((wb != 0) & (wa == 0)).sum())
    assert moved > 0
    assert all(blk.info["mask"] == "learned" and blk.info["mask_changed"] > 0 for blk in rep.blocks)
    assert rep.sparsity == one_shot.sparsity


def test_a_reverted_learned_fit_restores_the_one_shot_masks(calib_ids):
    base = tiny_model("llama")
    plain, learned = copy.deepcopy(base), copy.deepcopy(base)
    cfg = dict(method="magnitude", sparsity=0.6, calib={"batch_size": 2})
    prune(plain, PruneConfig(**cfg), calib=calib_ids)
    # lr 1.0 wrecks every block on the sequences it never saw: each fit is undone, masks and all
    rep = prune(learned, PruneConfig(**cfg, refine="reconstruct", refine_options={**LEARN, "lr": 1.0, "holdout": 2}),
                calib=calib_ids)
    assert all(blk.info["reverted"] and blk.info["mask_changed"] == 0.0 for blk in rep.blocks)
    for name, m in decoder_linears(learned).items():
        assert torch.equal(weight_view(m) == 0, weight_view(decoder_linears(plain)[name]) == 0), name


def test_learned_masks_are_refused_without_a_fit_or_with_a_structure():
    with pytest.raises(ConfigError, match="epochs") as e:
        PruneConfig(method="wanda", sparsity=0.5, refine="reconstruct", refine_options={"mask": "learned", "epochs": 0})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="mask") as e:
        PruneConfig(method="slimgpt", sparsity=0.25, pattern="channels", refine="reconstruct",
                    refine_options={"mask": "learned"})
    assert "\n" not in str(e.value)
