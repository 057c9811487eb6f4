"""Typed options: every method, allocator and refiner declares its options as one frozen dataclass.

The declaration is the single source of truth for the CLI's ``--option k=v`` parsing (strings
are converted by the field's type), for YAML (plain values), for ``prunekit ls`` and for the help
text. A bad name or value fails with one :class:`~prunekit.errors.ConfigError` line naming the
option, the value and what is allowed — before any model is loaded, because the options are
parsed when the configuration is checked.

Declare options with :func:`option`::

    @dataclass(frozen=True)
    class SparseGPTOptions(Options):
        blocksize: int = option(128, "columns per OBS block", lo=1)
        percdamp: float = option(0.01, "damping, a fraction of mean(diag H)", lo=0, hi=10, lo_open=True, hi_open=True)
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .errors import ConfigError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def option(default: Any, help: str = "", *, choices: tuple | None = None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field with its help text and allowed values.

    Args:
        default: the value when the option is not given.
        help: one line for ``--help`` and ``prunekit ls``.
        choices: the only values allowed.
        lo / hi: numeric bounds, inclusive unless ``lo_open`` / ``hi_open``.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open})


def _allowed(f: dataclasses.Field, kind: str) -> str:
    md = f.metadata
    if md.get("choices"):
        return "one of " + ", ".join(repr(c) for c in md["choices"])
    lo, hi = md.get("lo"), md.get("hi")
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if md.get('lo_open') else '['}{lo}, {hi}{')' if md.get('hi_open') else ']'}"
    if lo is not None:
        return f"{kind} {'>' if md.get('lo_open') else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if md.get('hi_open') else '<='} {hi}"
    return kind


def _base_type(tp: Any) -> tuple[type, bool]:
    """``(type, optional)`` for ``X`` or ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (a Python value or a command-line string) as type ``tp``; ``ValueError`` if it is not one."""
    base, optional = _base_type(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if base is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(str(value).strip())
    if base is float:
        if isinstance(value, bool):
            raise ValueError
        out = float(value.strip()) if isinstance(value, str) else float(value)
        if out != out:
            raise ValueError
        return out
    if base is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list, tuple)):
            raise ValueError
        return str(value)
    raise TypeError(f"option type {tp!r} is not supported (use bool, int, float, str or X | None)")


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Options:
    """Base class of option sets (no options). Subclasses are frozen dataclasses of :func:`option` fields."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except ValueError:
                self.fail(f.name, value)
            object.__setattr__(self, f.name, value)
            self._check_bounds(f, value)
        self.validate()

    def _check_bounds(self, f: dataclasses.Field, value: Any) -> None:
        md = f.metadata
        if value is None:
            return
        if md.get("choices") and value not in md["choices"]:
            self.fail(f.name, value)
        lo, hi = md.get("lo"), md.get("hi")
        if lo is not None and (value <= lo if md.get("lo_open") else value < lo):
            self.fail(f.name, value)
        if hi is not None and (value >= hi if md.get("hi_open") else value > hi):
            self.fail(f.name, value)

    def validate(self) -> None:
        """Cross-field checks of a subclass (raise through :meth:`fail`)."""

    def fail(self, name: str, value: Any, allowed: str | None = None) -> typing.NoReturn:
        f = {f.name: f for f in fields(self)}[name]
        base, optional = _base_type(typing.get_type_hints(type(self))[name])
        what = allowed or _allowed(f, _KIND.get(base, base.__name__)) + (" or none" if optional else "")
        raise ConfigError(f"option {name}={value!r} is invalid: it must be {what} (default {f.default!r})")

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, owner: str = "") -> "Options":
        """Build from a mapping of names (``-`` or ``_``) to values or command-line strings."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in dict(raw or {}).items():
            name = str(key).strip().replace("-", "_")
            if name not in known:
                who = f"{owner} " if owner else ""
                allowed = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls)) or "none"
                raise ConfigError(f"{who}has no option {key!r}; its options are: {allowed}")
            values[name] = value
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{owner} {e}" if owner else str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a config file needs to say)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """``(name, default, help)`` for every option (``prunekit ls``, ``--help``)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in fields(cls):
            base, optional = _base_type(hints[f.name])
            allowed = _allowed(f, _KIND.get(base, base.__name__)) + (" or none" if optional else "")
            text = f.metadata.get("help", "")
            out.append((f.name, f.default, f"{text} ({allowed})" if text else allowed))
        return out


def coerce_kwargs(fn: Callable, values: Mapping[str, Any], owner: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword options for ``fn`` checked against its signature and converted by its annotations
    (for factories that take plain keyword options, such as the registered tasks)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    allowed = [n for n, p in sig.parameters.items()
               if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"{owner} has no option {key!r}; its options are: "
                              + (", ".join(f"{n}={sig.parameters[n].default!r}" for n in allowed) or "none"))
        tp = hints.get(key)
        try:
            out[key] = value if tp is None else _coerce(value, tp)
        except ValueError:
            base, optional = _base_type(tp)
            raise ConfigError(f"{owner} option {key}={value!r} is invalid: it must be "
                              f"{_KIND.get(base, base.__name__)}{' or none' if optional else ''}") from None
    return out


def yaml_scalar(text: str):
    """One option value as YAML reads it, except that a number YAML 1.1 leaves as a string
    (``5e-4``, ``1e3``: no dot in the mantissa) is a number, as the user meant."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and any(c.isdigit() for c in value):  # "nan"/"inf" stay words
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["percdamp=0.1", "skip="]`` → ``{"percdamp": "0.1", "skip": ""}`` (values stay strings;
    the option's declared type converts them)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} option {item!r} is not KEY=VALUE, e.g. percdamp=0.01")
        out[key.strip().replace("-", "_")] = value
    return out


def check_int(name: str, value: int, lo: int, hi: int | None = None) -> None:
    """``value`` is an integer in ``[lo, hi]`` (``hi=None``: no upper bound), or a one-line ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name}={value!r} is invalid: it must be an integer {rng}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-serialisable dict of a config dataclass (nested configs included)."""
    return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()}
