"""Turning a URI or a ready client into a database handle, without ever leaking credentials."""

from __future__ import annotations

import re
from typing import Any

from bson import CodecOptions, UuidRepresentation
from bson.tz_util import utc
from pymongo import AsyncMongoClient, ReadPreference, WriteConcern
from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError
from pymongo.uri_parser import parse_uri

from .errors import ServerUnreachableError

#: How every collection of ours decodes: aware UTC datetimes and standard UUIDs, so what a
#: query returns compares equal to what was written.
CODEC_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, tzinfo=utc, uuid_representation=UuidRepresentation.STANDARD
)

# The password runs to the *last* "@" (up to whitespace or a quote): an unescaped "@", "/"
# or ":" in a user name or password must not let any part of the password escape redaction.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:\s'\"]*):(?P<password>[^\s'\"]*)@"
)


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password replaced by ``***`` (for reprs, logs and errors)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


def redact(text: str, uri: str) -> str:
    """Remove the URI's password from any text derived from it (e.g. a driver's message)."""
    match = _USERINFO.search(uri)
    text = redact_uri(text)
    if match and match["password"]:
        text = text.replace(match["password"], "***")
    return text


def hosts_of(uri: str) -> list[str]:
    """The ``host:port`` list of a URI, for error messages (never credentials)."""
    try:
        return [f"{host}:{port}" for host, port in parse_uri(uri, validate=False)["nodelist"]]
    except (InvalidURI, ConfigurationError, ValueError):
        return []


def create_client(uri: str) -> AsyncMongoClient[dict[str, Any]]:
    """Create a client for ``uri``; a malformed URI is reported with its password removed."""
    if not isinstance(uri, str) or not uri:
        raise ValueError("a MongoDB URI must be a non-empty string such as 'mongodb://host:27017'")
    if uri.startswith("mongodb+srv://"):
        pass  # SRV URIs are resolved by the driver at connection time
    else:
        try:
            parse_uri(uri)
        except (InvalidURI, ConfigurationError, ValueError) as exc:
            raise ValueError(
                f"invalid MongoDB URI {redact_uri(uri)!r}: {redact(str(exc), uri)}"
            ) from None
    try:
        return AsyncMongoClient(uri, tz_aware=True, uuidRepresentation="standard")
    except (PyMongoError, ValueError, TypeError) as exc:
        raise ValueError(
            f"invalid MongoDB URI {redact_uri(uri)!r}: {redact(str(exc), uri)}"
        ) from None


def accept_client_or_uri(client_or_uri: Any) -> tuple[str | None, Any]:
    """``(uri, None)`` for a URI (validated now, so a bad one fails at construction; the
    client is created at start, inside the event loop that will use it), or
    ``(None, client)`` for a ready client."""
    if isinstance(client_or_uri, str):
        require_acknowledged_writes(create_client(client_or_uri))
        return client_or_uri, None
    if hasattr(client_or_uri, "get_database"):
        require_acknowledged_writes(client_or_uri)
        return None, client_or_uri
    raise TypeError(
        "client_or_uri must be a MongoDB URI, a pymongo.AsyncMongoClient or a "
        f"MemoryMongoClient, not {type(client_or_uri).__name__}"
    )


def require_acknowledged_writes(client: Any) -> None:
    """Claims and releases read their write results; ``w=0`` would make them guesses."""
    write_concern = getattr(client, "write_concern", None)
    if write_concern is not None and not write_concern.acknowledged:
        raise ValueError(
            "apsched-mongo needs acknowledged writes: remove w=0 from the URI or client options"
        )


#: Default bound on waiting for a majority to acknowledge a write (``wtimeout``)
MAJORITY_TIMEOUT = 10.0


def majority(timeout: float = MAJORITY_TIMEOUT) -> WriteConcern:
    """``w: "majority"`` with a bounded wait. A write acknowledged by a majority survives any
    failover; a ``w: 1`` claim or release (the implicit default on PSA sets, and common in
    URIs) can be rolled back after one, and a second node would then run the same job."""
    return WriteConcern("majority", wtimeout=round(timeout * 1000))


def database_of(client: Any, name: str, write_timeout: float = MAJORITY_TIMEOUT) -> Any:
    """Our handle on database ``name``: exact datetimes and UUIDs, reads from the primary
    whatever the client's read preference (a claim must see the writes it just made), and
    majority writes whatever the URI or the server's default says."""
    return client.get_database(
        name, codec_options=CODEC_OPTIONS, read_preference=ReadPreference.PRIMARY,
        write_concern=majority(write_timeout),
    )


def command_line_client(uri: str | None, purpose: str) -> Any:
    """The client a command-line tool works on: the server at ``uri``, or an empty
    in-memory one (said on stdout) when no URI is given."""
    if uri:
        return create_client(uri)
    from .memory import MemoryMongoClient

    print(f"Using an empty in-memory MongoDB (pass --uri to {purpose} a real server)\n")
    return MemoryMongoClient()


def describe_hosts(client: Any) -> str:
    """A short, credential-free description of where ``client`` points, for reprs."""
    try:
        nodes = client.topology_description.server_descriptions()
        return ",".join(f"{host}:{port}" for host, port in nodes)
    except Exception:
        return getattr(client, "description", "?")


async def ping(client: Any, uri: str | None) -> dict[str, Any]:
    """Run ``hello`` once, without retrying, so an unreachable server fails fast and by name."""
    try:
        reply: dict[str, Any] = await client.admin.command("hello")
    except PyMongoError as exc:
        where = ", ".join(hosts_of(uri)) if uri else describe_hosts(client)
        message = f"cannot reach MongoDB at {where}: {exc}"
        raise ServerUnreachableError(redact(message, uri) if uri else message) from None
    return reply
