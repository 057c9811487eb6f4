"""Recovery after compression: distillation / fine-tuning that keeps the compression exactly.

See ``docs/recover.md``. Entry point: :func:`recover` with a :class:`RecoverConfig`.
"""

from .api import RecoverReport, recover
from .config import RecoverConfig
from .trainer import StepInfo

__all__ = ["RecoverConfig", "RecoverReport", "StepInfo", "recover"]
