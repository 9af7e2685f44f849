"""An SMTP/LMTP client session for delivery: greeting, EHLO, STARTTLS, one transaction at a
time with PIPELINING, per-recipient replies.

Written here rather than with aiosmtplib, whose protocol reads one reply per command
(no PIPELINING), speaks no LMTP, and turns every bare CR in message text into a line end.
This module knows the SMTP client dialogue and nothing of queues, MX lists or TLS policy:
the caller hands it an SSL context and decides what a failure means.

Being our own client, it owns what a library would guard:

- Rule 1: no command goes out with CR, LF or NUL in an argument (RFC 5321 2.3.8, 4.1.1.4).
  Arguments come from the spool and from plugins (MAIL parameters from TLS policies); a
  line break in one would be a command of its own at the server. Such a command is refused
  before any byte of it, or of a pipelined batch holding it, is written.
- Rule 2: message text goes out with CRLF line ends only, whatever it holds (see
  :func:`dot_stuff`), so the only ``CRLF.CRLF`` a server sees is the one that ends DATA.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

MAX_REPLY_LINES = 100  # a hostile server cannot make us buffer without bound
# With PIPELINING, a BDAT message up to this size is sent before the RCPT replies are in.
PIPELINED_CHUNK = 64 << 10
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")
_UNSAFE = re.compile(r"[\r\n\0]")
_CHARACTER_NAMES = {"\r": "CR", "\n": "LF", "\0": "NUL"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. ``text`` keeps the lines joined with a space.

    :ivar local: We made it up (a command we would not send), the server never said it.
    """

    code: int
    text: str
    local: bool = False

    @property
    def enhanced(self) -> str | None:
        match = _ENHANCED.match(self.text)
        return match.group(1) if match else None

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Stage(StrEnum):
    """Where in the dialogue a session is: what a :class:`SessionError` happened at."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    TLS = "tls"  # the handshake after STARTTLS
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    RSET = "rset"
    COMMAND = "command"  # any other command (NOOP, VRFY, ...)


class SessionError(Exception):
    """The session broke: no connection, a timeout, a dropped line, a reply we cannot parse,
    or a refusal at a stage that concerns the whole session (greeting, EHLO, STARTTLS).

    :ivar stage: The :class:`Stage`.
    :ivar reply: The server's reply, when it gave one.
    :ivar error: The exception behind it (the :mod:`ssl` error of a failed handshake).
    """

    def __init__(self, stage: Stage, reason: str, reply: Reply | None = None,
                 error: BaseException | None = None) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.reply = reply
        self.error = error

    @property
    def permanent(self) -> bool:
        return self.reply is not None and self.reply.code >= 500


class LocalArgumentError(SessionError):
    """A command we were asked to send has an argument no server may see: CR, LF or NUL in
    it, or text that cannot be UTF-8. The fault is ours (the spool's or a plugin's), not the
    server's, and nothing of the command was sent: the session is as it was.

    :ivar command: ``EHLO``, ``MAIL FROM``, ``RCPT TO``, ...
    :ivar argument: The argument as we were given it.
    :ivar character: ``CR``, ``LF``, ``NUL``, or ``non-UTF-8``.
    :ivar enhanced: The RFC 3463 status it deserves: ``5.1.7`` for a sender address,
        ``5.1.3`` for a recipient address (they can never be sent), ``4.3.5`` for anything
        else (a local configuration error the operator can mend).
    """

    def __init__(self, stage: Stage, command: str, what: str, argument: str, character: str,
                 enhanced: str) -> None:
        super().__init__(stage, f"{command} {what} {argument!r} contains {character}: "
                                f"not sent")
        self.command = command
        self.argument = argument
        self.character = character
        self.enhanced = enhanced

    @property
    def permanent(self) -> bool:
        return self.enhanced.startswith("5")

    def refusal(self, text: str) -> Reply:
        """Our own refusal, shaped as the reply a server gives to a bad address."""
        return Reply(501, f"{self.enhanced} {text}: {self.argument!r} contains "
                          f"{self.character} ({self.command} not sent)", local=True)


def _check_argument(stage: Stage, command: str, what: str, argument: str, *,
                    enhanced: str = "4.3.5") -> None:
    """Refuse an argument a command may not carry.

    :param stage: The :class:`SessionError` stage (``mail``, ``rcpt``, ...).
    :param command: The command, for the message (``MAIL FROM``).
    :param what: What the argument is, for the message (``address``, ``parameter``).
    :param enhanced: The status a refusal carries (default ``4.3.5``).
    :raises LocalArgumentError: for CR, LF or NUL, or text that cannot be UTF-8.
    """
    found = _UNSAFE.search(argument)
    if found is not None:
        raise LocalArgumentError(stage, command, what, argument,
                                 _CHARACTER_NAMES[found.group()], enhanced)
    if not argument.isascii():
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, from bytes decoded with surrogateescape
            raise LocalArgumentError(stage, command, what, argument, "non-UTF-8",
                                     enhanced) from None


@dataclass(slots=True)
class TransactionResult:
    """What the server said to one transaction.

    :ivar mail: The reply to MAIL FROM.
    :ivar recipients: One reply per recipient, in order (LMTP: the final reply after DATA
        for each accepted one; SMTP: the RCPT reply, or the DATA reply for those accepted).
    """

    mail: Reply
    recipients: list[Reply] = field(default_factory=list)


@dataclass(slots=True)
class Timeouts:
    """Seconds each step may take (RFC 5321 4.5.3.2; Postfix's client defaults)."""

    connect: float = 30.0
    command: float = 300.0
    data_done: float = 600.0


def _rcpt_reply(reply: Reply) -> Reply:
    # RFC 5321 4.5.3.1.10: 552 to RCPT means "too many recipients": retry them later.
    return Reply(452, reply.text) if reply.code == 552 else reply


def canonical(message: bytes) -> bytes:
    """The message with every line end CRLF and one at the end: what BDAT sends as it is
    and DATA sends dot-stuffed (bare LF and bare CR as :func:`dot_stuff` says)."""
    # The text is clean exactly when taking out every CR and putting one before every LF
    # gives it back. Both steps replace one byte, which CPython does with memchr: ~35 us
    # for 100 KB, where counting CR, LF and CRLF would take ~150 us.
    if message.replace(b"\r", b"").replace(b"\n", b"\r\n") != message:
        # Once every CRLF is LF, each CR left was a bare one.
        message = (message.replace(b"\r\n", b"\n").replace(b"\r", b" ")
                   .replace(b"\n", b"\r\n"))
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def dot_stuff(message: bytes) -> bytes:
    """The message as sent after DATA: line ends made CRLF, leading dots doubled, CRLF at
    the end, then ``.``.

    RFC 5321 4.1.1.4: a client MUST NOT send CR or LF except as CRLF. A bare LF becomes
    CRLF, a line end: what the inbound side does with one (``inbound/data.py``), and what
    Postfix's smtpd does (``smtpd_forbid_bare_newline = normalize``). A bare CR becomes a
    space, as Postfix's cleanup does (``cleanup_replace_stray_cr_lf``, 3.9): a CR is no
    line end in SMTP or RFC 5322, and making it one could start a new header line
    (``Subject: x<CR>Bcc: y``). After this no CR or LF is left outside a CRLF, so every
    line that starts with a dot is stuffed, and no smuggling sequence (``<LF>.<CR><LF>``,
    ``<CR><LF>.<LF>``, ``<CR>.<CR>``) can end DATA early at a server that reads line ends
    more loosely than RFC 5321 does.
    """
    stuffed = canonical(message).replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class SmtpSession:
    """One open connection to a receiving server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 timeouts: Timeouts, lmtp: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.timeouts = timeouts
        self.lmtp = lmtp
        self.chunking = True  # BDAT where the server offers CHUNKING ([main] chunking)
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.ehlo_name: str = ""
        self.server_name: str = ""  # the name the server gave in its EHLO reply
        self.peer_ip: str = ""
        self.messages_sent = 0

    @classmethod
    async def open(cls, ip: str, port: int, *, timeouts: Timeouts, lmtp: bool = False,
                   source_address: str | None = None) -> SmtpSession:
        """Connect and read the greeting.

        :raises SessionError: at stage ``connect`` or ``greeting``.
        """
        local = (source_address, 0) if source_address else None
        try:
            async with asyncio.timeout(timeouts.connect):
                reader, writer = await asyncio.open_connection(ip, port, local_addr=local,
                                                               limit=65536)
        except TimeoutError:
            raise SessionError(Stage.CONNECT, f"connection to [{ip}]:{port} timed out") from None
        except (OSError, OverflowError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SessionError(Stage.CONNECT, f"cannot connect to [{ip}]:{port}: {reason}"
                               ) from None
        session = cls(reader, writer, timeouts=timeouts, lmtp=lmtp)
        session.peer_ip = ip
        try:
            greeting = await session.read_reply(Stage.GREETING)
        except SessionError:
            session.abort()
            raise
        session.greeting = greeting
        if greeting.code != 220:
            await session.quit()
            raise SessionError(Stage.GREETING, f"server refused us: {greeting}", greeting)
        return session

    # -- replies and commands -----------------------------------------------------------

    async def read_reply(self, stage: Stage, timeout: float | None = None) -> Reply:
        code, lines = await self._read_lines(stage, timeout)
        return Reply(code, " ".join(lines).strip())

    async def _read_lines(self, stage: Stage, timeout: float | None = None
                          ) -> tuple[int, list[str]]:
        lines: list[str] = []
        try:
            async with asyncio.timeout(timeout or self.timeouts.command):
                while True:
                    raw = await self.reader.readline()
                    if not raw:
                        raise SessionError(stage, "connection closed by server")
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if (len(line) < 3 or not line[:3].isdigit()
                            or line[3:4] not in ("", " ", "-")):
                        raise SessionError(stage, f"malformed reply {line[:80]!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return int(line[:3]), lines
                    if len(lines) > MAX_REPLY_LINES:
                        raise SessionError(stage, "reply too long")
        except TimeoutError:
            raise SessionError(stage, "timeout waiting for the server") from None
        except (ConnectionError, ssl.SSLError, ValueError) as exc:
            raise SessionError(stage, f"connection lost: {exc}") from None

    async def _send(self, stage: Stage, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeouts.command):
                await self.writer.drain()
        except TimeoutError:
            raise SessionError(stage, "timeout sending to the server") from None
        except (ConnectionError, ssl.SSLError, RuntimeError) as exc:
            raise SessionError(stage, f"connection lost: {exc}") from None

    async def command(self, stage: Stage, line: str) -> Reply:
        """Send one command line (without its CRLF) and read the reply.

        :raises LocalArgumentError: the line holds CR, LF or NUL; nothing was sent.
        """
        verb = line.split(" ", 1)[0]
        _check_argument(stage, verb, "command", line)
        await self._send(stage, line.encode("utf-8") + b"\r\n")
        return await self.read_reply(stage)

    async def ehlo(self, name: str) -> None:
        """EHLO (LHLO for LMTP), falling back to HELO when EHLO is not understood.

        :raises SessionError: at stage ``ehlo``; :class:`LocalArgumentError` when ``name``
            holds CR, LF or NUL (nothing was sent).
        """
        verb = "LHLO" if self.lmtp else "EHLO"
        _check_argument(Stage.EHLO, verb, "name", name)
        self.ehlo_name = name
        reply, lines = await self._ehlo_lines(verb, name)
        if reply.code in (500, 502) and not self.lmtp:
            reply = await self.command(Stage.EHLO, f"HELO {name}")
            lines = []
        if reply.code != 250:
            raise SessionError(Stage.EHLO, f"EHLO refused: {reply}", reply)
        self.extensions = {}
        self.server_name = lines[0].split(" ", 1)[0] if lines and lines[0] else ""
        for line in lines[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params

    async def _ehlo_lines(self, verb: str, name: str) -> tuple[Reply, list[str]]:
        await self._send(Stage.EHLO, f"{verb} {name}\r\n".encode())
        code, lines = await self._read_lines(Stage.EHLO)
        return Reply(code, " ".join(lines)), lines

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """STARTTLS and the handshake, and nothing more: the caller checks the certificate
        and then says EHLO again (RFC 3207 4.2), or QUIT.

        :raises SessionError: ``starttls`` when refused, ``tls`` when the handshake fails
            (``error`` holds the :mod:`ssl` exception).
        """
        reply = await self.command(Stage.STARTTLS, "STARTTLS")
        if reply.code != 220:
            raise SessionError(Stage.STARTTLS, f"STARTTLS refused: {reply}", reply)
        try:
            async with asyncio.timeout(self.timeouts.command):
                await self.writer.start_tls(context, server_hostname=server_hostname)
        except TimeoutError:
            raise SessionError(Stage.TLS, "TLS handshake timed out") from None
        except ssl.SSLCertVerificationError as exc:
            raise SessionError(Stage.TLS, f"certificate verification failed: "
                                      f"{exc.verify_message or exc.reason}", error=exc
                               ) from None
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise SessionError(Stage.TLS, f"TLS handshake failed: {exc}", error=exc) from None

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self.writer.get_extra_info("ssl_object")

    @property
    def local_ip(self) -> str:
        sockname = self.writer.get_extra_info("sockname")
        return sockname[0] if sockname else ""

    @property
    def tls_version(self) -> str:
        ssl_object = self.ssl_object
        return (ssl_object.version() or "") if ssl_object is not None else ""

    @property
    def is_usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    # -- one transaction ----------------------------------------------------------------

    async def send(self, sender: str, recipients: list[str], message: bytes, *,
                   mail_params: Sequence[str] = (),
                   rcpt_params: Sequence[Sequence[str]] = ()) -> TransactionResult:
        """One transaction. Pipelined when the server offers PIPELINING (RFC 2920).

        Every argument is checked before the first byte is written. An address that holds
        CR, LF or NUL is refused here as a server refuses a bad address, and nothing of its
        command is sent: a sender with ``501 5.1.7`` (no MAIL at all, every recipient gets
        that reply), a recipient with ``501 5.1.3`` (the others go on). Such an address
        can never be sent, so it bounces rather than waits.

        :param rcpt_params: Parameters of each recipient's ``RCPT TO`` (DSN's ``NOTIFY``
            and ``ORCPT``), in order; none for a recipient past its end.
        :returns: the replies; a refusal of MAIL or of every recipient is a result, not an
            exception.
        :raises LocalArgumentError: a MAIL parameter holds CR, LF or NUL; nothing of the
            transaction was sent and the session is still usable.
        :raises SessionError: when the connection breaks or times out mid-transaction.
        """
        try:
            _check_argument(Stage.MAIL, "MAIL FROM", "address", sender, enhanced="5.1.7")
        except LocalArgumentError as exc:
            refusal = exc.refusal("bad sender address syntax")
            return TransactionResult(refusal, [refusal] * len(recipients))
        for param in mail_params:
            _check_argument(Stage.MAIL, "MAIL FROM", "parameter", param)
        for params in rcpt_params:
            for param in params:
                _check_argument(Stage.RCPT, "RCPT TO", "parameter", param)
        extra = [list(rcpt_params[i]) if i < len(rcpt_params) else []
                 for i in range(len(recipients))]
        refused: dict[int, Reply] = {}
        for index, recipient in enumerate(recipients):
            try:
                _check_argument(Stage.RCPT, "RCPT TO", "address", recipient, enhanced="5.1.3")
            except LocalArgumentError as exc:
                refused[index] = exc.refusal("bad recipient address syntax")
        if refused:
            sendable = [r for i, r in enumerate(recipients) if i not in refused]
            if not sendable:
                nothing = Reply(554, "5.5.1 no recipient address could be sent; "
                                     "MAIL FROM not sent", local=True)
                return TransactionResult(nothing, [refused[i] for i in range(len(recipients))])
            result = await self.send(sender, sendable, message, mail_params=mail_params,
                                     rcpt_params=[p for i, p in enumerate(extra)
                                                  if i not in refused])
            replies = iter(result.recipients)
            result.recipients = [refused[i] if i in refused else next(replies)
                                 for i in range(len(recipients))]
            return result
        mail_line = f"MAIL FROM:<{sender}>" + "".join(f" {p}" for p in mail_params)
        rcpt_lines = [f"RCPT TO:<{r}>" + "".join(f" {p}" for p in params)
                      for r, params in zip(recipients, extra, strict=True)]
        if self.chunking and self.supports("CHUNKING"):
            return await self._send_chunked(mail_line, rcpt_lines, canonical(message))
        if self.supports("PIPELINING"):
            batch = [mail_line, *rcpt_lines, "DATA"]
            await self._send(Stage.MAIL, "".join(f"{line}\r\n" for line in batch).encode())
            mail = await self.read_reply(Stage.MAIL)
            rcpt = [_rcpt_reply(await self.read_reply(Stage.RCPT)) for _ in recipients]
            data = await self.read_reply(Stage.DATA)
        else:
            mail = await self.command(Stage.MAIL, mail_line)
            if not mail.positive:
                return TransactionResult(mail, [mail] * len(recipients))
            rcpt = [_rcpt_reply(await self.command(Stage.RCPT, line)) for line in rcpt_lines]
            data = (await self.command(Stage.DATA, "DATA")
                    if any(r.positive for r in rcpt) else None)
        result = TransactionResult(mail)
        accepted = [i for i, r in enumerate(rcpt) if r.positive]
        if not mail.positive or not accepted:
            if data is not None and data.code == 354:
                # RFC 2920 3.1: the server took DATA anyway; end it with no content.
                await self._send(Stage.DATA, b".\r\n")
                await self.read_reply(Stage.DATA)
            await self.rset()
            result.recipients = [mail if not mail.positive else r for r in rcpt]
            return result
        assert data is not None
        if data.code != 354:
            result.recipients = [r if not r.positive else data for r in rcpt]
            await self.rset()
            return result
        await self._send(Stage.DATA, dot_stuff(message))
        return await self._end_of_message(result, rcpt, accepted)

    async def _send_chunked(self, mail_line: str, rcpt_lines: list[str], text: bytes
                            ) -> TransactionResult:
        """The transaction with ``BDAT <size> LAST`` (RFC 3030): no dot-stuffing, and with
        PIPELINING a message up to :data:`PIPELINED_CHUNK` goes in the same write as MAIL
        and RCPT, one round trip for the whole transaction. A larger one waits for the
        RCPT replies, so that it is not sent when no recipient is accepted."""
        chunk = f"BDAT {len(text)} LAST\r\n".encode() + text
        pipelining = self.supports("PIPELINING")
        sent = False
        if pipelining:
            head = "".join(f"{line}\r\n" for line in (mail_line, *rcpt_lines)).encode()
            sent = len(text) <= PIPELINED_CHUNK
            await self._send(Stage.MAIL, head + chunk if sent else head)
            mail = await self.read_reply(Stage.MAIL)
            rcpt = [_rcpt_reply(await self.read_reply(Stage.RCPT)) for _ in rcpt_lines]
        else:
            mail = await self.command(Stage.MAIL, mail_line)
            if not mail.positive:
                return TransactionResult(mail, [mail] * len(rcpt_lines))
            rcpt = [_rcpt_reply(await self.command(Stage.RCPT, line)) for line in rcpt_lines]
        result = TransactionResult(mail)
        accepted = [i for i, r in enumerate(rcpt) if r.positive]
        if not mail.positive or not accepted:
            if sent:
                await self.read_reply(Stage.DATA)  # the server's refusal of the chunk
            await self.rset()
            result.recipients = [mail if not mail.positive else r for r in rcpt]
            return result
        if not sent:
            await self._send(Stage.DATA, chunk)
        return await self._end_of_message(result, rcpt, accepted)

    async def _end_of_message(self, result: TransactionResult, rcpt: list[Reply],
                              accepted: list[int]) -> TransactionResult:
        """The replies to the message's end (DATA's dot, BDAT LAST): one for all, or with
        LMTP one per accepted recipient (RFC 2033 4.2)."""
        if self.lmtp:
            finals = {i: await self.read_reply(Stage.DATA, self.timeouts.data_done)
                      for i in accepted}
        else:
            done = await self.read_reply(Stage.DATA, self.timeouts.data_done)
            finals = dict.fromkeys(accepted, done)
        result.recipients = [finals.get(i, r) for i, r in enumerate(rcpt)]
        self.messages_sent += 1
        return result

    async def rset(self) -> None:
        try:
            await self.command(Stage.RSET, "RSET")
        except SessionError:
            self.abort()

    async def quit(self) -> None:
        """Say goodbye politely, then close; never raises."""
        try:
            if self.is_usable:
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(5):
                    await self.reader.readline()
        except (TimeoutError, ConnectionError, ssl.SSLError, RuntimeError):
            pass
        self.abort()

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
