"""Turning a URI or a ready client into a database handle, without ever leaking credentials."""

from __future__ import annotations

import logging
import re
from typing import Any

from bson import CodecOptions, UuidRepresentation
from bson.tz_util import utc
from pymongo import AsyncMongoClient, MongoClient, ReadPreference, WriteConcern
from pymongo.errors import (
    ConfigurationError,
    InvalidURI,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.uri_parser import parse_uri

from .errors import ServerUnreachableError

logger = logging.getLogger("apsched_mongo")

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
    """The ``host:port`` list of a URI, for error messages (never credentials). An SRV URI
    names one host, resolved by DNS later: that name is what the user knows it by."""
    if uri.startswith("mongodb+srv://"):
        host = uri[len("mongodb+srv://"):].rpartition("@")[2].split("/")[0].split("?")[0]
        return [host] if host else []
    try:
        return [f"{host}:{port}" for host, port in parse_uri(uri, validate=False)["nodelist"]]
    except (InvalidURI, ConfigurationError, ValueError):
        return []


def check_uri(uri: Any) -> None:
    """Raise a one-line :class:`ValueError` (password removed) if ``uri`` is not a MongoDB
    URI the driver accepts. Creates nothing and contacts no server."""
    if not isinstance(uri, str) or not uri:
        raise ValueError("a MongoDB URI must be a non-empty string such as 'mongodb://host:27017'")
    if uri.startswith("mongodb+srv://"):
        return  # SRV URIs are resolved by the driver at connection time
    try:
        parse_uri(uri)
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise ValueError(
            f"invalid MongoDB URI {redact_uri(uri)!r}: {redact(str(exc), uri)}"
        ) from None


def create_client(uri: str, **options: Any) -> AsyncMongoClient[dict[str, Any]]:
    """Create a client for ``uri``; a malformed URI is reported with its password removed.
    ``options`` (e.g. ``serverSelectionTimeoutMS``) override the URI's."""
    check_uri(uri)
    try:
        return AsyncMongoClient(uri, tz_aware=True, uuidRepresentation="standard", **options)
    except (PyMongoError, ValueError, TypeError) as exc:
        raise ValueError(
            f"invalid MongoDB URI {redact_uri(uri)!r}: {redact(str(exc), uri)}"
        ) from None


def _classes_of(value: Any) -> list[str]:
    """``module.Class`` of ``value``'s class and its bases: how a foreign client is recognised
    without importing its library."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(value).__mro__]


def refuse_wrong_client(client: Any) -> None:
    """Refuse, at construction, the clients that would fail later in a confusing way: a
    synchronous client (awaiting its results fails, or it blocks the event loop) and Motor
    (end of life since 2026-05-14; PyMongo's async API is its successor)."""
    classes = _classes_of(client)
    if any(name.startswith(("motor.", "mongomock_motor.")) for name in classes):
        if any(name.startswith("mongomock_motor.") for name in classes):
            instead = ("apsched_mongo.memory.MemoryMongoClient() (pip install "
                       "'apsched-mongo[memory]')")
        else:
            instead = "pymongo.AsyncMongoClient(...) with the same arguments"
        raise TypeError(
            f"client_or_uri is a Motor client ({type(client).__name__}), which apsched-mongo "
            f"does not support (Motor reached end of life on 2026-05-14): pass {instead} "
            "instead, or the URI"
        )
    if isinstance(client, MongoClient) or any(
        name.startswith("mongomock.") or name.startswith("mongomock_ng.") for name in classes
    ):
        instead = ("apsched_mongo.memory.MemoryMongoClient()" if "mongomock" in classes[0]
                   else "pymongo.AsyncMongoClient(...) with the same arguments")
        raise TypeError(
            f"client_or_uri is a synchronous client ({type(client).__name__}); apsched-mongo "
            f"runs on asyncio and needs an async one: pass {instead} instead, or the URI"
        )


def accept_client_or_uri(client_or_uri: Any) -> tuple[str | None, Any]:
    """``(uri, None)`` for a URI (validated now, so a bad one fails at construction; the
    client is created at start, inside the event loop that will use it), or
    ``(None, client)`` for a ready client."""
    if isinstance(client_or_uri, str):
        require_acknowledged_writes(create_client(client_or_uri))
        return client_or_uri, None
    refuse_wrong_client(client_or_uri)
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
        raise unreachable(exc, client, uri) from None
    return reply


def unreachable(exc: PyMongoError, client: Any, uri: str | None) -> ServerUnreachableError:
    """One line for a failure to reach the server: where, how long we waited, the likely
    cause. The driver's whole account goes to :attr:`~ServerUnreachableError.details` and
    to the DEBUG log."""
    where = ", ".join(hosts_of(uri)) if uri else describe_hosts(client)
    text = str(exc)
    if isinstance(exc, ServerSelectionTimeoutError):
        timeout = _SELECTION_TIMEOUT.search(text)
        within = f" within {timeout['seconds']} s" if timeout else ""
        message = f"cannot reach MongoDB at {where}{within}: {likely_cause(text)}"
    else:
        message = f"cannot reach MongoDB at {where}: {text.splitlines()[0] if text else exc!r}"
    if uri:
        message, text = redact(message, uri), redact(text, uri)
    logger.debug("%s. The driver's account: %s", message, text)
    return ServerUnreachableError(message, details=text)


_SELECTION_TIMEOUT = re.compile(r"Timeout: (?P<seconds>[0-9.]+)s")

#: (what the driver's message contains, what it most likely means), first match wins
_CAUSES = (
    (("Connection refused", "Connect call failed", "Errno 111"),
     "connection refused (nothing listens there: is mongod running, is the port right?)"),
    (("Name or service not known", "nodename nor servname", "getaddrinfo", "Errno -2",
      "Errno -3", "Errno -5", "DNS"),
     "host name not found (check its spelling and DNS)"),
    (("SSL", "TLS", "certificate"),
     "TLS handshake failed (check tls= in the URI and the CA certificates)"),
    (("timed out", "Errno 110"),
     "no answer (a firewall, a wrong address, or on Atlas this machine's IP missing from the "
     "access list)"),
    (("Message length", "ProtocolError"),
     "something other than MongoDB answers on that port"),
    (("ReplicaSetNoPrimary", "No replica set members"),
     "no primary (an election in progress, or the URI's replicaSet= does not match the "
     "set's name)"),
)


def likely_cause(driver_message: str) -> str:
    """What a server-selection failure most likely means, from the driver's message."""
    for markers, cause in _CAUSES:
        if any(marker in driver_message for marker in markers):
            return cause
    return "no server answered (--verbose, or DEBUG logging, shows the driver's account)"
