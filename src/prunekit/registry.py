"""One registry type for everything that is chosen by name.

Methods, allocators, datasets, tasks and model aliases register themselves in their own
module with a decorator, so adding one is adding one file; the CLI's choices and the YAML
names come from here, never from an ``elif`` chain.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of objects (classes or factories) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("wanda")``."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
            self._help[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def add(self, name: str, obj: T, help: str = "") -> T:
        return self.register(name, help)(obj)

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {known}")
        return self._items[key]

    def build(self, name: str, options: Mapping[str, Any] | None = None):
        """Instantiate a registered class with its typed options (its ``Options`` dataclass).

        Raises:
            ConfigError: unknown name, or an option name or value its declaration does not allow.
        """
        cls = self.get(name)
        return cls(cls.Options.parse(options, f"{self.kind} {name!r}"))

    def help(self, name: str) -> str:
        return self._help.get(name.lower(), "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


METHODS: Registry = Registry("method")
ALLOCATORS: Registry = Registry("allocation")
DATASETS: Registry = Registry("dataset")
TASKS: Registry = Registry("task")
MODEL_ALIASES: Registry = Registry("model alias")
REFINERS: Registry = Registry("refiner")
#: criteria for structured patterns (channels, heads, width, blocks, ffn); names may repeat METHODS'
STRUCTURED: Registry = Registry("structured criterion")
#: activation methods by name (``teal``, ``cats``, ``chess``); each registers itself in prunekit.activation
ACTIVATION_METHODS: Registry = Registry("activation method")
