"""The one exception type for user mistakes.

A :class:`ConfigError` means "the input is wrong, here is which value and how to fix it": the CLI
prints its message as one line (exit code 2) without a traceback. Anything else that escapes is
a bug and keeps its traceback. It subclasses ``ValueError`` so Python callers that already catch
``ValueError`` keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting, option, path or input, with a message naming the value and the fix."""
