"""``prunekit ls``: what can be chosen by name (methods, patterns, allocations, datasets, aliases),
with every option of every component as its declaration states it."""

from __future__ import annotations

import argparse

from .. import registry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list methods, patterns, allocations, datasets, tasks and model aliases")
    p.set_defaults(func=run)


def option_lines(cls, indent: str = "      ") -> list[str]:
    """One line per declared option of ``cls`` (a method, allocator or refiner class)."""
    opts = getattr(cls, "Options", None)
    if opts is None:
        return []
    return [f"{indent}{name}={default!r}: {text}" for name, default, text in opts.describe()]


def run(args: argparse.Namespace) -> int:
    from .. import allocation, data, methods  # noqa: F401  (populate the registries)
    from ..eval import tasks  # noqa: F401

    from .. import structured  # noqa: F401
    from ..families import STRUCTURED_ALLOCATIONS

    sections = [("methods", registry.METHODS), ("structured criteria (--pattern channels|heads|width|blocks|ffn)",
                registry.STRUCTURED), ("refiners", registry.REFINERS), ("allocations", registry.ALLOCATORS),
                ("datasets", registry.DATASETS), ("tasks", registry.TASKS), ("model aliases", registry.MODEL_ALIASES)]
    for title, reg in sections:
        if not len(reg):
            continue
        print(f"{title}:")
        rows = [(name, reg.help(name), reg.get(name)) for name in reg.names()]
        if reg is registry.ALLOCATORS:  # and the structured family's own (global), in one list
            rows = sorted(rows + [(name, text, None) for name, text in STRUCTURED_ALLOCATIONS.items()])
        for name, text, cls in rows:
            print(f"  {name:<14} {text}")
            for line in option_lines(cls):
                print(line)
        if title == "methods":
            print("patterns:\n  unstructured   zeros anywhere\n  N:M            N kept in every M consecutive inputs (2:4, 4:8, …)"
                  "\n  channels       FFN channels removed (the model gets smaller)\n  heads          attention heads "
                  "(whole key/value groups, or the same number of query heads per group)\n  width          heads and "
                  "channels\n  blocks         whole decoder blocks\n  ffn            FFN sub-blocks of whole blocks")
    return 0
