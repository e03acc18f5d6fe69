"""The one command-line entry point: ``tandem serve | cluster | migrate | keys | ledger verify
| schedule preview | loadtest``.

Each command is a module of this package that adds its own arguments (``register``) and
runs itself; they import what they use when they run, so ``tandem --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tandem.cli import cluster, keys, ledger, loadtest, migrate, schedule, serve
from tandem.cli.common import raise_fd_limit
from tandem.cli.serve import GRACEFUL_SHUTDOWN_SECONDS
from tandem.core.settings import get_settings
from tandem.observability.logging import configure_logging

__all__ = ["GRACEFUL_SHUTDOWN_SECONDS", "build_parser", "main", "raise_fd_limit"]

# In the order `tandem --help` lists them.
_COMMANDS = (serve, cluster, migrate, keys, ledger, schedule, loadtest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description=(
            "The one command-line entry point: ``tandem serve | cluster | migrate | keys | "
            "ledger verify | schedule preview | loadtest``."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(get_settings().log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
