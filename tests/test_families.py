"""Compression families as types: validation, PruneConfig → family mapping, dispatch by type."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
import prunekit
from prunekit import LowRankConfig, PruneConfig, SparseConfig, StructuredConfig, compress, prune
from prunekit.config import to_dict
from prunekit.errors import ConfigError
from prunekit.families import (HANDLERS, ActivationFamily, ActivationSparsityConfig, LowRankFamily, SparseFamily,
                               StructuredFamily, allocation_names, prepare)
from prunekit.masks import STRUCTURED_KINDS
from prunekit.models import decoder_linears, weight_view
from prunekit.registry import ALLOCATORS, METHODS, STRUCTURED

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"


def _ids():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {n: weight_view(m).clone() for n, m in decoder_linears(model).items()}


def test_no_is_structured_branch_outside_the_structured_family():
    """The family type decides; only prunekit.structured and the structured family may ask the pattern."""
    allowed = {SRC / "families" / "structured.py", SRC / "masks.py"}  # masks.py: Pattern's own property
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             if "structured" not in p.relative_to(SRC).parts[:1] and p not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.is_structured\b", line)]
    assert not found, found


# ---------------------------------------------------------------- validation: one line naming value and fix

@pytest.mark.parametrize("make,match", [
    (lambda: SparseConfig(sparsity=1.5), r"sparsity=1.5 is out of range.*\[0, 1\)"),
    (lambda: SparseConfig(pattern="channels"), "StructuredConfig\\(unit='channels'\\)"),
    (lambda: SparseConfig(method="flap"), "removes whole heads/channels: use it with --pattern"),
    (lambda: SparseConfig(method="svd", pattern="2:4"), "cannot produce pattern 2:4"),
    (lambda: SparseConfig(allocation="global"), "allocation 'global' ranks whole heads/channels.*structured --pattern"),
    (lambda: SparseConfig(allocation="nope"), "unknown allocation 'nope'"),
    (lambda: SparseConfig(method_options={"nope": 1}), "has no option 'nope'"),
    (lambda: SparseConfig(pattern="2:4", sparsity=0.3), "contradicts pattern 2:4"),
    (lambda: SparseConfig(refine_options={"max_cycles": 3}), "without a refiner: add --refine"),
    (lambda: SparseConfig(include=("(",)), "regex '\\(' is invalid"),
    (lambda: StructuredConfig(unit="rows", sparsity=0.2), "unit='rows' is not one of channels"),
    (lambda: StructuredConfig(unit="width"), "sparsity is required for pattern width"),
    (lambda: StructuredConfig(unit="width", criterion="sparsegpt", sparsity=0.2), "prunes single weights"),
    (lambda: StructuredConfig(unit="blocks", criterion="flap", sparsity=0.2), "cannot serve pattern blocks"),
    (lambda: StructuredConfig(unit="width", sparsity=0.2, allocation="nope"), "choose one of: alpha, global"),
    (lambda: StructuredConfig(unit="width", sparsity=0.2, allocation="global", allocation_options={"x": 1}),
     "allocation 'global' has no option 'x'"),
    (lambda: StructuredConfig(unit="channels", sparsity=0.2, refine="dsnot"), "works on unstructured masks"),
    (lambda: StructuredConfig(unit="blocks", sparsity=0.2, refine="reconstruct"), "removes whole blocks or FFNs"),
    (lambda: LowRankConfig(), "give exactly one rank budget"),
    (lambda: LowRankConfig(rank_removed=0.3, param_reduction=0.3), "give exactly one rank budget"),
    (lambda: LowRankConfig(param_reduction=1.0), "param_reduction=1.0 is out of range"),
    (lambda: LowRankConfig(method="wanda", rank_removed=0.3), "'wanda' is not a low-rank method; choose one of: svd"),
    (lambda: LowRankConfig(rank_removed=0.3, method_options={"budget": "params"}), "give rank_removed=.* or param"),
    (lambda: LowRankConfig(method="welore", rank_removed=0.3, method_options={"objective": "rank"}),
     "option 'objective' is the rank budget's kind"),
])
def test_family_configs_fail_in_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_family_configs_are_frozen_and_normalised():
    cfg = SparseConfig(pattern="2:4", sparsity=None, include=["mlp"], method_options={"percdamp": "0.05"},
                       method="sparsegpt")
    assert cfg.sparsity == 0.5 and cfg.include == ("mlp",) and cfg.method_options == {"percdamp": 0.05}
    with pytest.raises(FrozenInstanceError):
        cfg.sparsity = 0.3
    assert StructuredConfig(unit="blocks", sparsity=0.25).criterion == "shortgpt"


# ---------------------------------------------------------------- PruneConfig -> family, for every registered name

def _sparse_cases():
    for name in METHODS.names():
        cls = METHODS.get(name)
        for pattern in ("unstructured", "2:4"):
            if pattern.split(":")[0].isdigit() and "nm" not in cls.patterns:
                continue
            yield name, pattern


@pytest.mark.parametrize("method,pattern", list(_sparse_cases()))
def test_every_method_and_pattern_maps_to_its_family(method, pattern):
    cfg = PruneConfig(method=method, pattern=pattern, sparsity=None if ":" in pattern else 0.4)
    fam = cfg.family()
    lowrank = METHODS.get(method).rank_budget_option is not None
    assert type(fam) is (LowRankConfig if lowrank else SparseConfig)
    assert fam.front() == to_dict(cfg)  # the report records the same config either way
    assert type(prepare(cfg)) is (LowRankFamily if lowrank else SparseFamily)


@pytest.mark.parametrize("criterion,unit", [(n, k) for n in STRUCTURED.names() for k in STRUCTURED.get(n).patterns])
def test_every_structured_criterion_and_unit_maps_to_the_structured_family(criterion, unit):
    cfg = PruneConfig(method=criterion, pattern=unit, sparsity=0.25)
    fam = cfg.family()
    assert type(fam) is StructuredConfig and (fam.unit, fam.criterion, fam.sparsity) == (unit, criterion, 0.25)
    assert fam.front() == to_dict(cfg)


@pytest.mark.parametrize("allocation", allocation_names())
def test_every_allocation_maps(allocation):
    structured = PruneConfig(pattern="width", sparsity=0.25, allocation=allocation).family()
    assert structured.allocation == allocation
    if allocation in ALLOCATORS:
        assert PruneConfig(allocation=allocation).family().allocation == allocation
    else:  # global: the structured family's own
        with pytest.raises(ConfigError, match="structured --pattern"):
            PruneConfig(allocation=allocation)


def test_every_kind_default_criterion_and_the_sparse_default():
    for kind in STRUCTURED_KINDS:
        assert PruneConfig(pattern=kind, sparsity=0.25).family().criterion == PruneConfig(pattern=kind).method
    assert PruneConfig().family() == SparseConfig()


# ---------------------------------------------------------------- low rank: a rank budget, named as one

@pytest.mark.parametrize("method,option", [("svd", "budget"), ("svd-llm", "budget"), ("welore", "objective")])
def test_lowrank_budget_is_named_not_sparsity(method, option):
    rank = PruneConfig(method=method, sparsity=0.3).family()
    params = PruneConfig(method=method, sparsity=0.3, method_options={option: "params"}).family()
    assert (rank.rank_removed, rank.param_reduction, rank.budget_kind) == (0.3, None, "rank")
    assert (params.rank_removed, params.param_reduction, params.budget_kind) == (None, 0.3, "params")
    assert not hasattr(rank, "sparsity") and rank.budget_option == option
    assert params.front()["method_options"] == {option: "params"} and params.front()["sparsity"] == 0.3


def test_lowrank_config_compresses_as_the_flat_config_does():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = compress(a, LowRankConfig(method="svd", param_reduction=0.4))
    rb = prune(b, PruneConfig(method="svd", sparsity=0.4, method_options={"budget": "params"}))
    assert ra.target_sparsity == rb.target_sparsity == 0.4 and ra.to_dict()["config"] == rb.to_dict()["config"]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# ---------------------------------------------------------------- dispatch by type

def test_each_family_type_has_one_handler():
    assert HANDLERS == {SparseConfig: SparseFamily, StructuredConfig: StructuredFamily, LowRankConfig: LowRankFamily,
                        ActivationSparsityConfig: ActivationFamily}
    assert (SparseFamily.streams, StructuredFamily.streams, ActivationFamily.streams) == (True, False, False)
    assert StructuredFamily.save_formats == ("dense",) and "compressed" in SparseFamily.save_formats


@pytest.mark.parametrize("family,flat", [
    (SparseConfig(method="wanda", sparsity=0.5), PruneConfig(method="wanda", sparsity=0.5)),
    (SparseConfig(method="magnitude", pattern="2:4", sparsity=None), PruneConfig(method="magnitude", pattern="2:4",
                                                                                 sparsity=None)),
    (StructuredConfig(unit="width", sparsity=0.25, criterion_options={"multiple": 8}),
     PruneConfig(pattern="width", sparsity=0.25, method_options={"multiple": 8})),
    (StructuredConfig(unit="width", criterion="flap", sparsity=0.25, allocation="global",
                      criterion_options={"multiple": 8}),
     PruneConfig(method="flap", pattern="width", sparsity=0.25, allocation="global", method_options={"multiple": 8})),
])
def test_compress_dispatches_by_type_as_prune_does(family, flat):
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = prunekit.compress(a, family, calib=_ids())
    rb = prunekit.prune(b, flat, calib=_ids())
    assert ra.to_dict()["config"] == rb.to_dict()["config"] and ra.sparsity == rb.sparsity
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_compress_refuses_what_is_not_a_family_config():
    with pytest.raises(ConfigError, match="is not a compression family config; pass one of: ActivationSparsityConfig, "
                                          "LowRankConfig") as e:
        compress(tiny_model("llama"), {"method": "wanda"})
    assert "\n" not in str(e.value)


def test_a_prepared_handler_is_used_as_built():
    job = prepare(SparseConfig(method="magnitude", sparsity=0.5))
    method = job.method
    model = tiny_model("llama")
    compress(model, job)
    assert job.method is method and all(float((w == 0).float().mean()) == 0.5 for w in _weights(model).values())


def test_global_is_listed_with_the_allocations(capsys):
    from prunekit.cli import main

    assert "global" in allocation_names() and "global" not in ALLOCATORS
    assert main(["ls"]) == 0
    allocations = capsys.readouterr().out.split("allocations:", 1)[1].split("datasets:", 1)[0]
    assert re.search(r"^  global +structured only", allocations, re.M)
