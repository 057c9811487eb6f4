"""Criteria on hand-built layers: Wanda's row-wise scores, magnitude's per-matrix threshold,
SparseGPT's reconstruction beating magnitude on correlated inputs."""

import pytest
import torch
from torch import nn

from prunekit.masks import Pattern, is_nm_sparse
from prunekit.errors import ConfigError
from prunekit.methods import Target, build_method
from prunekit.methods.base import InputStats
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.wanda import wanda_scores


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def _stats(x: torch.Tensor, hessian=False) -> InputStats:
    st = InputStats(x.shape[-1], x.device, hessian=hessian, moments=True)
    st.update(x)
    return st


def test_wanda_scores_are_weight_times_activation_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([2.0, 1.0])
    assert wanda_scores(w, norms).tolist() == [[2.0, 2.0], [6.0, 0.5]]


def test_wanda_prunes_per_row_using_activation_norms():
    # column 0 has a huge activation norm, so its small weights survive in every row
    w = torch.tensor([[0.1, 1.0, 2.0, 3.0], [0.2, 3.0, 1.0, 2.0]])
    x = torch.tensor([[100.0, 1.0, 1.0, 1.0], [100.0, 1.0, 1.0, 1.0]])
    lin = _linear(w)
    res = build_method("wanda").compress("layer", lin, _stats(x), Target(0.5))
    assert (lin.weight != 0).tolist() == [[True, False, False, True], [True, True, False, False]]
    # diagonal error: sum of w^2 ||x_j||^2 over pruned weights / over all (||x||^2 = 20000, 2, 2, 2)
    pruned = (1 * 2 + 4 * 2) + (1 * 2 + 4 * 2)
    total = (0.01 * 20000 + 2 + 8 + 18) + (0.04 * 20000 + 18 + 2 + 8)
    assert res.error == pytest.approx(pruned / total, rel=1e-6)


def test_magnitude_uses_one_threshold_per_matrix():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    lin = _linear(w)
    build_method("magnitude").compress("layer", lin, None, Target(0.5))
    assert (lin.weight != 0).tolist() == [[False, False, False, False], [True, True, True, True]]


def test_magnitude_nm_groups():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.1, 0.2, -0.3, 0.4]])
    lin = _linear(w)
    build_method("magnitude").compress("layer", lin, None, Target(0.5, Pattern.parse("2:4")))
    assert (lin.weight != 0).tolist() == [[False, True, True, False, False, False, True, True]]


def _correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, d, generator=g)
    return base @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_on_correlated_inputs(pattern):
    x = _correlated_inputs()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    pat = Pattern.parse(pattern)
    target = Target(0.5, pat)
    errs = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        lin = _linear(w)
        build_method(name).compress("layer", lin, _stats(x, hessian=(name == "sparsegpt")), target)
        errs[name] = float(((x @ (w - lin.weight.data).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())
        zeros = int((lin.weight == 0).sum())
        if name == "sparsegpt" and not pat.is_nm:
            # the reference's rule: all saliencies <= the int(numel*s)-th smallest -> one more per block
            assert zeros == w.numel() // 2 + 1
        else:
            assert zeros == w.numel() // 2
        if pat.is_nm:
            assert is_nm_sparse(lin.weight.data, 2, 4)
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]
    assert errs["sparsegpt"] < 0.5 * errs["magnitude"]


def test_sparsegpt_reported_error_matches_measured():
    x = _correlated_inputs(seed=3)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    lin = _linear(w)
    res = build_method("sparsegpt").compress("layer", lin, _stats(x, hessian=True), Target(0.6))
    measured = float(((x @ (w - lin.weight.data).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())
    assert res.error == pytest.approx(measured, rel=1e-3)


def test_sparsegpt_dead_inputs_are_zeroed():
    x = _correlated_inputs()
    x[:, 5] = 0
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    new, info = sparsegpt_prune(w, _stats(x, hessian=True).hessian(), 0.5)
    assert (new[:, 5] == 0).all()
    assert info["retries"] == 0


def test_sparsegpt_retries_with_more_damping_when_cholesky_fails():
    # an indefinite "Hessian": tiny damping cannot make it positive definite
    h = torch.eye(8)
    h[0, 0] = -0.05
    w = torch.randn(4, 8)
    new, info = sparsegpt_prune(w, h, 0.5, percdamp=0.01)
    assert info["retries"] > 0 and info["damp"] > 0.01
    assert int((new == 0).sum()) >= 16


def test_sparsegpt_fails_clearly_when_hopeless():
    h = -torch.eye(4)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(torch.randn(2, 4), h, 0.5, max_retries=2)


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match=r"^method 'sparsegpt' option percdamp=-1.0 is invalid: it must be a number in "
                                          r"\(0.0, 10.0\) \(default 0.01\)$"):
        build_method("sparsegpt", {"percdamp": "-1"})
    with pytest.raises(ConfigError, match=r"^method 'sparsegpt' option percdamp='abc' is invalid"):
        build_method("sparsegpt", {"percdamp": "abc"})
    with pytest.raises(ConfigError, match=r"^method 'sparsegpt' has no option 'nonsense'; its options are: blocksize=128, "
                                          r"percdamp=0.01, max_retries=10$"):
        build_method("sparsegpt", {"nonsense": 1})
    with pytest.raises(ConfigError, match=r"^method 'wanda' has no option 'alpha'; its options are: none$"):
        build_method("wanda", {"alpha": 2})
    with pytest.raises(ConfigError, match=r"^unknown method 'obd'; choose one of: alps, magnitude, "):
        build_method("obd")
    assert build_method("sparsegpt", {"blocksize": "64", "percdamp": "0.1"}).opts.blocksize == 64


def test_input_stats_moments_and_norms():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    st = _stats(x)
    assert st.col_norm.tolist() == pytest.approx([10**0.5, 8**0.5])
    assert st.mean.tolist() == [2.0, 0.0]
    assert st.var.tolist() == [1.0, 4.0]


def test_chunked_nll_equals_one_shot_cross_entropy():
    import torch.nn.functional as F

    from prunekit.eval.perplexity import shifted_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 700, 50, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 700), generator=g)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50).float(), ids[:, 1:].reshape(-1), reduction="sum")
    assert shifted_nll(logits, ids, chunk=256) == pytest.approx(float(ref), rel=1e-6)
