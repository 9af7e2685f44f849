"""The outbound SMTP client on its own: what it refuses to send, how it writes message text,
and that it pipelines when, and only when, the server offers PIPELINING.

Real servers on 127.0.0.x: aiosmtpd's (tests/servers.py) behind a tap that keeps every byte
the client wrote, and a small server here that logs each read off its socket and each reply
in the order they happened.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import dataclass, field

import pytest

from harakapy.outbound.client import (
    LocalArgumentError,
    SessionError,
    SmtpSession,
    Stage,
    Timeouts,
    dot_stuff,
)
from harakapy.spool.store import Spool
from tests.harness import eventually, running_server
from tests.servers import ReceivingMTA

TIMEOUTS = Timeouts(connect=5.0, command=5.0, data_done=5.0)
MESSAGE = b"Subject: t\r\n\r\nhello\r\n"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class Tap:
    """A TCP relay in front of a receiving server that keeps what the client sent, as read.

    ``async with Tap("127.0.0.31", upstream=("127.0.0.30", port)) as tap``; ``tap.port`` is
    the OS-chosen port to connect to, ``tap.sent`` every byte from the client so far.
    """

    host: str
    upstream: tuple[str, int]
    chunks: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _relays: set[asyncio.Task] = field(default_factory=set)

    @property
    def sent(self) -> bytes:
        return b"".join(self.chunks)

    async def __aenter__(self) -> Tap:
        self._server = await asyncio.start_server(self._relay, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._relays.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       keep: bool) -> None:
            try:
                while chunk := await source.read(65536):
                    if keep:
                        self.chunks.append(chunk)
                    sink.write(chunk)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        async with asyncio.TaskGroup() as relays:
            relays.create_task(pump(reader, up_writer, keep=True))
            relays.create_task(pump(up_reader, writer, keep=False))


@pytest.fixture
async def mta():
    host = "127.0.0.30"
    async with ReceivingMTA(host, free_port(host)) as receiver:
        yield receiver


@pytest.fixture
async def tap(mta):
    async with Tap("127.0.0.31", upstream=(mta.host, mta.port)) as relay:
        yield relay


@pytest.fixture
async def session(tap):
    opened = await SmtpSession.open(tap.host, tap.port, timeouts=TIMEOUTS)
    await opened.ehlo("client.test")
    yield opened
    await opened.quit()


async def sent_since(session: SmtpSession, tap: Tap, mark: int) -> bytes:
    """What the client wrote since ``tap.sent`` was ``mark`` bytes long.

    A NOOP goes last: its reply comes back through the tap only after the tap has read
    everything written before it, so nothing the client sent can still be on its way.
    """
    reply = await session.command(Stage.COMMAND, "NOOP")
    assert reply.code == 250
    sent = tap.sent[mark:]
    assert sent.endswith(b"NOOP\r\n")
    return sent[:-len(b"NOOP\r\n")]


# -- Rule 1: no CR, LF or NUL in a command ---------------------------------------------

BAD = {"CR": "\r", "LF": "\n", "NUL": "\0"}


@pytest.mark.parametrize("character", BAD)
async def test_a_mail_parameter_with_a_line_break_sends_nothing_of_the_transaction(
        session, tap, mta, character):
    # MAIL parameters come from plugins' TLS policies; this one would smuggle a recipient.
    param = f"REQUIRETLS{BAD[character]}RCPT TO:<eve@evil.test>"
    mark = len(tap.sent)
    with pytest.raises(LocalArgumentError) as refused:
        await session.send("alice@sender.test", ["bob@dest.test"], MESSAGE,
                           mail_params=["SIZE=20", param])
    assert refused.value.stage == "mail" and refused.value.character == character
    assert refused.value.command == "MAIL FROM" and not refused.value.permanent
    assert "MAIL FROM parameter" in str(refused.value) and character in str(refused.value)
    assert isinstance(refused.value, SessionError)  # delivery's handling of a failed host
    assert await sent_since(session, tap, mark) == b""
    # Nothing was sent, so the session is as it was: the next transaction goes through.
    result = await session.send("alice@sender.test", ["bob@dest.test"], MESSAGE)
    assert [r.code for r in result.recipients] == [250]
    assert mta.commands == ["MAIL alice@sender.test", "RCPT bob@dest.test"]
    assert b"eve@evil.test" not in tap.sent


@pytest.mark.parametrize("character", BAD)
async def test_a_bad_recipient_is_refused_here_and_the_others_are_delivered(
        session, tap, mta, character):
    bad = f"bob@dest.test>{BAD[character]}RCPT TO:<eve@evil.test"
    mark = len(tap.sent)
    result = await session.send("alice@sender.test", ["carol@dest.test", bad, "dan@dest.test"],
                                MESSAGE)
    codes = [(r.code, r.enhanced) for r in result.recipients]
    assert codes == [(250, "2.0.0"), (501, "5.1.3"), (250, "2.0.0")]
    assert f"contains {character} (RCPT TO not sent)" in result.recipients[1].text
    sent = await sent_since(session, tap, mark)
    assert sent == (b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<carol@dest.test>\r\n"
                    b"RCPT TO:<dan@dest.test>\r\nDATA\r\n" + dot_stuff(MESSAGE))
    assert mta.commands == ["MAIL alice@sender.test", "RCPT carol@dest.test",
                            "RCPT dan@dest.test"]


async def test_when_every_recipient_is_bad_not_even_mail_is_sent(session, tap, mta):
    mark = len(tap.sent)
    result = await session.send("alice@sender.test", ["a\r@dest.test", "b\0@dest.test"],
                                MESSAGE)
    assert not result.mail.positive and not result.mail.transient
    assert [r.enhanced for r in result.recipients] == ["5.1.3", "5.1.3"]
    assert await sent_since(session, tap, mark) == b""
    assert mta.commands == []


@pytest.mark.parametrize("character", BAD)
async def test_a_bad_sender_is_refused_for_every_recipient_and_nothing_is_sent(
        session, tap, mta, character):
    mark = len(tap.sent)
    result = await session.send(f"alice{BAD[character]}@sender.test",
                                ["bob@dest.test", "carol@dest.test"], MESSAGE)
    assert (result.mail.code, result.mail.enhanced) == (501, "5.1.7")
    assert [r.enhanced for r in result.recipients] == ["5.1.7", "5.1.7"]
    assert await sent_since(session, tap, mark) == b""
    assert mta.commands == [] and mta.messages == []


@pytest.mark.parametrize("character", BAD)
async def test_an_ehlo_name_with_a_line_break_is_not_sent(tap, character):
    opened = await SmtpSession.open(tap.host, tap.port, timeouts=TIMEOUTS)
    try:
        with pytest.raises(LocalArgumentError) as refused:
            await opened.ehlo(f"client.test{BAD[character]}MAIL FROM:<eve@evil.test>")
        assert refused.value.stage == "ehlo" and refused.value.command == "EHLO"
        await opened.ehlo("client.test")
        assert opened.supports("PIPELINING")
        assert await sent_since(opened, tap, 0) == b"EHLO client.test\r\n"
    finally:
        await opened.quit()


async def test_any_other_command_is_checked_too(session, tap):
    mark = len(tap.sent)
    with pytest.raises(LocalArgumentError) as refused:
        await session.command(Stage.COMMAND, "VRFY bob\r\nDATA")
    assert refused.value.command == "VRFY" and refused.value.character == "CR"
    assert await sent_since(session, tap, mark) == b""


async def test_an_address_that_cannot_be_utf8_is_refused(session, tap):
    mark = len(tap.sent)
    result = await session.send("alice@sender.test", ["b\udcff@dest.test"], MESSAGE)
    assert result.recipients[0].enhanced == "5.1.3"
    assert "non-UTF-8" in result.recipients[0].text
    assert await sent_since(session, tap, mark) == b""


ROUTE_PLUGIN = '''
from harakapy import hookimpl


@hookimpl
def get_mx(domain, server):
    return server.config.value("route")
'''


async def test_through_the_queue_a_bad_recipient_bounces_and_the_good_one_is_delivered(
        config_dir, tap, mta):
    root = config_dir({"me": "harakapy.test\n", "plugins": "route\n",
                       "route": f"{tap.host}:{tap.port}\n",
                       "outbound.ini": "[main]\nconnect_timeout = 2\ncommand_timeout = 5\n"},
                      {"route": ROUTE_PLUGIN})
    bad = "bob@dest.test>\r\nRCPT TO:<eve@dest.test"
    # submit() refuses such an address at the door; a spool written by something else (an
    # older version, a hand edit) can still hold one, and the client is the last guard.
    spool = Spool(root / "queue")
    spool.create()
    spool.accept(id="BADRCPT1", sender="alice@sender.test", recipients=["carol@dest.test", bad],
                 message=MESSAGE)
    async with running_server(root):
        # The message, then the DSN for the bad recipient, through the same route.
        await eventually(lambda: len(mta.messages) == 2)
    delivered, dsn = mta.messages
    assert delivered.recipients == ["carol@dest.test"] and delivered.data == MESSAGE
    assert dsn.sender == "<>" and dsn.recipients == ["alice@sender.test"]
    report = dsn.data.decode()
    assert "Status: 5.1.3" in report and "bad recipient address syntax" in report
    assert "RCPT eve@dest.test" not in mta.commands
    assert b"RCPT TO:<bob@dest.test>" not in tap.sent


POLICY_PLUGIN = '''
from harakapy import Level, Policy, hookimpl


@hookimpl
def tls_policy(domain):
    # A plugin's bug: a MAIL parameter that would smuggle a recipient in.
    return Policy(Level.MAY, mail_parameters=("REQUIRETLS\\r\\nRCPT TO:<eve@dest.test>",))


@hookimpl
def deferred(recipients, reason, server):
    server.notes.setdefault("deferred", []).append(([r.address for r in recipients], reason))
'''


async def test_through_the_queue_a_bad_mail_parameter_sends_no_mail_and_defers(
        config_dir, tls_ca, tmp_path):
    cert = tls_ca.issue_cert("mx.dest.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    host = "127.0.0.34"
    async with ReceivingMTA(host, free_port(host),
                            cert=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))) as mx:
        root = config_dir({"me": "harakapy.test\n", "plugins": "route\npolicy\n",
                           "route": f"{mx.host}:{mx.port}\n",
                           "outbound.ini": "[main]\nconnect_timeout = 2\n"
                                           "command_timeout = 5\n"},
                          {"route": ROUTE_PLUGIN, "policy": POLICY_PLUGIN})
        async with running_server(root) as hp:
            await hp.server.submit("alice@sender.test", ["carol@dest.test"], MESSAGE)
            await eventually(lambda: hp.server.notes.get("deferred"))
            ((recipients, reason),) = hp.server.notes["deferred"]
    assert recipients == ["carol@dest.test"]
    assert "MAIL FROM parameter 'REQUIRETLS\\r\\nRCPT TO:<eve@dest.test>' contains CR" in reason
    assert mx.connections >= 1 and mx.commands == [] and mx.messages == []


# -- Rule 2: message text goes out with CRLF line ends only ----------------------------


def by_the_rule(text: bytes) -> bytes:
    """The wire form, one byte at a time: what :func:`dot_stuff` must equal."""
    lines, line, i = [], bytearray(), 0
    while i < len(text):
        if text[i:i + 2] == b"\r\n" or text[i:i + 1] == b"\n":
            lines.append(bytes(line))
            line.clear()
            i += 2 if text[i:i + 1] == b"\r" else 1
            continue
        line += b" " if text[i:i + 1] == b"\r" else text[i:i + 1]
        i += 1
    if line or not lines:
        lines.append(bytes(line))
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


def ends_of_data(wire: bytes) -> list[int]:
    """Where a server that takes any of CR, LF or CRLF as a line end would see the dot
    that ends DATA: only at ``len(wire) - 3`` when the text is safe."""
    found, lined = set(), b"\r\n" + wire  # the text starts at a line start
    for before, after in itertools.product((b"\r\n", b"\n", b"\r"), repeat=2):
        mark, at = before + b"." + after, -1
        while (at := lined.find(mark, at + 1)) != -1:
            found.add(at + len(before) - 2)
    return sorted(found)


def test_every_short_text_goes_out_by_the_rule_and_ends_only_at_its_end():
    for size in range(7):
        for letters in itertools.product((b"a", b".", b"\r", b"\n"), repeat=size):
            text = b"".join(letters)
            wire = dot_stuff(text)
            assert wire == by_the_rule(text), text
            assert wire.replace(b"\r\n", b"").count(b"\r") == 0, text
            assert wire.replace(b"\r\n", b"").count(b"\n") == 0, text
            assert ends_of_data(wire) == [len(wire) - 3], text


@pytest.mark.parametrize(("text", "wire"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb", b"a\r\nb\r\n.\r\n"),                       # bare LF: a line end
    (b"Subject: x\rBcc: y\r\n", b"Subject: x Bcc: y\r\n.\r\n"),  # bare CR: a space
    (b"a\r\r\nb\r\n", b"a \r\nb\r\n.\r\n"),
    (b"a\n\rb\r\n", b"a\r\n b\r\n.\r\n"),
    (b".a\r\n..b\r\n", b"..a\r\n...b\r\n.\r\n"),
    # SMTP smuggling (SEC Consult, 2023): each would end DATA early at a loose server.
    (b"a\n.\r\nMAIL", b"a\r\n..\r\nMAIL\r\n.\r\n"),
    (b"a\r\n.\nMAIL", b"a\r\n..\r\nMAIL\r\n.\r\n"),
    (b"a\n.\nMAIL", b"a\r\n..\r\nMAIL\r\n.\r\n"),
    (b"a\r.\rMAIL", b"a . MAIL\r\n.\r\n"),
    (b"a\r.\r\nMAIL", b"a .\r\nMAIL\r\n.\r\n"),
    (b"", b"\r\n.\r\n"),
])
def test_line_ends_and_smuggling_sequences(text, wire):
    assert dot_stuff(text) == wire


async def test_a_smuggling_attempt_reaches_the_server_as_one_message(session, tap, mta):
    smuggled = (b"Subject: one\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@dest.test>\r\n"
                b"RCPT TO:<bob@dest.test>\r\nDATA\r\nSubject: two\r\r\n.\r\r\n\r.\rQUIT\r\n")
    mark = len(tap.sent)
    result = await session.send("alice@sender.test", ["bob@dest.test"], smuggled)
    assert [r.code for r in result.recipients] == [250]
    sent = await sent_since(session, tap, mark)
    head, _, data = sent.partition(b"DATA\r\n")
    assert head == b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@dest.test>\r\n"
    assert data == (b"Subject: one\r\n\r\nhello\r\n..\r\nMAIL FROM:<ceo@dest.test>\r\n"
                    b"RCPT TO:<bob@dest.test>\r\nDATA\r\nSubject: two \r\n.. \r\n . QUIT\r\n"
                    b".\r\n")
    assert ends_of_data(data) == [len(data) - 3]
    (got,) = mta.messages
    assert got.data == (b"Subject: one\r\n\r\nhello\r\n.\r\nMAIL FROM:<ceo@dest.test>\r\n"
                        b"RCPT TO:<bob@dest.test>\r\nDATA\r\nSubject: two \r\n. \r\n . QUIT\r\n")
    assert mta.commands == ["MAIL alice@sender.test", "RCPT bob@dest.test"]


# -- PIPELINING ------------------------------------------------------------------------


@dataclass
class WireMTA:
    """A receiving server that speaks just enough SMTP and logs, in order, each read off
    its socket (``("read", bytes)``) and each reply it wrote (``("reply", bytes)``).

    Before each reply it makes a round trip of its own through the kernel and the event
    loop (a byte over a socketpair): bytes a client had written before that, without
    waiting for the reply, are read first and land in the log before the reply does.
    """

    host: str
    pipelining: bool
    log: list[tuple[str, bytes]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _ping: tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter] | None = None

    async def __aenter__(self) -> WireMTA:
        near, far = socket.socketpair()
        ping_reader, ping_back = await asyncio.open_connection(sock=near)
        _, ping_writer = await asyncio.open_connection(sock=far)
        self._ping = (ping_reader, ping_writer, ping_back)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _WireSession(self), self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._ping is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._ping[1:]:
            writer.close()
            await writer.wait_closed()
        await self._server.wait_closed()

    async def settle(self) -> None:
        assert self._ping is not None
        reader, writer, _ = self._ping
        writer.write(b".")
        await reader.readexactly(1)

    def after_ehlo(self) -> list[tuple[str, bytes]]:
        replies = [i for i, (kind, data) in enumerate(self.log)
                   if kind == "reply" and data.startswith(b"250-wire.test")]
        return self.log[replies[0] + 1:]


class _WireSession(asyncio.Protocol):
    def __init__(self, mta: WireMTA) -> None:
        self.mta = mta
        self.buffer = b""
        self.arrived = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        task = asyncio.get_running_loop().create_task(self.serve())
        self.mta._tasks.add(task)
        task.add_done_callback(self.mta._tasks.discard)

    def data_received(self, data: bytes) -> None:
        self.mta.log.append(("read", data))
        self.buffer += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrived.set()

    async def until(self, end: bytes) -> bytes | None:
        while end not in self.buffer:
            if self.transport is None or self.transport.is_closing():
                return None
            self.arrived.clear()
            await self.arrived.wait()
        taken, _, self.buffer = self.buffer.partition(end)
        return taken

    async def reply(self, text: bytes) -> None:
        await self.mta.settle()
        self.mta.log.append(("reply", text))
        assert self.transport is not None
        self.transport.write(text + b"\r\n")

    async def serve(self) -> None:
        await self.reply(b"220 wire.test ESMTP")
        while (line := await self.until(b"\r\n")) is not None:
            verb = line[:4].upper()
            if verb == b"EHLO":
                await self.reply(b"250-wire.test\r\n250-PIPELINING\r\n250 8BITMIME"
                                 if self.mta.pipelining else b"250-wire.test\r\n250 8BITMIME")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                await self.reply(b"250 2.0.0 Ok")
            elif verb == b"DATA":
                await self.reply(b"354 End data with <CR><LF>.<CR><LF>")
                if await self.until(b"\r\n.\r\n") is None:
                    return
                await self.reply(b"250 2.0.0 Ok: stored")
            elif verb == b"QUIT":
                await self.reply(b"221 2.0.0 Bye")
                assert self.transport is not None
                self.transport.close()
                return
            else:
                await self.reply(b"502 5.5.2 Not implemented")


async def transaction_against(server: WireMTA) -> list[int]:
    opened = await SmtpSession.open(server.host, server.port, timeouts=TIMEOUTS)
    try:
        await opened.ehlo("client.test")
        result = await opened.send("alice@sender.test", ["bob@dest.test", "carol@dest.test"],
                                   MESSAGE)
    finally:
        await opened.quit()
    return [r.code for r in result.recipients]


async def test_with_pipelining_mail_rcpt_and_data_arrive_in_one_read():
    async with WireMTA("127.0.0.32", pipelining=True) as server:
        assert await transaction_against(server) == [250, 250]
    assert server.after_ehlo() == [
        ("read", b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@dest.test>\r\n"
                 b"RCPT TO:<carol@dest.test>\r\nDATA\r\n"),
        ("reply", b"250 2.0.0 Ok"), ("reply", b"250 2.0.0 Ok"), ("reply", b"250 2.0.0 Ok"),
        ("reply", b"354 End data with <CR><LF>.<CR><LF>"),
        ("read", dot_stuff(MESSAGE)),
        ("reply", b"250 2.0.0 Ok: stored"),
        ("read", b"QUIT\r\n"), ("reply", b"221 2.0.0 Bye"),
    ]


async def test_without_pipelining_each_command_waits_for_the_previous_reply():
    async with WireMTA("127.0.0.33", pipelining=False) as server:
        assert await transaction_against(server) == [250, 250]
    assert server.after_ehlo() == [
        ("read", b"MAIL FROM:<alice@sender.test>\r\n"), ("reply", b"250 2.0.0 Ok"),
        ("read", b"RCPT TO:<bob@dest.test>\r\n"), ("reply", b"250 2.0.0 Ok"),
        ("read", b"RCPT TO:<carol@dest.test>\r\n"), ("reply", b"250 2.0.0 Ok"),
        ("read", b"DATA\r\n"), ("reply", b"354 End data with <CR><LF>.<CR><LF>"),
        ("read", dot_stuff(MESSAGE)),
        ("reply", b"250 2.0.0 Ok: stored"),
        ("read", b"QUIT\r\n"), ("reply", b"221 2.0.0 Bye"),
    ]
