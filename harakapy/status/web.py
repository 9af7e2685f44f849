"""The status page's listener (``config/status.ini``): the page, its script and style,
and ``/status.json``, read-only.

Rules:

1. With ``[auth]`` set, every request must carry the token (``Authorization: Bearer``,
   or the cookie a ``?token=`` visit sets) or the user's password (HTTP basic
   authentication); anything else is answered 401 and shows nothing. Without ``[auth]``
   (loopback only, settings rule 2) the page is open.
2. Only ``GET`` and ``HEAD`` of four paths (and an empty ``/favicon.ico``); the page
   runs no script but its own (``Content-Security-Policy``), is never framed and never
   cached.
3. ``/status.json`` is built at most once a second, in a thread, however often it is
   asked for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import ssl
import time
import urllib.parse
from importlib import resources
from typing import Any

from aiohttp import web

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.passwords import verify_password
from harakapy.status.collect import collect
from harakapy.status.settings import StatusSettings, status_settings

log = logging.getLogger("harakapy.status")

COOKIE = "harakapy_status"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
ASSETS = {"/": ("index.html", "text/html"), "/status.js": ("status.js", "text/javascript"),
          "/status.css": ("status.css", "text/css")}


def _asset(name: str) -> bytes:
    return resources.files("harakapy.status").joinpath("static", name).read_bytes()


class Guard:
    """Rule 1."""

    def __init__(self, settings: StatusSettings) -> None:
        self.settings = settings
        self._passed: set[bytes] = set()  # digests of basic credentials already checked

    async def allows(self, request: web.Request) -> bool:
        settings = self.settings
        if not settings.guarded:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if settings.token:
            offered = value.strip() if scheme.lower() == "bearer" else \
                request.cookies.get(COOKIE, "")
            if offered and hmac.compare_digest(offered.encode(), settings.token.encode()):
                return True
        if settings.user and scheme.lower() == "basic":
            digest = hashlib.sha256(value.strip().encode()).digest()
            if digest in self._passed:
                return True
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode(
                    "utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            if hmac.compare_digest(user.encode(), settings.user.encode()) and \
                    await asyncio.to_thread(verify_password, settings.password_hash, password):
                self._passed.add(digest)
                return True
        return False

    def refusal(self) -> web.Response:
        challenge = 'Basic realm="harakapy status", charset="UTF-8"' if self.settings.user \
            else 'Bearer realm="harakapy status"'
        return web.Response(status=401, text="authentication required\n",
                            headers={**HEADERS, "WWW-Authenticate": challenge})


def _query_token(query: str) -> str:
    """``token`` of the query string as typed: a ``+`` in it stays a ``+`` (form
    decoding would make it a space)."""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "token":
            return urllib.parse.unquote(value)
    return ""


def application(config: Config, clock: Clock) -> web.Application:
    """The page's aiohttp application for ``config``; ``clock`` is the server's."""
    settings = status_settings(config)
    guard = Guard(settings)
    cached: dict[str, Any] = {"at": 0.0, "body": b""}
    building = asyncio.Lock()

    @web.middleware
    async def protect(request: web.Request, handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="read-only\n",
                                headers={**HEADERS, "Allow": "GET, HEAD"})
        if request.path == "/favicon.ico":
            return web.Response(status=204, headers=HEADERS)  # none: not worth a 401
        token = _query_token(request.rel_url.raw_query_string)
        if token and settings.token and hmac.compare_digest(token.encode(),
                                                            settings.token.encode()):
            # A visit with ?token=: the cookie carries it from now on, out of the URL.
            response = web.Response(status=303, headers={**HEADERS, "Location": request.path})
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                                secure=settings.cert is not None, path="/")
            return response
        if not await guard.allows(request):
            return guard.refusal()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a 404 from the router: the same headers
            exc.headers.update(HEADERS)
            raise
        response.headers.update(HEADERS)
        return response

    async def asset(request: web.Request) -> web.Response:
        name, kind = ASSETS[request.path]
        return web.Response(body=_asset(name), content_type=kind, charset="utf-8")

    async def status_json(request: web.Request) -> web.Response:
        async with building:
            if time.monotonic() - cached["at"] >= 1.0:
                import json

                data = await asyncio.to_thread(collect, config, clock.time())
                cached["body"] = json.dumps(data, separators=(",", ":")).encode()
                cached["at"] = time.monotonic()
        return web.Response(body=cached["body"], content_type="application/json")

    app = web.Application(middlewares=[protect])
    for path in ASSETS:
        app.router.add_get(path, asset)
    app.router.add_get("/status.json", status_json)
    return app


async def serve(config: Config, clock: Clock | None = None) -> None:
    """The listener of ``[main] listen``, until cancelled."""
    settings = status_settings(config)
    context = None
    if settings.cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(settings.cert, settings.key)
    runner = web.AppRunner(application(config, clock or Clock()), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context,
                       reuse_address=True)
    await site.start()
    log.info("status page on %s", settings.url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
