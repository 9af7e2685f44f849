"""Receiving mail servers for outbound tests: real aiosmtpd servers on 127.0.0.x.

A ReceivingMTA answers each recipient by a rule the test sets, records every message and
whether TLS was up when it arrived, and counts connections (to see connection reuse).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    mail_options: list[str]
    peer: str


@dataclass
class ReceivingMTA:
    """``async with ReceivingMTA("127.0.0.2", port) as mta`` runs a receiver.

    :param rcpt_reply: ``address -> reply`` (``None`` accepts).
    :param data_reply: ``() -> reply`` after the message (``None`` accepts).
    :param cert: ``(cert_path, key_path)`` to offer STARTTLS.
    :param tls_context: a server context to offer STARTTLS with (instead of ``cert``).
    :param extensions: extra EHLO keywords; ``drop`` removes keywords (e.g. ``8BITMIME``).
    :param mail_params: MAIL FROM parameters to accept beyond aiosmtpd's (``REQUIRETLS``).
    :param data_delay: seconds to take before answering the end of data.
    """

    host: str
    port: int
    rcpt_reply: Callable[[str], str | None] = lambda address: None
    data_reply: Callable[[], str | None] = lambda: None
    cert: tuple[str, str] | None = None
    tls_context: ssl.SSLContext | None = None
    extensions: tuple[str, ...] = ("PIPELINING",)
    drop: tuple[str, ...] = ()
    mail_params: tuple[str, ...] = ()
    smtputf8: bool = True
    lmtp: bool = False
    lmtp_reply: Callable[[str], str | None] = lambda address: None
    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    quits: int = 0
    commands: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> ReceivingMTA:
        context = self.tls_context
        if self.cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.cert)
        mta = self

        class Handler:
            async def handle_EHLO(self, server, session, envelope, hostname, responses):
                session.host_name = hostname
                keep = [r for r in responses[:-1]
                        if not any(r[4:].upper().startswith(d) for d in mta.drop)]
                return keep + [f"250-{e}" for e in mta.extensions] + [responses[-1]]

            async def handle_MAIL(self, server, session, envelope, address, options):
                mta.commands.append(f"MAIL {address}")
                envelope.mail_from = address
                envelope.mail_options.extend(options)
                return "250 2.1.0 OK"

            async def handle_RCPT(self, server, session, envelope, address, options):
                mta.commands.append(" ".join([f"RCPT {address}", *options]))
                reply = mta.rcpt_reply(address)
                if reply is not None:
                    return reply
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_QUIT(self, server, session, envelope):
                mta.quits += 1
                return "221 Bye"

            async def handle_DATA(self, server, session: Session, envelope: Envelope):
                if mta.data_delay:
                    await asyncio.sleep(mta.data_delay)  # a receiver that takes its time
                reply = mta.data_reply()
                if reply is not None:
                    return reply
                if mta.lmtp:
                    # RFC 2033: one reply per accepted recipient, in order.
                    replies = [mta.lmtp_reply(r) or "250 2.0.0 Ok" for r in envelope.rcpt_tos]
                    kept = [r for r, reply in zip(envelope.rcpt_tos, replies, strict=True)
                            if reply.startswith("2")]
                    if kept:
                        mta.messages.append(Received(
                            envelope.mail_from, kept, envelope.original_content,
                            session.ssl is not None, list(envelope.mail_options),
                            session.peer[0]))
                    return "\r\n".join(replies)
                mta.messages.append(Received(
                    envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                    session.ssl is not None, list(envelope.mail_options),
                    session.peer[0]))
                return "250 2.0.0 Ok: stored"

        class Accepting(LMTP if mta.lmtp else SMTP):
            def _getparams(self, params):
                found = super()._getparams(params)
                for name in mta.mail_params:
                    if found is not None:
                        found.pop(name, None)
                return found

        def factory() -> SMTP:
            mta.connections += 1
            return Accepting(Handler(), tls_context=context, enable_SMTPUTF8=mta.smtputf8,
                             hostname=f"mx-{mta.host}", ident="test")

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, self.host, self.port,
                                                reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


@dataclass
class Tarpit:
    """``async with Tarpit("127.0.0.2", port)``: a receiving server that accepts connections
    and never greets, so deliveries to it stay in flight until the client gives up."""

    host: str
    port: int
    connections: int = 0
    _transports: list[asyncio.BaseTransport] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> Tarpit:
        tarpit = self

        class Silent(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                tarpit.connections += 1
                tarpit._transports.append(transport)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(Silent, self.host, self.port,
                                                reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self._transports:
            transport.abort()
        await self._server.wait_closed()


@dataclass
class StartTlsStripper:
    """An active attacker between harakapy and a receiving server (RFC 7672 1.3).

    ``async with StartTlsStripper("127.0.0.7", port, upstream=("127.0.0.2", port))``.

    :param mode: ``strip`` rewrites STARTTLS in the EHLO reply to XXXXXXXX, so the client
        never learns it was offered; ``refuse`` passes EHLO through and answers STARTTLS
        itself with 454, as a middlebox that "does not support" it.
    :ivar from_client: every byte the client sent, as the attacker read it in plaintext.
    """

    host: str
    port: int
    upstream: tuple[str, int]
    mode: str = "strip"
    from_client: bytearray = field(default_factory=bytearray)
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def __aenter__(self) -> StartTlsStripper:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection(*self.upstream)

        async def server_to_client() -> None:
            while line := await server_reader.readline():
                if self.mode == "strip":
                    line = line.replace(b"STARTTLS", b"XXXXXXXX")
                client_writer.write(line)
                await client_writer.drain()
            client_writer.close()

        async def client_to_server() -> None:
            while line := await client_reader.readline():
                self.from_client += line
                if self.mode == "refuse" and line.strip().upper() == b"STARTTLS":
                    client_writer.write(b"454 4.7.0 TLS not available due to local problem"
                                        b"\r\n")
                    await client_writer.drain()
                    continue
                server_writer.write(line)
                await server_writer.drain()
            server_writer.close()

        tasks = [asyncio.create_task(server_to_client()), asyncio.create_task(client_to_server())]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            client_writer.close()
            server_writer.close()
