"""The Python entry points: ``prune``, ``evaluate`` (and ``load_model`` from ``models``).

Three lines prune a model::

    model, tok = prunekit.load_model("smollm2-135m")
    report = prunekit.prune(model, prunekit.PruneConfig(method="wanda", sparsity=0.5), tokenizer=tok)
    print(prunekit.evaluate(model, tok)["wikitext2"].ppl)
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn

from .activation import sparsify_activations  # noqa: F401  (re-exported: prunekit.sparsify_activations)
from .allocation.base import Allocator
from .calibration import BlockEvent
from .config import EvalConfig, PruneConfig
from .eval import PerplexityResult, perplexity
from .families.base import Family, FamilyConfig, compress, prepare, select_linears  # noqa: F401  (select_linears: re-exported)
from .methods import Method
from .report import Report
from .structured import StructuredCriterion

log = logging.getLogger(__name__)


def build_components(config: PruneConfig) -> tuple[Method | StructuredCriterion, Allocator | None]:
    """The configured method (wrapped with its refiner) or structured criterion, and the allocator
    (``None`` for the structured ``global`` threshold), every option validated; built once.

    Kept for callers of the flat config: :func:`prunekit.families.prepare` gives the family's handler
    with these components on it (``handler.method`` / ``handler.criterion``, ``handler.allocator``).

    Raises:
        ConfigError: an unknown name, a bad option, or a pattern the method cannot produce.
    """
    handler = prepare(config)
    return (handler.method if hasattr(handler, "method") else handler.criterion), handler.allocator


def check_model(model: nn.Module, config: PruneConfig | Family) -> dict[str, nn.Module]:
    """Everything about ``model`` that can fail before any work (the CLI calls it before the dense baseline).

    ``config``: a handler from :func:`prunekit.families.prepare` checks with the components it
    built; a flat or family config builds them first.
    """
    return prepare(config).check(model)


def prune(
    model: nn.Module,
    config: PruneConfig | FamilyConfig | Family,
    calib: Tensor | None = None,
    tokenizer=None,
    device: torch.device | str | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
    data_dir=None,
) -> Report:
    """Compress ``model`` in place as ``config`` says and return the :class:`Report`:
    :func:`prunekit.compress` with the config's family (``config.family()``).

    Args:
        model: a Hugging Face causal LM.
        config: method, sparsity, pattern, allocation, layer selection and calibration settings
            (a family config or a handler from :func:`prunekit.families.prepare` also works).
        calib: calibration token ids ``[n, seqlen]``; if ``None`` they are drawn from
            ``config.calib`` with ``tokenizer`` (methods that need no calibration skip this).
        tokenizer: needed only when ``calib`` is ``None`` and the method/allocation calibrates.
        device: compute device (``None`` = the model's device).
        callback: called after each block (progress bars).
        data_dir: where local dataset copies are (``None``: ``$PRUNEKIT_DATA``).
    """
    return compress(model, config, calib, tokenizer, device, callback, data_dir)


def evaluate(model: nn.Module, tokenizer, config: EvalConfig | None = None, data_dir=None,
             progress: Callable[[str, int, int], None] | None = None,
             token_cache: dict | None = None) -> dict[str, PerplexityResult]:
    """Perplexity of ``model`` on each dataset of ``config`` (default: WikiText-2, seqlen 2048).

    ``token_cache``: a dict to keep the tokenized texts in between calls (dense, then compressed).
    """
    config = config or EvalConfig()
    out = {}
    for ds in config.datasets:
        cb = (lambda i, n, _ds=ds: progress(_ds, i, n)) if progress else None
        out[ds] = perplexity(model, tokenizer, ds, config.seqlen, config.max_windows, config.batch_size, data_dir, cb,
                             token_cache, prompt=config.prompt)
    return out
