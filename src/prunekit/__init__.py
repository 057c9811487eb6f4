"""prunekit: prune and factorize causal LMs, and measure honestly what it cost."""

__version__ = "0.1.0"

from .api import evaluate, prune, sparsify_activations  # noqa: E402
from .config import CalibConfig, EvalConfig, PruneConfig  # noqa: E402
from .families import ActivationSparsityConfig, LowRankConfig, SparseConfig, StructuredConfig, compress  # noqa: E402
from .masks import Pattern  # noqa: E402
from .formats import load_model  # noqa: E402
from .recover import RecoverConfig, RecoverReport, recover  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["ActivationSparsityConfig", "CalibConfig", "EvalConfig", "LowRankConfig", "Pattern", "PruneConfig",
           "RecoverConfig", "RecoverReport", "Report", "SparseConfig", "StructuredConfig", "compress", "evaluate",
           "load_model", "prune", "recover", "sparsify_activations", "__version__"]
