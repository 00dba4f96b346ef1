"""What the command-line tools share: one-line errors (exit status 2), argument checks, and
the client a tool works on.

This is the only place outside the fake itself that reaches for the in-memory back end, so
the production client layer (``_client.py``) never imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from ._client import create_client

EXIT_MISTAKE = 2
MEMORY_EXTRA_HINT = (
    "without --uri this command runs on the in-memory back end, which needs the 'memory' "
    "extra: pip install 'apsched-mongo[memory]' (or pass --uri mongodb://...)"
)


class CommandLineError(Exception):
    """A mistake in the command line or its environment: printed as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_MISTAKE, f"{self.prog}: error: {message} (see --help)\n")


def is_missing_memory_extra(exc: BaseException) -> bool:
    """Did ``exc`` come from importing the in-memory back end without its extra?"""
    while exc is not None:
        name = getattr(exc, "name", None) or ""
        if isinstance(exc, ImportError) and (
            name.startswith("mongomock_ng") or "apsched-mongo[memory]" in str(exc)
        ):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def memory_client_factory() -> Callable[[], Any]:
    """Clients of one new in-memory server (they share its data)."""
    try:
        from .memory import MemoryMongoClient, MemoryServer
    except ImportError as exc:
        if is_missing_memory_extra(exc):
            raise CommandLineError(MEMORY_EXTRA_HINT) from None
        raise
    server = MemoryServer()
    return lambda: MemoryMongoClient(server)


def command_line_client(
    uri: str | None, purpose: str, *, server_selection_timeout: float | None = None
) -> Any:
    """The client a command-line tool works on: the server at ``uri`` (with
    ``server_selection_timeout`` seconds to find it, if given), or an empty in-memory one
    (said on stdout) when no URI is given."""
    if uri:
        options: dict[str, Any] = {}
        if server_selection_timeout is not None:
            options["serverSelectionTimeoutMS"] = int(server_selection_timeout * 1000)
        try:
            return create_client(uri, **options)
        except ValueError as exc:  # already one line, password removed
            raise CommandLineError(str(exc)) from None
    make_client = memory_client_factory()
    print(f"Using an empty in-memory MongoDB (pass --uri to {purpose} a real server)\n")
    return make_client()


# --- argument types: a bad value is one line naming the option and the rule ------------------

def uri_argument(text: str) -> str:
    """A MongoDB URI the driver accepts, checked when parsed (its password never shown)."""
    from ._client import check_uri

    try:
        check_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def positive_int(text: str) -> int:
    value: int = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    value: float = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def database_argument(text: str) -> str:
    """A database name MongoDB accepts."""
    from ._names import check_database_name

    try:
        check_database_name(None, None, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on a connection failure, also print the driver's account of "
                             "every server it tried")


# --- errors ----------------------------------------------------------------------------------

def find_error(exc: BaseException, *kinds: type[BaseException]) -> BaseException | None:
    """``exc`` itself, or the first of ``kinds`` inside it when it is an exception group
    (what a scheduler's task group raises)."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find_error(inner, *kinds)) is not None:
                return found
    return None


def describe_unreachable(exc: BaseException, verbose: bool) -> str:
    """The one-line reason, and with ``verbose`` the driver's account below it."""
    details = getattr(exc, "details", "")
    if verbose and details:
        return f"{exc}\n  driver's account: {details}"
    return str(exc)
