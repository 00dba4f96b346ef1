"""``python -m apsched_mongo {demo,doctor,migrate}``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "demo": ("apsched_mongo.demo", "run a scheduler demo (in memory when no --uri is given)"),
    "doctor": ("apsched_mongo.doctor", "check a MongoDB deployment and the stored scheduler data"),
    "migrate": ("apsched_mongo.migrate", "copy data from APScheduler's built-in MongoDB store"),
    "dashboard": ("apsched_mongo.dashboard", "serve a web page showing the whole cluster"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apsched_mongo")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not available in this build
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    result: int = importlib.import_module(COMMANDS[args.command][0]).run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
