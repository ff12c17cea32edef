"""What every request to ``leukotree serve`` passes before a route sees it, and the
shape of every error it gets back.

In order, :class:`Guard` (an ASGI middleware) refuses:

1. a ``Host`` header not in the allowlist (loopback names by default; ``--allowed-host``
   adds names): a DNS-rebinding page reaches the server under its own name (400);
2. a state-changing request (POST, PUT, PATCH, DELETE) from another site: its
   ``Origin`` must name the host the request was sent to, and a browser's
   ``Sec-Fetch-Site`` must not say ``cross-site`` or ``same-site`` (403). Clients that
   send neither (curl, scripts) are let through: a browser always sends one;
3. with a token, a request with neither ``Authorization: Bearer <token>`` nor an open
   session (401), except the login page and static files;
4. a request body over :data:`MAX_BODY` bytes, except the upload of a case, which
   streams against its own limits (413).

Every response gets the security headers of :data:`SECURITY_HEADERS` (a strict
Content-Security-Policy, ``X-Frame-Options: DENY``, ``nosniff``, no referrer) and
``Cache-Control: no-store``. :func:`add_error_handlers` makes every error, the
framework's own included, a JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from leukotree.errors import LeukotreeError
from leukotree.lab.versions import LabConflict, LabNotFound
from leukotree.serve.auth import COOKIE, Sessions, bearer, token_matches
from leukotree.serve.store import CaseConflict, CaseNotFound
from leukotree.serve.uploads import UploadRefused

#: Host names allowed without ``--allowed-host``.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Largest body of any request but an upload (JSON, login form), in bytes.
MAX_BODY = 64 * 1024
#: The path and method of the upload, which streams against its own limits.
UPLOAD = ("POST", "/api/cases")
OPEN_PATHS = ("/login", "/logout", "/static/")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
#: FastAPI's API pages (/docs, /redoc) load Swagger UI from its CDN.
DOCS_CSP = ("default-src 'self' https://cdn.jsdelivr.net; script-src 'self' 'unsafe-inline' "
            "https://cdn.jsdelivr.net; style-src 'self' 'unsafe-inline' "
            "https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
            "frame-ancestors 'none'")
SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "cache-control": "no-store",
                    "cross-origin-opener-policy": "same-origin"}

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def host_name(value: str) -> str | None:
    """The host name of a ``Host`` header or an origin's netloc, lower case, without port
    or IPv6 brackets; ``None`` if it is not one."""
    try:
        name = urlsplit(f"//{value}").hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def allowed_hosts(extra: Iterable[str] = ()) -> frozenset[str]:
    """The loopback names plus ``extra`` (``*`` allows any)."""
    return frozenset({*LOOPBACK_HOSTS, *(h.strip().lower().strip("[]") for h in extra)})


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: Any, *, token: str | None, sessions: Sessions,
                 hosts: frozenset[str]) -> None:
        self.app, self.token, self.sessions, self.hosts = app, token, sessions, hosts

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        send = _with_headers(send, DOCS_CSP if path in ("/docs", "/redoc") else CSP)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        refusal = self._refusal(path, method, headers)
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        if method not in SAFE_METHODS and (method, path) != UPLOAD:
            body = await _read_small_body(receive, headers.get("content-length"))
            if body is None:
                await _send_error(send, 413, f"The request body is larger than {MAX_BODY:,} "
                                             "bytes.")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _refusal(self, path: str, method: str,
                 headers: dict[str, str]) -> tuple[int, str, str] | None:
        """``(status, message, kind)`` of the first rule the request breaks, else None."""
        host = headers.get("host", "")
        name = host_name(host)
        if "*" not in self.hosts and (name is None or name not in self.hosts):
            shown = host[:80] or "(none)"
            return (400, f"Host '{shown}' is not served here: this server answers "
                         f"{', '.join(sorted(self.hosts))}. If users reach it under that "
                         f"name, start it with --allowed-host {name or 'NAME'}.", "json")
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site", "")
            if origin is not None and (origin == "null"
                                       or urlsplit(origin).netloc.lower() != host.lower()):
                return (403, f"Cross-site request refused: Origin '{origin[:80]}' is not "
                             f"this server ({host[:80]}).", "json")
            if origin is None and site in ("cross-site", "same-site"):
                return (403, "Cross-site request refused (Sec-Fetch-Site: "
                             f"{site}).", "json")
        if self.token is None or path.startswith(OPEN_PATHS):
            return None
        given = bearer(headers.get("authorization"))
        if given is not None:
            if token_matches(self.token, given):
                return None
            return (401, "Wrong token in the Authorization header.", "json")
        if self.sessions.valid(_cookie(headers.get("cookie", ""), COOKIE)):
            return None
        if path.startswith("/api/") or path in ("/docs", "/redoc", "/openapi.json"):
            return (401, "Authentication required: send 'Authorization: Bearer <token>' "
                         "or log in at /login.", "json")
        return (401, "", "html")


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _with_headers(send: Send, csp: str) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            have = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k.encode(), v.encode()) for k, v in
                     {**SECURITY_HEADERS, "content-security-policy": csp}.items()
                     if k.encode() not in have]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _send_error(send: Send, status: int, message: str, kind: str = "json") -> None:
    if kind == "html":
        body = (b"<!DOCTYPE html><title>leukotree</title><p>Authentication required. "
                b"<a href='/login'>Log in</a>.</p>")
        media = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"error": message}).encode()
        media = b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_small_body(receive: Receive, length: str | None) -> bytes | None:
    """The whole body if it is at most :data:`MAX_BODY` bytes, else None (reading stops
    there)."""
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return None
    chunks, n = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        n += len(chunk)
        if n > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def status_of(err: LeukotreeError) -> int:
    """404 for a missing case, cell, model version or job, 409 for one in the wrong
    state (or a candidate the gate refuses), else 422."""
    if isinstance(err, CaseNotFound | LabNotFound):
        return 404
    return 409 if isinstance(err, CaseConflict | LabConflict) else 422


def add_error_handlers(app: Any) -> None:
    """Every error as ``{"error": "..."}``: the framework's (unknown path 404, body
    validation 422, parse errors 400), the app's, and a store that fails (503)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request: Any, err: HTTPException) -> Any:
        return error_response(err.status_code, str(err.detail), getattr(err, "headers", None))

    async def validation_error(request: Any, err: RequestValidationError) -> Any:
        problems = []
        for e in err.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        return error_response(422, "Invalid request: " + "; ".join(problems) + ".")

    async def refused(request: Any, err: UploadRefused) -> Any:
        return error_response(err.status, str(err))

    async def user_error(request: Any, err: LeukotreeError) -> Any:
        return error_response(status_of(err), str(err))

    async def store_error(request: Any, err: Exception) -> Any:
        reason = getattr(err, "strerror", None) or str(err)
        return error_response(503, f"The store cannot be read or written ({reason}); the "
                                   "request was not saved. Tell the server's operator.")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(UploadRefused, refused)
    app.add_exception_handler(LeukotreeError, user_error)
    app.add_exception_handler(sqlite3.Error, store_error)
    app.add_exception_handler(OSError, store_error)
