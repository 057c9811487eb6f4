"""The prune → evaluate → save → report pipeline as one library call::

    from prunekit.pipeline import RunSpec, run
    result = run(RunSpec("smollm2-135m", PruneConfig(method="wanda", sparsity=0.5), out="pruned"))
    print(result.compressed["wikitext2"].ppl, result.saved)

:func:`run` checks everything it can before loading the model, then runs in memory or streamed
(one decoder block at a time, for models bigger than memory) as ``RunSpec.offload`` decides, and
tells its progress through :class:`Events` (logging by default; the CLI prints).
"""

from .events import Events
from .run import run
from .spec import RunResult, RunSpec

__all__ = ["Events", "RunResult", "RunSpec", "run"]
