"""Evaluation: perplexity by the literature's protocol (tasks and sweeps build on it)."""

from .perplexity import PerplexityResult, check_seqlen, eval_token_ids, perplexity, perplexity_of_ids
from . import tasks  # noqa: E402,F401  (registers the tasks in prunekit.registry.TASKS)

__all__ = ["PerplexityResult", "check_seqlen", "eval_token_ids", "perplexity", "perplexity_of_ids"]
