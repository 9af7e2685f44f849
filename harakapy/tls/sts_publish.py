"""An HTTPS server for our own MTA-STS policies (RFC 8461 3.2), for a small installation
that has no web server: ``GET /.well-known/mta-sts.txt`` on ``mta-sts.<domain>``.

Rules:

1. The domain is the request's ``Host`` (port and a trailing dot removed), which must be
   ``mta-sts.`` and a domain we publish for; anything else is 404, and only the
   well-known path exists. Sending MTAs do not follow redirects, so there are none.
2. The answer is ``200`` with ``Content-Type: text/plain``, the policy file, and
   ``Cache-Control: no-cache`` (the policy's lifetime is ``max_age``, not HTTP's).
3. A policy whose MX hosts come from DNS is ``503`` while DNS fails: a sender keeps
   the policy it has rather than learn a wrong one.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from harakapy.dns import DnsError

log = logging.getLogger("harakapy.mta_sts")

WELL_KNOWN = "/.well-known/mta-sts.txt"
PolicyFor = Callable[[str], Awaitable[bytes | None]]


def requested_domain(host: str) -> str:
    """The policy domain a ``Host`` header asks for; empty when it is not ``mta-sts.*``."""
    name = host.strip().lower()
    if name.startswith("["):
        return ""
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    return name[len("mta-sts."):] if name.startswith("mta-sts.") else ""


class PolicyServer:
    """The listener: ``policy_for(domain)`` gives the file to serve, ``None`` if not ours.
    """

    def __init__(self, policy_for: PolicyFor, context: ssl.SSLContext) -> None:
        self.policy_for = policy_for
        self.context = context
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        domain = requested_domain(request.host)
        if request.path != WELL_KNOWN or not domain:
            return web.Response(status=404, text="not found\n")
        try:
            body = await self.policy_for(domain)
        except DnsError as exc:
            log.warning("MTA-STS publish: the MX hosts of %s are not known (%s); "
                        "answered 503", domain, exc.reason)
            return web.Response(status=503, text="the policy is not available now\n")
        if body is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=body, content_type="text/plain", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.context,
                           reuse_address=True)
        await site.start()
        server = site._server
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
        log.info("MTA-STS policies served on https://%s:%d%s", host, self.port, WELL_KNOWN)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
