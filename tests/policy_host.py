"""An MTA-STS policy host for tests: a real aiohttp HTTPS server on 127.0.0.x with a
certificate from a test CA, answering with what the test says."""

from __future__ import annotations

import ssl

import trustme
from aiohttp import web


def server_context(ca: trustme.CA, *names: str, **options) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names, **options).configure_cert(context)
    return context


class PolicyHost:
    """An HTTPS server on 127.0.0.x answering the well-known path with ``handler``; it
    records every path asked for."""

    def __init__(self, host: str, context: ssl.SSLContext, handler, port: int = 0,
                 method: str = "GET") -> None:
        self.host, self.context, self.handler, self.method = host, context, handler, method
        self.requests: list[str] = []
        self.port = port

    async def __aenter__(self) -> PolicyHost:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            return await self.handler(request)

        app = web.Application()
        app.router.add_route(self.method, "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.context,
                           reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def plain(body: bytes, content_type: str = "text/plain"):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})
    return handler
