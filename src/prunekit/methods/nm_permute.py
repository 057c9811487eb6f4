"""Input-channel permutation for N:M sparsity (RIA's "channel permutation", Zhang et al., ICLR 2024).

N:M keeps N of every M *consecutive* inputs; which inputs share a group is arbitrary, so permuting
the input channels first lets the important ones spread over different groups and more of the total
score survive. RIA's reference (biomedical-cybernetics/Relative-importance-and-activation-pruning,
``prune_ria`` with ``--reallocation --lsa``) does it in two steps, both reproduced here:

1. **heuristic channel reallocation** — channels sorted by their column score sum (ascending);
   the k-th quarter (for M = 4) of that order fills position k of every group, alternately in order
   and reversed, so each group gets one channel from every quantile;
2. **linear sum assignment**, once per position of a group: the channels currently at that position
   are re-dealt to the groups so as to maximise the total score the N:M mask keeps, an exact
   assignment problem (``scipy.optimize.linear_sum_assignment``).

A permutation ``perm`` means the layer's N:M groups run over ``W[:, perm]``: the mask is N:M in that
order, not in the stored one. A kernel for N:M needs the inputs gathered by ``perm`` (RIA's own
deployment path); prunekit's compressed format stores such a layer with a bitmask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..masks import nm_mask


def kept_score(scores: Tensor, n: int, m: int) -> float:
    """The total score an N:M mask keeps (the N largest of every M consecutive columns)."""
    rows, cols = scores.shape
    return float(torch.topk(scores.reshape(rows, cols // m, m), n, dim=-1).values.sum())


def reallocation_order(scores: Tensor, m: int) -> Tensor:
    """RIA's heuristic channel reallocation: the column order (``index``) of step 1."""
    cols = scores.shape[1]
    order = torch.sort(torch.sum(scores, dim=0))[1]
    index = torch.zeros_like(order)
    for k in range(1, m + 1):
        chunk = order[int(cols * (k - 1) / m): int(cols * k / m)]
        index[k - 1::m] = chunk if k % 2 == 1 else chunk.flip(0)
    return index


def _assignment_scores(scores: Tensor, position: int, n: int, m: int) -> Tensor:
    """``S[g, k]``: the score group ``g`` keeps if the channel now at ``position`` of group ``k`` moves there."""
    rows, cols = scores.shape
    groups = cols // m
    grouped = scores.reshape(rows, groups, m)
    movers = grouped[:, :, position]  # [rows, k]
    others = torch.cat([grouped[:, :, :position], grouped[:, :, position + 1:]], dim=2)  # [rows, g, m-1]
    out = torch.empty(groups, groups, dtype=torch.float64)
    for g in range(groups):
        cand = torch.cat([movers.unsqueeze(2), others[:, g:g + 1, :].expand(rows, groups, m - 1)], dim=2)
        out[g] = torch.topk(cand, n, dim=2).values.sum(dim=(0, 2)).double()
    return out


def lsa_refine(scores: Tensor, index: Tensor, n: int, m: int) -> Tensor:
    """RIA's step 2: for each position of a group, re-deal its channels by a linear sum assignment."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ConfigError("RIA's channel permutation (permute=true) needs scipy: pip install scipy, "
                          "or pass --option permute=false") from None
    index = index.clone()
    groups = scores.shape[1] // m
    for position in range(m):
        s = _assignment_scores(scores[:, index], position, n, m)
        _, cols = linear_sum_assignment(s.numpy(), maximize=True)
        at = torch.arange(groups) * m + position
        index[at] = index[torch.as_tensor(cols, dtype=torch.long) * m + position]
    return index


def permuted_nm_mask(scores: Tensor, n: int, m: int, lsa: bool = True) -> tuple[Tensor, Tensor, dict]:
    """``(keep, perm, info)``: an N:M keep-mask after RIA's channel permutation, in the stored column order.

    ``keep[:, perm]`` is N:M; ``info`` has the kept score before and after each step.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M with M={m} needs M to divide the input width {cols}")
    scores = scores.float()
    info = {"kept_score_plain": kept_score(scores, n, m)}
    perm = reallocation_order(scores, m)
    info["kept_score_reallocated"] = kept_score(scores[:, perm], n, m)
    if lsa:
        perm = lsa_refine(scores, perm, n, m)
        info["kept_score_lsa"] = kept_score(scores[:, perm], n, m)
    keep = torch.empty_like(scores, dtype=torch.bool)
    keep[:, perm] = nm_mask(scores[:, perm], n, m)
    return keep, perm, info
