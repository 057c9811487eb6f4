"""Rotating the residual stream into its principal axes before activation thresholds (``rotate="pca"``).

A magnitude threshold on the input of a linear drops the coordinates that are small *in the basis
the model happens to use*. In a pre-norm transformer that basis is arbitrary: an orthogonal ``Q``
applied to the residual stream everywhere (embeddings ``E Q``, every linear that reads the stream
``W Q``, every linear that writes it ``Q^T W``) leaves the function unchanged once the norms' scales
are folded into the linears that read them — RMS normalisation is rotation invariant (SliceGPT,
Ashkboos et al. 2024, "computational invariance"; LaRoSa, 2025, rotates for activation sparsity).
With ``Q`` the eigenvectors of the normalised stream's second moment on calibration text, most of
the energy sits in few coordinates, so zeroing the smallest 40 % of them loses less of each input.

One ``Q`` for the whole model (pooled over every block's two norm outputs), folded into the weights:
nothing is added at decode — no ``d x d`` shortcut per residual add as with per-layer rotations. The
rotated model is a stock checkpoint of the same architecture with unit norm scales and an untied LM
head (``E diag(g_final) Q``: the final norm's scale cannot be folded into a tied matrix); the head is
read once per token either way, the copy costs memory and disk, not decode time.

Applies to pre-norm blocks with an ``input_layernorm`` before attention and a
``post_attention_layernorm`` before the FFN whose RMS norms scale by ``weight`` (Llama, Qwen2/3,
Mistral, SmolLM2), separate q/k/v/o projections and plain ``nn.Linear`` weights; anything else is
refused before work (Gemma's ``1 + weight`` norms and post-norms, fused projections, low-rank or
packed modules). Dense weights only: rotating pruned weights makes them dense again. After the
rotation a few tokens' logits are compared with the model's before it (fp32: relative error < 1e-4).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.activation import state_of
from ..models.blocks import find_blocks
from ..models.runtime import model_device
from ..models.structure import block_parts

log = logging.getLogger(__name__)

_NORMS = ("input_layernorm", "post_attention_layernorm")
#: the largest share of exact zeros in the weights a rotation accepts (dense weights have almost none)
_MAX_ZEROS = 0.01
#: relative error of the logits allowed after the rotation, by weight dtype
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


def _is_rms_norm(m: nn.Module | None, width: int) -> bool:
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return (name.endswith("RMSNorm") and not name.startswith("Gemma") and isinstance(w, Tensor)
            and tuple(w.shape) == (width,) and getattr(m, "bias", None) is None)


def _final_norm(model: nn.Module) -> nn.Module | None:
    path, _ = find_blocks(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    return getattr(parent, "norm", None)


def rotation_plan(model: nn.Module) -> list[tuple[nn.Module, nn.Module, list[nn.Linear], list[nn.Linear]]]:
    """Per block ``(norm before attention, norm before FFN, readers, writers)``, or a one-line ConfigError.

    Readers take the residual stream in (q, k, v, the FFN's inputs), writers add to it (o, the FFN's output).
    """
    width = model.config.get_text_config().hidden_size
    why = f"{type(model).__name__}: --act-rotate pca needs"
    emb, head, final = model.get_input_embeddings(), model.get_output_embeddings(), _final_norm(model)
    if not (isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and _is_rms_norm(final, width)):
        raise ConfigError(f"{why} token embeddings, an RMS final norm and a linear LM head; drop --act-rotate")
    _, blocks = find_blocks(model)
    plan = []
    for block, parts in zip(blocks, block_parts(model)):
        norms = [getattr(block, n, None) for n in _NORMS]
        if parts.attn is None or parts.ffn is None or parts.attn.layout != "separate" or \
                any(not _is_rms_norm(n, width) for n in norms):
            raise ConfigError(f"{why} pre-norm blocks (input_layernorm, post_attention_layernorm RMS norms scaled "
                              f"by weight; separate q/k/v/o; an FFN); block {parts.index} is not; drop --act-rotate")
        if any(n in dict(block.named_children()) for n in ("post_feedforward_layernorm", "pre_feedforward_layernorm")):
            raise ConfigError(f"{why} no norms after attention or the FFN (block {parts.index} has them); "
                              "drop --act-rotate")
        get = model.get_submodule
        readers = [get(n) for n in (parts.attn.q, parts.attn.k, parts.attn.v, *parts.ffn.inputs)]
        writers = [get(parts.attn.o), get(parts.ffn.output)]
        if any(type(m) is not nn.Linear for m in readers + writers):
            raise ConfigError(f"{why} plain nn.Linear projections; block {parts.index} holds "
                              f"{sorted({type(m).__name__ for m in readers + writers})}: drop --act-rotate")
        plan.append((norms[0], norms[1], readers, writers))
    zeros = sum(int((m.weight == 0).sum()) for p in plan for m in p[2] + p[3])
    total = sum(m.weight.numel() for p in plan for m in p[2] + p[3])
    if zeros > _MAX_ZEROS * total:
        raise ConfigError(f"the decoder weights are {zeros / total:.1%} zeros (pruned): a rotation makes them dense "
                          "again; drop --act-rotate, or rotate the dense model and prune afterwards")
    return plan


@torch.no_grad()
def _fold_norms(model: nn.Module, plan) -> None:
    """Scale each reader's columns by its norm's weight and set the norms to 1; untie and scale the head."""
    for attn_norm, ffn_norm, readers, _ in plan:
        for norm, mods in ((attn_norm, readers[:3]), (ffn_norm, readers[3:])):
            g = norm.weight.double()
            for m in mods:
                m.weight.copy_(m.weight.double() * g)
            norm.weight.fill_(1.0)
    final, head = _final_norm(model), model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.double().mul(final.weight.double()).to(head.weight.dtype),
                               requires_grad=head.weight.requires_grad)
    final.weight.fill_(1.0)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config()
    if text is not model.config:
        text.tie_word_embeddings = False


@torch.no_grad()
def _second_moment(model: nn.Module, plan, ids: Tensor, batch_size: int) -> Tensor:
    """``sum x x^T`` (float64) over every token of ``ids`` at every block's two norm outputs."""
    width = model.config.get_text_config().hidden_size
    acc = torch.zeros(width, width, dtype=torch.float64)

    def hook(_m, _args, out):
        x = out.detach().reshape(-1, width).float()
        acc.add_((x.T @ x).double())

    handles = [n.register_forward_hook(hook) for p in plan for n in p[:2]]
    try:
        dev = model_device(model)
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc


@torch.no_grad()
def _apply(model: nn.Module, plan, q: Tensor) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for m in (emb, head, *(r for p in plan for r in p[2])):
        m.weight.copy_(m.weight.double() @ q.to(m.weight.device))
    for m in (w for p in plan for w in p[3]):
        qt = q.T.to(m.weight.device)
        m.weight.copy_(qt @ m.weight.double())
        if m.bias is not None:
            m.bias.copy_(qt @ m.bias.double())


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids.to(model_device(model)), use_cache=False).logits.double().cpu()


def rotate_residual(model: nn.Module, ids: Tensor, batch_size: int = 8) -> dict:
    """Rotate ``model``'s residual stream (in place) into the principal axes of ``ids``' activations.

    Args:
        model: a dense pre-norm causal LM (see the module docstring for what is accepted).
        ids: calibration token ids ``[n, seqlen]``; every token enters the second moment.
        batch_size: sequences per forward pass.

    Thresholds already installed are removed first: they belong to the old basis, and the second moment
    must be of the model's own stream, not a thresholded one.

    Returns:
        The rotation's report: tokens, the share of the energy in the top tenth of the axes, the logits'
        relative change on a probe (checked), seconds.

    Raises:
        ConfigError: the architecture or the weights do not allow it (before anything changes).
        RuntimeError: the rotated model's logits differ from the original's beyond the dtype's tolerance.
    """
    t0 = time.perf_counter()
    plan = rotation_plan(model)
    old = state_of(model)
    if old is not None:  # taken off and detached: saving the rotated model must not write the old basis' thresholds
        old.remove()
        del model.prunekit_activation
    probe = ids[:1, : min(64, ids.shape[1])]
    before = _logits(model, probe)
    _fold_norms(model, plan)
    ev, vecs = torch.linalg.eigh(_second_moment(model, plan, ids, batch_size))
    ev, q = ev.flip(0), vecs.flip(1).contiguous()
    _apply(model, plan, q)
    after = _logits(model, probe)
    err = float((after - before).norm() / before.norm().clamp_min(1e-30))
    dtype = model.get_input_embeddings().weight.dtype
    tol = _TOLERANCE.get(dtype, 2e-2)
    if not err <= tol:
        raise RuntimeError(f"rotating the residual stream changed the logits by {err:.2e} (relative; {dtype} allows "
                           f"{tol:.0e}): this architecture is not rotation invariant as prunekit assumed; "
                           "reload the model and drop --act-rotate")
    top = float(ev[: max(1, len(ev) // 10)].sum() / ev.sum().clamp_min(1e-30))
    report = {"basis": "pca", "tokens": int(ids.numel()), "top_decile_energy": top, "logits_rel_change": err,
              "lm_head_untied": True, "seconds": time.perf_counter() - t0}
    log.info("residual stream rotated to its principal axes: %d tokens, top 10%% of the axes hold %.1f%% of the "
             "energy, logits changed by %.1e (relative), %.1fs", report["tokens"], 100 * top, err, report["seconds"])
    return report
