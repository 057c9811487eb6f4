"""Optimal Brain Surgeon on groups of input columns (SlimGPT, Ling et al., NeurIPS 2024, Sec. 3).

For an output projection ``W`` (``[out, d]``) with input Hessian ``H = X^T X`` (``[d, d]``),
removing the columns ``G`` and moving the others to compensate costs, to second order and exactly
for this quadratic objective,

    E_G = tr(W_G (H^{-1}_{GG})^{-1} W_G^T)                          (SlimGPT eq. 5)

and the compensating update of every column is

    dW = -W_G (H^{-1}_{GG})^{-1} H^{-1}_{G,:}                        (SlimGPT eq. 6)

which zeroes ``W_G`` and leaves the kept columns at the least-squares optimum
``W'_K = W H_{:,K} H_{KK}^{-1}`` (the minimiser of ``||W X - W'_K X_K||^2``). After removing ``G``,
the inverse Hessian of the kept columns is the Schur complement
``H^{-1} - H^{-1}_{:,G} (H^{-1}_{GG})^{-1} H^{-1}_{G,:}`` (rows/columns ``G`` become zero), which
is what the greedy selection below updates instead of re-inverting.

Appending a constant input feature (a row of ones in ``X``, ``H`` grows by ``[sum(x); n]``) makes
the same update also fit a bias: the removed columns' *mean* contribution (FLAP's compensation) and
their correlation with the kept ones are both absorbed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def damp_hessian(h: Tensor, percdamp: float) -> Tensor:
    """``H`` in float64 with dead inputs (``H_jj = 0``) set to 1 and ``percdamp * mean(diag H)`` added."""
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    if percdamp > 0:
        diag += percdamp * float(diag.mean())
    return h


def inverse(h: Tensor) -> Tensor:
    """``H^{-1}`` via Cholesky; raises ``torch.linalg.LinAlgError`` if ``H`` is not positive definite.

    ``cholesky_solve`` against the identity, not ``cholesky_inverse``: in float64 on this CPU the
    latter took 3.7 s for a 1536-wide Hessian, the former 0.5 s (same result).
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.cholesky_solve(eye, torch.linalg.cholesky(h))


def group_error(w: Tensor, hinv: Tensor, cols: Tensor) -> float:
    """``tr(W_G (H^{-1}_{GG})^{-1} W_G^T)``: the output error of removing columns ``cols`` (eq. 5)."""
    wg = w[:, cols]
    sub = hinv[cols][:, cols]
    return float((wg * torch.linalg.solve(sub, wg.t()).t()).sum())


def column_errors(w: Tensor, hinv: Tensor) -> Tensor:
    """Eq. 5 for every single column at once: ``sum_i W_ij^2 / [H^{-1}]_jj``."""
    return (w * w).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)


def downdate(hinv: Tensor, cols: Tensor) -> Tensor:
    """The inverse Hessian after removing ``cols`` (Schur complement; their rows/columns become 0)."""
    sub = hinv[cols][:, cols]
    return hinv - hinv[:, cols] @ torch.linalg.solve(sub, hinv[cols, :])


def obs_update(w: Tensor, hinv: Tensor, removed: Tensor) -> Tensor:
    """``W + dW`` of eq. 6 for the boolean column mask ``removed`` (float64 maths, ``w``'s dtype back)."""
    idx = torch.nonzero(removed, as_tuple=False).flatten()
    if idx.numel() == 0:
        return w.clone()
    w64 = w.to(torch.float64)
    sub = hinv[idx][:, idx]
    out = w64 - w64[:, idx] @ torch.linalg.solve(sub, hinv[idx, :])
    out[:, idx] = 0.0
    return out.to(w.dtype)


def augment(h: Tensor, col_sum: Tensor, count: int) -> Tensor:
    """``[[H, sum x], [sum x^T, n]]``: the Hessian of the inputs with a constant feature appended."""
    d = h.shape[0]
    out = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=h.device)
    out[:d, :d] = h
    out[:d, d] = col_sum.to(torch.float64)
    out[d, :d] = col_sum.to(torch.float64)
    out[d, d] = float(count)
    return out


def greedy_groups(w: Tensor, hinv: Tensor, groups: list[Tensor], n_remove: int, per_step: int = 1,
                  allowed: list[list[int]] | None = None) -> list[int]:
    """Remove ``n_remove`` of ``groups`` (column index sets) greedily by eq. 5, downdating ``H^{-1}``.

    ``per_step`` groups go per downdate (SlimGPT's batched greedy pruning; 1 is the exact greedy).
    ``allowed``: a sequence of candidate lists, one per step (e.g. the heads of one key/value
    group), each step removing the best of its list; ``None``: every remaining group competes.
    Returns the removed group indices in removal order. ``W`` is only read (the errors are those of
    the updated weights, which eq. 6 implies; the final update is applied once by the caller).
    """
    w = w.to(torch.float64).clone()
    hinv = hinv.clone()
    removed: list[int] = []
    steps = allowed if allowed is not None else None
    k = 0
    while len(removed) < n_remove:
        cand = steps[k] if steps is not None else [g for g in range(len(groups)) if g not in removed]
        cand = [g for g in cand if g not in removed]
        if not cand:
            break
        errs = torch.tensor([group_error(w, hinv, groups[g]) for g in cand])
        take = 1 if steps is not None else min(per_step, n_remove - len(removed))
        chosen = [cand[int(i)] for i in torch.argsort(errs, stable=True)[:take]]
        cols = torch.cat([groups[g] for g in chosen])
        sub = hinv[cols][:, cols]
        w = w - w[:, cols] @ torch.linalg.solve(sub, hinv[cols, :])
        hinv = downdate(hinv, cols)
        removed += chosen
        k += 1
    return removed


def greedy_columns(w: Tensor, hinv: Tensor, n_remove: int, rounds: int = 8, forbid: Tensor | None = None) -> Tensor:
    """Single columns removed in ``rounds`` batches by eq. 5, downdating between batches; a bool mask.

    ``forbid``: columns never removed (the constant feature of an augmented Hessian).
    """
    d = w.shape[1]
    w = w.to(torch.float64).clone()
    hinv = hinv.clone()
    removed = torch.zeros(d, dtype=torch.bool)
    if forbid is not None:
        blocked = forbid.clone()
    else:
        blocked = torch.zeros(d, dtype=torch.bool)
    left = n_remove
    for r in range(rounds):
        if left <= 0:
            break
        take = -(-left // (rounds - r))  # ceil: even batches, the last one exact
        errs = column_errors(w, hinv)
        errs[removed | blocked] = float("inf")
        cols = torch.argsort(errs, stable=True)[:take]
        sub = hinv[cols][:, cols]
        w = w - w[:, cols] @ torch.linalg.solve(sub, hinv[cols, :])
        hinv = downdate(hinv, cols)
        removed[cols] = True
        left -= take
    return removed
