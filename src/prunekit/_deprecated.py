"""Old import paths that still work: a module's ``__getattr__`` hands out the name from where it moved,
with a :class:`DeprecationWarning` saying where to import it from now."""

from __future__ import annotations

import warnings
from types import ModuleType


def moved(old: str, name: str, *modules: ModuleType, renames: dict[str, str] | None = None):
    """``getattr`` of ``name`` (renamed by ``renames``) in the first of ``modules`` that has it, with a warning.

    Called from the ``__getattr__`` of the old module ``old``; an unknown name is an ``AttributeError``
    as for any module.
    """
    if name.startswith("__"):  # module machinery (__path__, __wrapped__ ...): never forwarded
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    new = (renames or {}).get(name, name)
    for module in modules:
        if hasattr(module, new):
            warnings.warn(f"{old}.{name} moved to {module.__name__}.{new}; import it from there",
                          DeprecationWarning, stacklevel=3)
            return getattr(module, new)
    raise AttributeError(f"module {old!r} has no attribute {name!r}")
