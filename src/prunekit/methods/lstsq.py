"""Least squares on a fixed sparsity pattern: refit a pruned layer's kept weights to the dense outputs.

For a layer with dense weight ``W`` (``[out, in]``), calibration Gram matrix ``H = X^T X`` and a
keep-mask ``M``, the kept weights that best reproduce the dense outputs solve, row by row,

    min_{W' : W'[~M] = 0}  tr((W' - W) H (W' - W)^T)   <=>   (H W'^T)[M^T] = (H W^T)[M^T]

— one linear system per output row, on that row's support. All rows are solved at once by
conjugate gradients restricted to the support (residuals masked), on ``H`` damped by
``percdamp * mean(diag H)`` (SparseGPT's and ALPS's ridge term) and scaled to a unit diagonal
(ALPS's normalization, i.e. Jacobi preconditioning). :func:`cg_on_support` follows the
arithmetic of ALPS's ``cg_batch`` (mazumder-lab/ALPS, "a modified version of torch_cg") so ALPS's
refit reproduces the reference; :func:`masked_lstsq` is the layer-level entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cg_on_support(a: Tensor, b: Tensor, supp: Tensor, x0: Tensor, maxiter: int, rtol: float = 1e-4,
                  stop: str = "masked") -> tuple[Tensor, int]:
    """Solve ``A X = B`` for ``X`` (``[n, m]``) with ``X`` zero outside ``supp``, by batched CG.

    Each column of ``X`` is its own system (restricted to that column's support); ``x0`` must be
    zero outside ``supp``. Stopping: ``stop="masked"`` — when every column's masked residual
    ``||((B - A X) * supp)_col||`` is at most ``rtol`` times ``||(B * supp)_col||``;
    ``stop="reference"`` — ALPS's rule, the unmasked residual's norm per *row* ``||(A X - B)_row||``
    against ``rtol * ||B_row||`` (it rarely fires on a constrained problem, so ``maxiter`` decides).

    Returns:
        ``(X, iterations run)``.
    """
    suppf = supp.to(b.dtype)
    x = x0
    r = (b - a @ x) * suppf
    z = r
    p = torch.zeros_like(z)
    r1, z1 = r, z
    if stop == "reference":
        limit = rtol * torch.norm(b, dim=1)
    else:
        limit = rtol * torch.norm(b * suppf, dim=0)
    k = 0
    for k in range(1, maxiter + 1):
        z = r  # identity preconditioner on the (unit-diagonal) system
        if k == 1:
            p, r1, z1 = z, r, z
        else:
            r2, z2, p1 = r1, z1, p
            r1, z1 = r, z
            den = (r2 * z2).sum(0)
            den[den == 0] = 1e-8
            beta = (r1 * z1).sum(0) / den
            p = z1 + beta.unsqueeze(0) * p1
        ap = a @ p
        den = (p * ap).sum(0)
        den[den == 0] = 1e-8
        alpha = (r1 * z1).sum(0) / den
        x = x + alpha.unsqueeze(0) * p
        r = (r1 - alpha.unsqueeze(0) * ap) * suppf
        if stop == "reference":
            done = bool((torch.norm(a @ x - b, dim=1) <= limit).all())
        else:
            done = bool((torch.norm(r, dim=0) <= limit).all())
        if done:
            break
    return x, k


def normalized_gram(h: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """``(H_n, s)``: ``H`` (float32) damped by ``percdamp * mean(diag H)`` and scaled to a unit diagonal,
    ``H_n = H / s / s^T`` with ``s = sqrt(diag) + 1e-8`` (ALPS's normalization, in its order of operations)."""
    h = h.clone()
    damp = percdamp * torch.mean(torch.diag(h)).item()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp
    s = torch.diag(h).sqrt() + 1e-8
    h = h / s
    h = (h.T / s).T
    return h, s


def masked_lstsq(dense: Tensor, current: Tensor, h: Tensor, keep: Tensor, maxiter: int = 20, rtol: float = 1e-4,
                 percdamp: float = 0.01) -> tuple[Tensor, dict]:
    """The kept weights of ``current`` refit to the dense layer ``dense`` on the Gram matrix ``h``.

    Args:
        dense: the dense weight ``[out, in]`` (the target is ``dense @ X``).
        current: the pruned weight (the starting point; zero where ``keep`` is False).
        h: ``X^T X`` up to a scale (e.g. :meth:`InputStats.hessian`), ``[in, in]``.
        keep: the sparsity pattern to hold (True = kept).

    Returns:
        The refit weight (float32, exactly zero off ``keep``), and ``{"iters", "error_before",
        "error_after"}``: relative output errors ``tr(D H D^T) / tr(W H W^T)`` of the layer.
    """
    w = dense.float()
    hn, s = normalized_gram(h.float(), percdamp)
    target = (w * s).t()  # the dense weight in the scaled variables, [in, out]
    b = hn @ target
    supp = keep.t()
    x0 = (current.float() * s).t() * supp
    x, iters = cg_on_support(hn, b, supp, x0.contiguous(), maxiter, rtol)
    new = (x.t() / s).masked_fill_(~keep, 0.0)
    err = (layer_error(w, current.float().masked_fill(~keep, 0.0), h), layer_error(w, new, h))
    return new, {"iters": iters, "error_before": err[0], "error_after": err[1]}


def layer_error(dense: Tensor, new: Tensor, h: Tensor) -> float:
    """Relative output error ``tr((W - W') H (W - W')^T) / tr(W H W^T)`` (float32 products, float64 sums)."""
    w, d, hf = dense.float(), (dense.float() - new.float()), h.float()
    den = float(((w @ hf) * w).sum(dtype=torch.float64))
    return float(((d @ hf) * d).sum(dtype=torch.float64)) / den if den > 0 else 0.0
