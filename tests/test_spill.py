"""Calibration activations on disk (streamed pruning): exact round trips, in-place replacement, nothing left behind."""

from __future__ import annotations

import os

import pytest
import torch

from prunekit.calibration.spill import SpilledTensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_and_in_place(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 5, generator=g).to(dtype) for _ in range(3)]
    xs[1][0, 0, 0] = float("nan")
    store = SpilledTensors(tmp_path)
    for x in xs:
        store.append(x)
    assert len(store) == 3 and store.nbytes == sum(x.numel() * x.element_size() for x in xs)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(store, xs))
    end = store._end
    y = torch.randn(2, 7, 5, generator=g).to(dtype)
    store[1] = y  # same size: overwritten where it was
    assert store._end == end and torch.equal(store[1].view(torch.uint8), y.view(torch.uint8))
    assert torch.equal(store[2].view(torch.uint8), xs[2].view(torch.uint8))
    z = torch.randn(3, 4, generator=g).to(dtype)
    store[0] = z  # another size: appended, the others untouched
    assert store[0].shape == (3, 4) and torch.equal(store[0], z) and torch.equal(store[2], xs[2])


def test_reads_are_fresh_tensors_and_the_file_is_never_visible(tmp_path):
    store = SpilledTensors(tmp_path)
    store.append(torch.ones(4))
    a = store[0]
    a.zero_()  # a caller's in-place change never reaches the stored copy
    assert torch.equal(store[0], torch.ones(4))
    assert os.listdir(tmp_path) == []  # unlinked at creation: a crash leaves nothing behind
    store.close()
