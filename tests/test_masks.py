"""Exact masks on hand-built tensors."""

import pytest
import torch

from prunekit.masks import Pattern, is_nm_sparse, keep_mask, matrix_mask, nm_mask, row_mask


def test_row_mask_prunes_lowest_per_row():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    keep = row_mask(s, 0.5)
    assert keep.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_matrix_mask_uses_one_threshold_for_the_whole_matrix():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    keep = matrix_mask(s, 0.5)
    # the four smallest overall are all in row 1 except 1.0: 0.1, 0.5, 0.7, 0.9
    assert keep.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_mask_counts_use_floor_like_the_references():
    s = torch.arange(10.0).reshape(1, 10)
    assert int((~row_mask(s, 0.35)).sum()) == 3  # int(10 * 0.35) = 3
    assert int((~matrix_mask(s, 0.99)).sum()) == 9


def test_ties_are_broken_by_position():
    s = torch.ones(1, 4)
    assert row_mask(s, 0.5).tolist() == [[False, False, True, True]]


def test_nm_mask_keeps_n_largest_in_each_group():
    s = torch.tensor([[1.0, 9.0, 3.0, 2.0, 8.0, 7.0, 0.0, 6.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm_mask(s, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]
    assert nm_mask(s, 4, 8).tolist() == [[False, True, False, False, True, True, False, True]]


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divide"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_keep_mask_dispatch_and_is_nm_sparse():
    torch.manual_seed(0)
    s = torch.rand(16, 32)
    k = keep_mask(s, 0.5, Pattern.parse("2:4"), per_row=True)
    assert is_nm_sparse(s * k, 2, 4)
    assert k.float().mean().item() == 0.5
    k2 = keep_mask(s, 0.25, Pattern(), per_row=True)
    assert (k2.sum(1) == 24).all()


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4, 0.5)), ("4:8", (4, 8, 0.5)), ("1:4", (1, 4, 0.75))])
def test_pattern_parse(text, expected):
    p = Pattern.parse(text)
    assert (p.n, p.m, p.sparsity) == expected
    assert str(p) == text


@pytest.mark.parametrize("bad", ["4:4", "0:4", "a:b", "diagonal", "5:4"])
def test_pattern_parse_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="pattern|N:M"):
        Pattern.parse(bad)


def test_pattern_width_check_names_layer_and_fix():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.*--exclude"):
        Pattern.parse("2:4").check_width(70, "model.layers.0.mlp.down_proj")
