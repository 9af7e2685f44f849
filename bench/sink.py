"""Receiving sink for relay benchmarks: accepts every message, counts them.

Plaintext, or STARTTLS with a throwaway self-signed certificate (``--tls``), or with a
given one (``--tls --cert C --key K``, for relays that verify it). Every 0.1 s
it writes ``{"count": N, "first": t0, "last": t1}`` to ``--status`` so the benchmark
runner can see end-to-end delivery without talking to it.

    python -m bench.sink --port 2600 --tls --status /tmp/sink.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import time

from aiosmtpd.smtp import SMTP

from harakapy.tls.context import self_signed_context


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    async def handle_DATA(self, server, session, envelope):
        now = time.time()
        if not self.count:
            self.first = now
        self.count += len(envelope.rcpt_tos) and 1
        self.last = now
        return "250 2.0.0 Ok: sunk"


async def serve(port: int, tls: bool, status: str, host: str = "127.0.0.1",
                cert: str | None = None, key: str | None = None) -> None:
    counter = Counter()
    context = self_signed_context("sink.test") if tls else None
    if tls and cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(counter, tls_context=context, hostname="sink.test", ident="sink",
                     data_size_limit=0),
        host, port, reuse_address=True, backlog=1024)

    async def report() -> None:
        while True:
            tmp = status + ".tmp"
            with open(tmp, "w") as handle:
                json.dump({"count": counter.count, "first": counter.first,
                           "last": counter.last}, handle)
            os.replace(tmp, status)
            await asyncio.sleep(0.1)

    async with server:
        await report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--cert", help="PEM certificate chain for --tls")
    parser.add_argument("--key", help="PEM key for --cert")
    parser.add_argument("--status", required=True)
    args = parser.parse_args()
    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)
    asyncio.run(serve(args.port, args.tls, args.status, args.host, args.cert, args.key))


if __name__ == "__main__":
    main()
