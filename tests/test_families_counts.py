"""prune() and the CLI build each component (method, allocator, refiner, criterion) exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, prune
from prunekit.registry import Registry


@pytest.fixture
def builds(monkeypatch):
    counts: Counter = Counter()
    original = Registry.build

    def counting(self, name, options=None):
        counts[f"{self.kind} {name}"] += 1
        return original(self, name, options)

    monkeypatch.setattr(Registry, "build", counting)
    return counts


def _ids():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs", [
    dict(method="wanda", sparsity=0.5),
    dict(method="magnitude", pattern="2:4", allocation="owl"),
    dict(method="wanda", sparsity=0.5, refine="dsnot"),
    dict(method="svd", sparsity=0.3),
    dict(pattern="width", sparsity=0.25, method_options={"multiple": 8}),
    dict(method="flap", pattern="width", sparsity=0.25, allocation="global", method_options={"multiple": 8}),
    dict(pattern="channels", sparsity=0.25, method_options={"multiple": 8}, refine="reconstruct"),
    dict(pattern="blocks", sparsity=0.5),
])
def test_prune_builds_each_component_once(builds, kwargs):
    config = PruneConfig(**kwargs)
    builds.clear()  # the config's own validation builds nothing either way; count the call alone
    prune(tiny_model("llama"), config, calib=_ids())
    assert builds and all(n == 1 for n in builds.values()), dict(builds)


@pytest.mark.parametrize("flags", [["--method", "wanda", "--sparsity", "0.5"],
                                   ["--method", "wanda", "--sparsity", "0.5", "--offload", "disk"],
                                   ["--pattern", "width", "--sparsity", "0.25", "--option", "multiple=8"]])
def test_cli_prune_builds_each_component_once(builds, tiny_folder, data_dir, flags, capsys, tmp_path):
    from prunekit.cli import main

    out = ["--out", str(tmp_path / "out")] if "disk" in flags else []  # streaming writes as it goes
    rc = main(["prune", str(tiny_folder), *flags, *out, "--nsamples", "2", "--seqlen", "32", "--eval", "none",
               "--no-dense-eval"])
    assert rc == 0, capsys.readouterr().err
    assert builds and all(n == 1 for n in builds.values()), dict(builds)
