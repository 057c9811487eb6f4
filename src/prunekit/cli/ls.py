"""``prunekit ls``: what can be chosen by name (methods, patterns, allocations, datasets, aliases)."""

from __future__ import annotations

import argparse

from .. import registry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list methods, patterns, allocations, datasets, tasks and model aliases")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import allocation, data, methods  # noqa: F401  (populate the registries)
    from ..eval import tasks  # noqa: F401
    from ..methods.base import Method

    sections = [("methods", registry.METHODS), ("refiners", registry.REFINERS), ("allocations", registry.ALLOCATORS),
                ("datasets", registry.DATASETS),
                ("tasks", registry.TASKS), ("model aliases", registry.MODEL_ALIASES)]
    for title, reg in sections:
        if not len(reg):
            continue
        print(f"{title}:")
        for name in reg.names():
            obj = reg.get(name)
            opts = ""
            if isinstance(obj, type) and issubclass(obj, Method) and obj.options():
                opts = "  [" + ", ".join(f"{k}={v}" for k, v in obj.options().items()) + "]"
            print(f"  {name:<14} {reg.help(name)}{opts}")
        if title == "methods":
            print("patterns:\n  unstructured   zeros anywhere\n  N:M            N kept in every M consecutive inputs (2:4, 4:8, …)")
    return 0
