"""Checks every request passes before any route reads it (a pure ASGI middleware, outermost).

* **403** a state-changing request (POST/PUT/PATCH/DELETE) while no API key is set, unless it
  comes from loopback with a loopback ``Host`` (DNS rebinding) and no foreign ``Origin`` (a web
  page the user opened posting to ``localhost:8000``);
* **415** a body that is not JSON (``multipart/form-data`` too on ``POST /datasets``): a browser
  can send ``text/plain`` or a form cross-site without asking first, never ``application/json``;
* **413** a body over its limit, counted as it arrives, so a chunked upload (no Content-Length)
  is stopped too, before it is spooled to disk.

Written here rather than with FastAPI's ``max_body_size``: that limit is fixed when the routes are
declared, while these limits are settings read per request (CSRA_MAX_UPLOAD_MB, CSRA_MAX_REQUEST_KB),
and its 413 does not say which setting to raise.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csra.settings import Settings, get_settings

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
UPLOAD_ROUTES = frozenset({("POST", "/datasets")})  # the routes that also take multipart/form-data
MULTIPART_OVERHEAD = 1 << 16  # boundaries and the small form fields around the file
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit; FastAPI re-raises it from body parsing."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


def upload_limit_bytes(max_upload_mb: float) -> int:
    return int(max_upload_mb * (1 << 20))


def _is_loopback_address(host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _hostname(netloc: str) -> str | None:
    """``host[:port]`` -> host (``[::1]:8000`` -> ``::1``); None when malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        _ = parts.port  # raises on a non-numeric or out-of-range port
        return parts.hostname
    except ValueError:
        return None


def rebinding_refusal(scope: Scope, headers: Headers) -> str | None:
    """Why any request (reads too) with no API key configured is refused, or None: a ``Host`` that is not a
    loopback name is a page of another site whose name was pointed at 127.0.0.1 (DNS rebinding), which
    the browser would otherwise let read every chat and dataset as if it were its own."""
    host = headers.get("host", "")
    if _hostname(host) in LOOPBACK_NAMES:
        return None
    return (f"{scope['method']} refused: no API key is configured, so only this machine may call the API, and "
            f"the Host header {host[:100]!r} is not 127.0.0.1, localhost or [::1]. Set CSRA_API_KEY on the server "
            "and send 'Authorization: Bearer <key>'")


def cross_site_refusal(scope: Scope, headers: Headers) -> str | None:
    """Why a state-changing request with no API key configured is refused, or None."""
    client = scope.get("client")
    host = headers.get("host", "")
    origin = headers.get("origin")
    why = None
    if not _is_loopback_address(client[0] if client else None):
        why = "it does not come from this machine (loopback)"
    elif _hostname(host) not in LOOPBACK_NAMES:
        why = f"its Host header {host[:100]!r} is not 127.0.0.1, localhost or [::1]"
    elif origin is not None and origin != "null" and urlsplit(origin).netloc != host:
        why = f"it was sent by a web page of another site (Origin {origin[:100]!r})"
    elif origin == "null" or headers.get("sec-fetch-site") == "cross-site":
        why = "it was sent by a web page of another site"
    if why is None:
        return None
    return (f"{scope['method']} refused: no API key is configured, so changes are accepted only from this "
            f"machine, and {why}. Set CSRA_API_KEY on the server and send 'Authorization: Bearer <key>'")


def content_type_refusal(scope: Scope, headers: Headers) -> str | None:
    """Why the body's content type is refused (415), or None."""
    ctype = headers.get("content-type")
    route = (scope["method"], scope["path"].rstrip("/") or "/")
    accepted = ["application/json"] + (["multipart/form-data"] if route in UPLOAD_ROUTES else [])
    if ctype is None:
        empty = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
        if empty:
            return None
        return f"a request body needs a Content-Type header: send {' or '.join(accepted)}"
    media = ctype.split(";", 1)[0].strip().lower()
    if media in accepted or (media.startswith("application/") and media.endswith("+json")):
        return None
    return f"unsupported Content-Type {media[:100]!r}: send {' or '.join(accepted)}"


def body_limit(scope: Scope, headers: Headers, settings: Settings) -> tuple[int, str]:
    """The largest body this request may send and a message naming the setting that sets it."""
    multipart = headers.get("content-type", "").lower().startswith("multipart/form-data")
    if multipart and (scope["method"], scope["path"].rstrip("/")) in UPLOAD_ROUTES:
        limit = upload_limit_bytes(settings.max_upload_mb) + MULTIPART_OVERHEAD
        return limit, f"upload is over the limit of {settings.max_upload_mb:g} MB (CSRA_MAX_UPLOAD_MB)"
    return (settings.max_request_kb << 10,
            f"request body is over the limit of {settings.max_request_kb} KB (CSRA_MAX_REQUEST_KB)")


class RequestGuard:
    """The pure ASGI middleware applying the three checks above."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        headers = Headers(scope=scope)
        method = scope["method"]
        refusal: tuple[int, str | None] = (0, None)
        if not settings.api_key:
            refusal = (403, rebinding_refusal(scope, headers))
        if refusal[1] is None and method in STATE_CHANGING and not settings.api_key:
            refusal = (403, cross_site_refusal(scope, headers))
        if refusal[1] is None and method in WITH_BODY:
            refusal = (415, content_type_refusal(scope, headers))
        limit, too_large = body_limit(scope, headers, settings)
        declared = headers.get("content-length", "")
        if refusal[1] is None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            refusal = (413, too_large)
        if refusal[1] is not None:
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        await self._limited(scope, receive, send, limit, too_large)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: str) -> None:
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where no route's exception handling caught it
            if started:
                raise
            await JSONResponse({"detail": exc.detail}, status_code=413)(scope, receive, send)
