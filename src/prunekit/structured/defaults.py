"""The criterion each structured pattern uses when ``--method`` is not given (kept import-light:
:class:`~prunekit.config.PruneConfig` reads it while validating)."""

from __future__ import annotations

#: pattern kind -> default structured criterion (chosen by the measurements in docs/structured.md)
DEFAULT_CRITERIA = {"channels": "flap", "heads": "flap", "width": "flap", "blocks": "shortgpt", "ffn": "shortgpt"}


def default_criterion(kind: str) -> str:
    """The registered criterion a structured pattern kind uses by default."""
    return DEFAULT_CRITERIA[kind]
