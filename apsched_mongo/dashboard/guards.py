"""Who may act, and from where: the token, sessions with their CSRF tokens, same-origin
checks, safe redirects, bounded form parsing and the security headers of every response."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .queries import BadRequest

SESSION_COOKIE = "apsched_dashboard_session"
SESSION_LIFETIME = 12 * 3600.0
MAX_FORM_BYTES = 16 * 1024
MIN_TOKEN_LENGTH = 16
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class Sessions:
    """Logged-in browsers of this dashboard process (a restart logs everyone out).

    :param token: the dashboard's token; ``None`` when actions are disabled
    """

    def __init__(self, token: str | None) -> None:
        self._token = token
        self._expiry: dict[str, float] = {}  # session id -> monotonic expiry
        self._csrf_key = secrets.token_bytes(32)

    def token_matches(self, candidate: str) -> bool:
        return self._token is not None and hmac.compare_digest(candidate.encode(),
                                                               self._token.encode())

    def open(self) -> str:
        now = time.monotonic()
        self._expiry = {sid: until for sid, until in self._expiry.items() if until > now}
        session = secrets.token_urlsafe(32)
        self._expiry[session] = now + SESSION_LIFETIME
        return session

    def close(self, session: str) -> None:
        self._expiry.pop(session, None)

    def of(self, request: Request) -> str | None:
        """The request's live session, if any."""
        session = request.cookies.get(SESSION_COOKIE)
        if session and self._expiry.get(session, 0) > time.monotonic():
            return session
        return None

    def csrf_for(self, session: str | None) -> str:
        """The CSRF token forms of this session carry (derived, so nothing is stored)."""
        if session is None:
            return ""
        return hmac.new(self._csrf_key, session.encode(), hashlib.sha256).hexdigest()

    def refusal(self, request: Request, form: dict[str, str]) -> str | None:
        """Why this request may not act, or None. Scripts send ``Authorization: Bearer
        TOKEN`` (browsers never add that header by themselves); browsers send the session
        cookie (``SameSite=Strict``) *and* the form's CSRF token derived from it."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and self.token_matches(token.strip()):
                return None
            return "wrong or malformed Authorization header (expected: Bearer <token>)"
        session = self.of(request)
        if session is None:
            return "actions need the dashboard's token: log in first (link at the top right)"
        if not hmac.compare_digest(form.get("csrf", "").encode(),
                                   self.csrf_for(session).encode()):
            return "the form's CSRF token is missing or stale: reload the page and try again"
        return None


def same_origin(request: Request) -> bool:
    """A browser names the page a POST comes from; refuse one from another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's form post; the session still needs its CSRF token
        return True
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def safe_next(value: str) -> str:
    """Only a path on this site (no other host, no scheme): no open redirect."""
    parts = urlsplit(value)
    if (not value.startswith("/") or value.startswith("//") or "\\" in value
            or parts.scheme or parts.netloc):
        return "/"
    return value[:2000]


async def read_form(request: Request) -> dict[str, str]:
    """A URL-encoded form of at most :data:`MAX_FORM_BYTES` (first value of each field)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest(f"form larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("form is not URL-encoded text") from None
    return {key: values[0] for key, values in fields.items()}


class SecurityHeaders:
    """No framing, no sniffing, no referrer to other sites, nothing loaded from elsewhere,
    nothing cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", []),
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    # not no-referrer: that makes browsers send "Origin: null" with forms
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
