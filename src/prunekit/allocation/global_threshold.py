"""``global`` is no longer an allocator: it is an allocation of the structured family.

FLAP's adaptive structure (one threshold over every block's standardised unit scores) is named by
:class:`prunekit.families.StructuredConfig` (``allocation="global"``) and planned by
:func:`prunekit.structured.global_plan.global_plan`; a sparse or low-rank config refuses it before
any work. This module only says so (the old import path keeps importing).
"""

import warnings

warnings.warn("prunekit.allocation.global_threshold is gone: allocation 'global' belongs to "
              "prunekit.families.StructuredConfig", DeprecationWarning, stacklevel=2)
