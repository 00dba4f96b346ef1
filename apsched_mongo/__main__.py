"""``apsched-mongo {demo,doctor,migrate}`` (or ``python -m apsched_mongo ...``).

Every mistake -- a bad option, a malformed URI, a missing extra -- is one line on stderr and
exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from ._cli import (
    EXIT_MISTAKE,
    MEMORY_EXTRA_HINT,
    CommandLineError,
    OneLineParser,
    is_missing_memory_extra,
)

#: sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "demo": ("apsched_mongo.demo", "run a scheduler demo (in memory when no --uri is given)"),
    "doctor": ("apsched_mongo.doctor", "check a MongoDB deployment and the stored scheduler data"),
    "migrate": ("apsched_mongo.migrate", "copy data from APScheduler's built-in MongoDB store"),
    "dashboard": ("apsched_mongo.dashboard", "serve a web page showing the whole cluster"),
}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="MongoDB back end for APScheduler 4.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not available in this build
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "apsched-mongo") -> int:
    """Run one command; returns its exit status (2 for any mistake, after one line)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage mistake (2, already said)
        return exc.code if isinstance(exc.code, int) else 0
    where = f"{prog} {args.command}"
    try:
        result: int = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except CommandLineError as exc:
        return _mistake(where, str(exc))
    except ImportError as exc:
        if not is_missing_memory_extra(exc):
            raise
        return _mistake(where, MEMORY_EXTRA_HINT)
    return result


def _mistake(where: str, message: str) -> int:
    print(f"{where}: error: {message}", file=sys.stderr)
    return EXIT_MISTAKE


if __name__ == "__main__":
    sys.exit(main(prog="python -m apsched_mongo"))
