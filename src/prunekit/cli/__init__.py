"""``prunekit`` command line: one module per subcommand, discovered at start-up.

A subcommand module defines ``register(subparsers)`` that adds its parser and sets
``func=run``; adding a subcommand is adding one file to this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import signal
import sys

from .. import __version__

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit",
        description="Prune and factorize causal LMs, and measure honestly what it cost.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup handler runs."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", 0) > 1 else logging.INFO if getattr(args, "verbose", 0) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from .common import friendly

    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: cleanup code runs, temporary folders go
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        saved = getattr(args, "saved", None)
        what = f"the model was saved to {saved} before" if saved else "nothing was saved"
        what = getattr(args, "interrupted_note", None) or what  # e.g. what a recovery checkpoint kept
        print(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}; {what}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - user mistakes and I/O faults become one clear line
        msg = friendly(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
