"""The criterion each structured pattern uses when ``--method`` is not given (kept import-light:
:class:`~prunekit.config.PruneConfig` reads it while validating)."""

from __future__ import annotations

#: pattern kind -> default structured criterion, chosen by the measurements in docs/structured.md
#: (SmolLM2-135M, one-shot WikiText-2 perplexity): heads 12.5 %: slimgpt 97.6, flap 520; width 20 %:
#: slimgpt 64.8, flap 144, wanda 300; channels 10 / 20 / 30 %: slimgpt 38.5 / 56.6 / 83.4, flap 34.8 / 56.1 /
#: 107.6 (flap's 10 % lead is 10 %, slimgpt's 30 % lead 29 %: the smaller worst case)
DEFAULT_CRITERIA = {"channels": "slimgpt", "heads": "slimgpt", "width": "slimgpt", "blocks": "shortgpt",
                    "ffn": "shortgpt"}


def default_criterion(kind: str) -> str:
    """The registered criterion a structured pattern kind uses by default."""
    return DEFAULT_CRITERIA[kind]
