"""The shape of the code, checked: packages import each other in one direction, on-disk formats live in
one place, and the old import paths still work.

The units are prunekit's subpackages and top-level modules (``prunekit.models``, ``prunekit.api`` ...);
an import of ``prunekit.X.Y`` is an edge to unit ``X``. Imports are read with :mod:`ast`, those inside
functions included. Two kinds of import are not edges:

* of the package root (``from prunekit import __version__``): the root is the public facade;
* inside a module-level ``__getattr__`` that calls ``moved`` (:mod:`prunekit._deprecated`): these are
  the deprecated old paths, which point at where names moved to (checked by the last tests here).

Layers, lowest first; a unit may import its own layer (if that makes no cycle) and those below:

0. ``errors``, ``_deprecated``
1. ``registry``, ``options``, ``masks``, ``report`` — names and plain values everything shares
2. ``models`` — a model in memory: its blocks, linears, low-rank module, run-time device/dtype
3. ``formats`` — everything on disk (and the deprecated ``export``, ``codec`` paths into it)
4. ``data``, ``config``, ``calibration``, ``methods``, ``allocation``, ``analysis``, ``eval``,
   ``structured``, ``activation``, ``recover``, ``kernels`` — compressing and measuring
5. ``api``, ``streaming``, ``sweep``, ``pipeline`` — the pipelines
6. ``cli`` — parses, asks the library, prints
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "prunekit"

LAYERS = [
    {"errors", "_deprecated"},
    {"registry", "options", "masks", "report"},
    {"models"},
    {"formats", "export", "codec"},
    {"data", "config", "calibration", "methods", "allocation", "analysis", "eval", "structured", "activation",
     "recover", "kernels", "families"},
    {"api", "streaming", "sweep", "pipeline"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}

#: the file names of prunekit's own formats (their constants in prunekit.formats must keep these values)
ON_DISK = {
    "prunekit_report.json": ("sizes", "REPORT_FILE"),
    "prunekit_compressed.json": ("compressed_read", "MANIFEST"),
    "prunekit-compressed-rest.safetensors": ("compressed_read", "REST_FILE"),
    "prunekit_lowrank.json": ("lowrank", "MANIFEST"),
    "prunekit_lowrank.safetensors": ("lowrank", "WEIGHTS"),
    "prunekit_lowrank.safetensors.index.json": ("lowrank", "SHARD_INDEX"),
    "prunekit_structured.json": ("structured", "MANIFEST"),
    "prunekit_structured.safetensors": ("structured", "WEIGHTS"),
    "activation_sparsity.json": ("activation", "MANIFEST"),
    "activation_sparsity.safetensors": ("activation", "TENSORS"),
}
#: what a name may contain to count as an on-disk name (block shards are ``prunekit-compressed-block-NNNNN``)
ON_DISK_PATTERNS = [*ON_DISK, "prunekit-compressed-block-", "prunekit_lowrank-"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str | None:
    """``prunekit.models.blocks`` -> ``models``; the root and names defined in it (``__version__``) -> None."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    head = parts[1]
    return head if (PKG / head).is_dir() or (PKG / f"{head}.py").is_file() else None


def _is_shim_getattr(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "moved" for n in ast.walk(node))


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every prunekit import in ``path``, in functions too (not in shim getattrs)."""
    module = _module_name(path)
    return _imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def _imports_in(text: str, package: str) -> list[tuple[str, int]]:
    """:func:`_imports` of source ``text`` in package ``package`` (relative imports resolve from it)."""
    tree = ast.parse(text)
    skip = {id(n) for top in tree.body if _is_shim_getattr(top) for n in ast.walk(top)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("prunekit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("prunekit"):
                continue
            # ``from prunekit import formats`` imports the submodule prunekit.formats
            out += [(f"{target}.{a.name}" if target == "prunekit" and _unit(f"{target}.{a.name}") else target,
                     node.lineno) for a in node.names]
    return sorted(out, key=lambda x: x[1])


def _edges() -> dict[tuple[str, str], list[str]]:
    """``(unit, imported unit)`` -> where (``module:line``), between different units."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        src = _unit(_module_name(path))
        if src is None:
            continue  # the root facade
        for target, line in _imports(path):
            dst = _unit(target)
            if dst is not None and dst != src:
                edges.setdefault((src, dst), []).append(f"{_module_name(path)}:{line}")
    return edges


def _cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ------------------------------------------------------------------------------ (a) (b) the import graph


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in PKG.rglob("*.py")} - {None}
    assert units <= set(LAYER), f"units without a layer (add them to LAYERS): {sorted(units - set(LAYER))}"


def test_no_import_cycle_between_packages():
    edges = _edges()
    cycles = _cycles(edges)
    where = {" <-> ".join(c): {f"{a}->{b}": edges[a, b][:3] for (a, b) in edges if a in c and b in c} for c in cycles}
    assert not cycles, f"import cycles between prunekit's packages: {where}"


def test_no_upward_import():
    up = {f"{a} (layer {LAYER[a]}) -> {b} (layer {LAYER[b]})": where[:3] for (a, b), where in _edges().items()
          if a in LAYER and b in LAYER and LAYER[b] > LAYER[a]}
    assert not up, f"imports of a higher layer: {up}"


def test_the_checker_sees_in_function_root_and_relative_imports_but_not_shim_getattrs():
    text = ("import prunekit.api\n"
            "from .. import formats, __version__\n"
            "def f():\n    from ..calibration import engine\n    from . import linear\n"
            "def __getattr__(name):\n    from ..cli import prune\n    return moved(__name__, name, prune)\n")
    got = [(m, _unit(m)) for m, _ in _imports_in(text, "prunekit.models")]
    assert got == [("prunekit.api", "api"), ("prunekit.formats", "formats"), ("prunekit", None),
                   ("prunekit.calibration", "calibration"), ("prunekit.models", "models")], got
    assert _cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]


def _from_imports(path: Path):
    """``(imported module, names)`` of every ``from prunekit... import`` in ``path``, a name that is a
    submodule counted as that module (not in shim getattrs; the root excluded)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in tree.body if _is_shim_getattr(top) for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith("prunekit."):
            continue
        for a in node.names:
            sub = PKG.parent / f"{target}.{a.name}".replace(".", "/")
            yield (f"{target}.{a.name}", []) if sub.is_dir() or sub.with_suffix(".py").is_file() else (target, [a.name])


def test_no_import_cycle_between_modules():
    """Finer than packages: no two modules import each other (export/lowrank <-> export/structured did,
    through an in-function import)."""
    edges = {(_module_name(p), target): [] for p in PKG.rglob("*.py") for target, _ in _from_imports(p)
             if target != _module_name(p)}
    assert not _cycles(edges), f"import cycles between modules: {_cycles(edges)}"


def test_sweeps_sequence_nothing_themselves():
    """A sweep cell is one prunekit.pipeline.run: nothing in sweep/ calls the library's prune entry point."""
    where = [f"{_module_name(p)}:{line}" for p in (PKG / "sweep").rglob("*.py") for target, line in _imports(p)
             if _unit(target) == "api"]
    assert not where, f"sweep/ imports prunekit.api (prune through prunekit.pipeline instead): {where}"
    assert ("sweep", "pipeline") in _edges()


def test_the_activation_family_and_its_package_import_no_config():
    """The activation family imports prunekit.activation; neither it nor the activation package imports
    prunekit.config, which imports the families (that would be a cycle config -> families -> activation -> config)."""
    edges = _edges()
    assert ("families", "activation") in edges
    bad = {k: v for k, v in edges.items() if k in {("activation", "config"), ("activation", "families"),
                                                   ("families", "config")}}
    assert not bad, bad


def test_no_private_name_is_imported_from_the_model_and_format_packages():
    """``_name`` is private to its module: nothing takes one from prunekit.models, .formats or .export."""
    owned = ("prunekit.models", "prunekit.formats", "prunekit.export", "prunekit.codec")
    bad = sorted(f"{_module_name(p)} imports {target}.{n}" for p in PKG.rglob("*.py")
                 for target, names in _from_imports(p) if target.startswith(owned) and target != _module_name(p)
                 for n in names if n.startswith("_"))
    assert not bad, bad


# ------------------------------------------------------------------------------ (c) file names only in formats/


def test_on_disk_names_are_the_formats_constants():
    for value, (module, name) in ON_DISK.items():
        assert getattr(importlib.import_module(f"prunekit.formats.{module}"), name) == value
    from prunekit.formats.compressed_read import block_file

    assert block_file(3).startswith("prunekit-compressed-block-")


def test_on_disk_names_occur_only_in_formats():
    files = [p for p in [*PKG.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
             if not p.is_relative_to(PKG / "formats")]
    found = {f"{p.relative_to(ROOT)}: {name}" for p in files for name in ON_DISK_PATTERNS if name in p.read_text()}
    assert not found, f"on-disk file names outside prunekit/formats (ask prunekit.formats instead): {sorted(found)}"


# ------------------------------------------------------------------------------ (d) every format: registered, detected


FORMAT_MODULES = ["dense", "compressed", "lowrank", "structured", "gguf"]
#: formats that sit beside another format's weights (load_model attaches them once the weights are loaded)
OVERLAY_MODULES = ["activation"]


def test_every_format_module_registers_one_format():
    from prunekit.formats import FORMATS, Format, detection_order, overlays

    for name in FORMAT_MODULES + OVERLAY_MODULES:
        module = importlib.import_module(f"prunekit.formats.{name}")
        mine = [v for v in vars(module).values() if isinstance(v, Format) and type(v).__module__ == module.__name__]
        assert len(mine) == 1 and FORMATS.get(name) is mine[0] and mine[0].name == name, name
        for method in ("detect", "save", "load"):
            assert method in type(mine[0]).__dict__, f"{name} does not define {method}"
    assert sorted(FORMATS.names()) == sorted(FORMAT_MODULES + OVERLAY_MODULES)
    assert [f.name for f in overlays()] == OVERLAY_MODULES and not {f.name for f in detection_order()} & set(OVERLAY_MODULES)


@pytest.fixture(scope="module")
def tok():
    from conftest import tiny_tokenizer

    return tiny_tokenizer(320)


def _llama(tok) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _shaped_for(fmt: str, model: nn.Module) -> nn.Module:
    """The model each format is for: factorized (lowrank), per-block widths (structured), else as is."""
    from prunekit.models import set_module
    from prunekit.models.lowrank import LowRankLinear

    if fmt == "lowrank":
        lin = model.model.layers[0].mlp.down_proj
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        set_module(model, "model.layers.0.mlp.down_proj", LowRankLinear.from_factors(vh[:8] * s[:8, None], u[:, :8]))
    if fmt == "structured":  # block 0's FFN narrower than block 1's: no single config field says it
        mlp = model.model.layers[0].mlp
        mlp.gate_proj, mlp.up_proj = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
        mlp.down_proj = nn.Linear(32, 64, bias=False)
        mlp.intermediate_size = 32
    return model


@pytest.mark.parametrize("name", FORMAT_MODULES)
def test_detect_recognises_what_the_format_saved(name, tok, tmp_path):
    from prunekit.formats import FORMATS, detect, detection_order, load_model

    fmt = FORMATS.get(name)
    model = _shaped_for(name, _llama(tok))
    out = tmp_path / ("m.gguf" if name == "gguf" else "m")
    saved, how = fmt.save(model, tok, out)
    assert how and fmt.detect(saved) and detect(saved) is fmt
    others = [f.name for f in detection_order() if f is not fmt and f.name != "dense" and f.detect(saved)]
    assert not others, f"{name}'s folder is also detected as {others}"
    if name != "gguf":  # a folder: load_model reads it back through the format it detected
        again, _ = load_model(str(saved))
        ids = torch.tensor([[1, 5, 9, 2, 7]])
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("weights", ["dense", "compressed"])
def test_the_activation_overlay_is_detected_beside_the_weights_and_attached_on_load(weights, tok, tmp_path):
    """Thresholds saved beside dense or compressed weights: the weights' format is still what detect() names,
    the overlay recognises its files, and load_model (or the overlay's own load) installs them again."""
    from prunekit import ActivationSparsityConfig, compress
    from prunekit.formats import ACTIVATION, FORMATS, detect, load_model, save_with_thresholds
    from prunekit.models.activation import state_of

    model = _llama(tok)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    compress(model, ActivationSparsityConfig(sparsity=0.4, max_tokens=64), calib=ids)
    with torch.no_grad():
        masked = model(ids).logits
    if weights == "dense":
        saved, how = ACTIVATION.save(model, tok, tmp_path / "m")
    else:
        saved, how = save_with_thresholds(model, tok, tmp_path / "m", save_format=weights)
    assert "activation thresholds" in how and ACTIVATION.detect(saved) and detect(saved) is FORMATS.get(weights)
    for again in (load_model(str(saved))[0], ACTIVATION.load(saved, torch.float32)):
        assert state_of(again) is not None and state_of(again).thresholds.keys() == state_of(model).thresholds.keys()
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, masked)


def test_the_activation_overlay_refuses_a_model_without_thresholds(tok, tmp_path):
    from prunekit.errors import ConfigError
    from prunekit.formats import ACTIVATION

    with pytest.raises(ConfigError, match="carries no activation thresholds"):
        ACTIVATION.save(_llama(tok), tok, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ (e) the old paths


OLD_PATHS = [
    ("prunekit.export", "save_folder", "prunekit.formats", "save_folder"),
    ("prunekit.export", "REPORT_FILE", "prunekit.formats", "REPORT_FILE"),
    ("prunekit.export", "reserve_output", "prunekit.formats.atomic", "reserve_output"),
    ("prunekit.export", "model_bytes", "prunekit.formats.sizes", "model_bytes"),
    ("prunekit.export", "save_model", "prunekit.formats.dense", "save_model"),
    ("prunekit.export", "SAVE_FORMATS", "prunekit.formats.save", "SAVE_FORMATS"),
    ("prunekit.export.atomic", "atomic_folder", "prunekit.formats.atomic", "atomic_folder"),
    ("prunekit.export.atomic", "check_free_space", "prunekit.formats.atomic", "check_free_space"),
    ("prunekit.export.compressed", "save_compressed_folder", "prunekit.formats.compressed_write", "save_compressed_folder"),
    ("prunekit.export.compressed", "CompressedWriter", "prunekit.formats.compressed_write", "CompressedWriter"),
    ("prunekit.export.formats", "save_folder", "prunekit.formats.save", "save_folder"),
    ("prunekit.export.formats", "describe", "prunekit.formats.sizes", "describe"),
    ("prunekit.export.lowrank", "save_lowrank", "prunekit.formats.lowrank", "save_lowrank"),
    ("prunekit.export.lowrank", "save_merged", "prunekit.formats.dense", "save_merged"),
    ("prunekit.export.lowrank", "save_compressed", "prunekit.formats.save", "save_compressed"),
    ("prunekit.export.save", "save_model", "prunekit.formats.dense", "save_model"),
    ("prunekit.export.save", "dense_weights_bytes", "prunekit.formats.sizes", "dense_weights_bytes"),
    ("prunekit.export.space", "estimate_output_bytes", "prunekit.formats.space", "estimate_output_bytes"),
    ("prunekit.export.structured", "save_structured", "prunekit.formats.structured", "save_structured"),
    ("prunekit.export.structured", "PRUNEKIT", "prunekit.formats.structured", "PRUNEKIT"),
    ("prunekit.export.structured", "plain_config", "prunekit.formats.structured_plain", "plain_config"),
    ("prunekit.export.structured", "is_restructured", "prunekit.formats.structured_plain", "is_restructured"),
    ("prunekit.codec", "encode", "prunekit.formats.codec", "encode"),
    ("prunekit.models.compressed", "MANIFEST", "prunekit.formats.compressed_read", "MANIFEST"),
    ("prunekit.models.compressed", "load_compressed_model", "prunekit.formats.compressed_read", "load_compressed_model"),
    ("prunekit.models.compressed", "CompressedSource", "prunekit.formats.compressed_read", "CompressedSource"),
    ("prunekit.models.loading", "load_model", "prunekit.formats.load", "load_model"),
    ("prunekit.models.loading", "resolve_source", "prunekit.formats.sources", "resolve_source"),
    ("prunekit.models.loading", "cache_root", "prunekit.formats.sources", "cache_root"),
    ("prunekit.models.loading", "LOAD_HOOKS", "prunekit.formats.load", "LOAD_HOOKS"),
    ("prunekit.models.loading", "resolve_dtype", "prunekit.models.runtime", "resolve_dtype"),
    ("prunekit.models.loading", "_gguf_cache_dir", "prunekit.formats.gguf_read", "gguf_cache_dir"),
    ("prunekit.models.lazy", "LazyModel", "prunekit.formats.lazy", "LazyModel"),
    ("prunekit.models.shards", "ShardWriter", "prunekit.formats.shards", "ShardWriter"),
    ("prunekit.models.structured", "MANIFEST", "prunekit.formats.structured", "MANIFEST"),
    ("prunekit.models.structured", "load_structured_model", "prunekit.formats.structured", "load_structured_model"),
    ("prunekit.models.tokenizer_match", "check_same_tokenizer", "prunekit.formats.tokenizer_match",
     "check_same_tokenizer"),
    ("prunekit.models.lowrank", "MANIFEST", "prunekit.formats.lowrank", "MANIFEST"),
    ("prunekit.models.lowrank", "load_lowrank_model", "prunekit.formats.lowrank", "load_lowrank_model"),
    ("prunekit.models", "load_model", "prunekit.formats", "load_model"),
    ("prunekit.models", "resolve_source", "prunekit.formats", "resolve_source"),
    ("prunekit.activation.base", "ActivationState", "prunekit.models.activation", "ActivationState"),
    ("prunekit.activation.base", "state_of", "prunekit.models.activation", "state_of"),
    ("prunekit.activation.base", "GateMask", "prunekit.models.activation", "GateMask"),
    ("prunekit.activation.base", "keep_mask", "prunekit.models.activation", "keep_mask"),
    ("prunekit.activation.io", "save_with_thresholds", "prunekit.formats.activation", "save_with_thresholds"),
    ("prunekit.activation.io", "read_side_files", "prunekit.formats.activation", "read_side_files"),
    ("prunekit.activation.io", "attach_saved", "prunekit.formats.activation", "attach_saved"),
    ("prunekit.activation.io", "MANIFEST", "prunekit.formats.activation", "MANIFEST"),
    ("prunekit.activation", "save_with_thresholds", "prunekit.formats.activation", "save_with_thresholds"),
    ("prunekit.activation", "write_side_files", "prunekit.formats.activation", "write_side_files"),
    ("prunekit.activation", "has_saved", "prunekit.formats.activation", "has_saved"),
]


@pytest.mark.parametrize("old, name, new, new_name", OLD_PATHS, ids=[f"{o}.{n}" for o, n, _, _ in OLD_PATHS])
def test_old_import_path_warns_and_gives_the_same_object(old, name, new, new_name):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=new_name):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), new_name)


def test_what_did_not_move_does_not_warn():
    import prunekit
    from prunekit.formats import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from prunekit.models import find_blocks, resolve_dtype  # noqa: F401
        from prunekit.models.lowrank import LowRankLinear  # noqa: F401

        assert prunekit.load_model is load_model
    with pytest.raises(AttributeError):
        importlib.import_module("prunekit.export").no_such_name  # noqa: B018
