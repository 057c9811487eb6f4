"""``prunekit prune --activation-sparsity``: the flags, their checks, and the calibration step.

``--activation-sparsity S`` alone (no ``--method``, ``--sparsity``, ``--pattern`` or ``--config``)
leaves the weights dense; with weight pruning, the thresholds are calibrated on the pruned weights.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_activation_args(p: argparse.ArgumentParser) -> None:
    from ..activation import ACTIVATION_METHODS

    g = p.add_argument_group("activation sparsity (training-free; alone, or after weight pruning)")
    g.add_argument("--activation-sparsity", type=float, default=None, metavar="S",
                   help="zero this fraction of activations at inference (thresholds calibrated on --calib); alone "
                        "it leaves the weights dense")
    g.add_argument("--act-method", default=None, choices=ACTIVATION_METHODS.names(),
                   help="teal: every linear's input (default); cats: the MLP's gate activation; chess: channel-wise "
                        "gate thresholds + q/o inputs; wina: every linear's input, |x| weighted by the weight "
                        "column's norm")
    g.add_argument("--act-allocation", default=None, choices=["uniform", "greedy"],
                   help="per-linear sparsities: uniform (default) or TEAL's block-wise greedy search (teal, wina)")
    g.add_argument("--act-max-tokens", type=int, default=None,
                   help="calibration tokens sampled per site for the thresholds (default 4096)")
    g.add_argument("--act-rotate", default=None, choices=["none", "pca"],
                   help="pca: first rotate the residual stream into its principal axes (same function, folded into "
                        "the weights; dense Llama-style models; the LM head is untied) so thresholds drop less")
    g.add_argument("--act-greedy-tokens", type=int, default=None,
                   help="tokens the greedy search scores each block on (default 512)")


def weight_pruning_requested(args: argparse.Namespace) -> bool:
    """Whether the command line asks for weight pruning (``--activation-sparsity`` alone does not)."""
    if getattr(args, "activation_sparsity", None) is None:
        return True
    return any(getattr(args, k, None) is not None for k in ("method", "sparsity", "pattern", "config"))


def activation_config(args: argparse.Namespace, calib):
    """The :class:`ActivationSparsityConfig` the flags ask for (``None`` without ``--activation-sparsity``).

    Raises:
        ConfigError: an ``--act-*`` flag without ``--activation-sparsity``, or a bad value.
    """
    from ..families import ActivationSparsityConfig

    extra = [f"--{k.replace('_', '-')}" for k in ("act_method", "act_allocation", "act_max_tokens", "act_greedy_tokens",
                                                       "act_rotate")
             if getattr(args, k, None) is not None]
    if args.activation_sparsity is None:
        if extra:
            raise ConfigError(f"{extra[0]} given without --activation-sparsity: add e.g. --activation-sparsity 0.4")
        return None
    kw = {"sparsity": args.activation_sparsity, "calib": calib}
    for key, flag in (("method", "act_method"), ("allocation", "act_allocation"), ("max_tokens", "act_max_tokens"),
                      ("greedy_tokens", "act_greedy_tokens"), ("rotate", "act_rotate")):
        if getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    return ActivationSparsityConfig(**kw)


def summary_rows(r: dict) -> list[list[str]]:
    """Rows for the prune summary table: what the thresholds reach on the calibration data (``state.report``)."""
    return [[f"activation sparsity ({r['method']}, {r['allocation']}; calibration)", "0.0000",
             f"{r['mean_sparsity']:.4f}"],
            ["activation target", "", f"{r['target']:.4f}"],
            ["decoder-linear weight reads a kernel skips", "0.0000", f"{r['skipped_fraction']:.4f}"]] + (
        [["residual stream rotated (pca): energy in the top 10% of axes", "",
          f"{r['rotation']['top_decile_energy']:.4f}"]] if "rotation" in r else [])
