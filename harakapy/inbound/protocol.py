"""The aiosmtpd bridge: one client connection, its SMTP dialogue, and the inbound hooks.

aiosmtpd keeps what it does well: the command loop, the 512/1000-octet line limits with
bounded buffers, STARTTLS on the live transport, and AUTH's challenge exchange. This class
replaces every command whose answer is a decision (HELO, EHLO, MAIL, RCPT, DATA, AUTH) so
that plugins decide it, every reply carries an enhanced status code, and the limits in
``config/smtp.ini`` hold. It does not know what plugins are loaded or how mail is queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import ssl
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, _AuthMechAttr, login_always_fail

from harakapy import dsn, metrics
from harakapy.inbound.address import (
    Address,
    AddressError,
    parse_params,
    parse_path,
    routes_through,
)
from harakapy.inbound.connection import Connection, TlsInfo, Transaction
from harakapy.inbound.data import MAX_TEXT_LINE, TERMINATOR, Chunks, decode, too_big
from harakapy.inbound.received import count_received, received_header
from harakapy.results import Action, Result, add_enhanced, format_reply, reply_for
from harakapy.spool.store import SpoolError, new_id
from harakapy.tls.context import describe

if TYPE_CHECKING:
    from harakapy.dispatch import HookCaller
    from harakapy.inbound.settings import InboundSettings

log = logging.getLogger("harakapy.inbound")

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
CHUNK_PIECE = 1 << 16  # a BDAT chunk is read in pieces this size, each under ``timeout``
# RFC 1870 (SIZE=), RFC 6152 (BODY=8BITMIME), RFC 6531 (SMTPUTF8), RFC 8689 (REQUIRETLS) and
# RFC 3461 (RET=, ENVID=) each let MAIL FROM grow by their parameter; RFC 3461 lets RCPT TO
# grow by NOTIFY= and ORCPT=.
MAX_MAIL_LINE = MAX_COMMAND_LINE + 26 + 14 + 10 + 11 + 9 + 7 + dsn.MAX_ENVID
MAX_RCPT_LINE = MAX_COMMAND_LINE + 30 + 7 + dsn.MAX_ORCPT


class InboundHost(Protocol):
    """What one inbound connection needs of the running server, and no more."""

    @property
    def settings(self) -> InboundSettings: ...

    @property
    def me(self) -> str: ...

    @property
    def tls_context(self) -> ssl.SSLContext | None: ...

    @property
    def plugins(self) -> HookCaller: ...

    @property
    def connections(self) -> set[SmtpProtocol]: ...

    @property
    def draining(self) -> bool: ...

    @property
    def offers_requiretls(self) -> bool:
        """Whether TLS sessions list ``REQUIRETLS`` (``config/requiretls.ini``)."""
        ...

    @property
    def queues_outbound(self) -> bool:
        """Whether relayed mail that no ``queue_outbound`` plugin takes goes to the
        outbound queue (:meth:`enqueue`)."""
        ...

    async def enqueue(self, transaction: Transaction) -> object: ...

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


class _Reader(asyncio.StreamReader):
    """A stream reader that survives asyncio's TLS transport being closed twice.

    A reader paused for a full buffer resumes its transport as that buffer is read. A TLS
    transport closed a second time (the client's QUIT and our close) has let go of its
    protocol, and resuming it raises AttributeError (CPython 3.11's sslproto); by then
    there is nothing left to resume.
    """

    def _maybe_resume_transport(self) -> None:
        try:
            super()._maybe_resume_transport()  # type: ignore[misc]
        except AttributeError:
            self._paused = False  # type: ignore[attr-defined]


class _NoHandler:
    """aiosmtpd wants a handler object; every decision here goes through plugins instead."""


_NO_HANDLER = _NoHandler()


class _Command:
    """One connection's ``smtp_*`` method behind the checks every command gets
    (:meth:`SmtpProtocol._run_command`)."""

    __slots__ = ("function", "protocol")

    def __init__(self, protocol: SmtpProtocol, function: Callable[..., Awaitable[None]]
                 ) -> None:
        self.protocol = protocol
        self.function = function

    def __call__(self, arg: Any) -> Awaitable[None]:
        return self.protocol._run_command(self.function, arg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.function, name)  # aiosmtpd's HELP reads __smtp_syntax__


class SmtpProtocol(SMTP):
    """One inbound connection.

    :param server: The running server: settings, plugins, TLS context, connection registry
        (:class:`InboundHost`).
    :param implicit_tls: Whether this listener wraps the socket in TLS before the greeting
        (port 465 style); STARTTLS is then not offered.
    """

    def __init__(self, server: InboundHost, *, implicit_tls: bool = False) -> None:
        settings = server.settings
        self._init_aiosmtpd(
            data_size_limit=settings.max_message_bytes,
            enable_smtputf8=settings.smtputf8,
            hostname=server.me,
            tls_context=None if implicit_tls else server.tls_context,
            timeout=settings.timeout,
        )
        # aiosmtpd keeps these limits in a class attribute that every EHLO grows; ours are
        # per connection and fixed. aiosmtpd measures lines without their CRLF.
        self.command_size_limit = MAX_COMMAND_LINE - 2  # before EHLO and after HELO
        self.command_size_limits = collections.defaultdict(
            lambda: MAX_COMMAND_LINE - 2, {"MAIL": MAX_MAIL_LINE - 2,
                                           "RCPT": MAX_RCPT_LINE - 2})
        self.server = server
        self.implicit_tls = implicit_tls
        self.connection: Connection | None = None
        self._busy = False
        self._auth_failures = 0
        self._implicit_handshake: asyncio.Future[None] | None = None
        self._replies: list[bytes] = []
        self._progress_check: asyncio.TimerHandle | None = None
        self._chunks: Chunks | None = None  # the BDAT message being received

    # -- plumbing around aiosmtpd ------------------------------------------------------

    def _init_aiosmtpd(self, *, data_size_limit: int, enable_smtputf8: bool, hostname: str,
                       tls_context: ssl.SSLContext | None, timeout: float) -> None:
        """The state ``SMTP.__init__`` sets up, for the options we use.

        aiosmtpd's own ``__init__`` finds the ``smtp_*`` and ``auth_*`` methods by
        introspecting each new connection (``inspect.getmembers``, ``dir``) and logs its
        AUTH mechanisms: about 0.3 ms per connection. Here the class is looked at once
        (:meth:`_commands`); tests/test_inbound_smtp.py checks that no attribute aiosmtpd
        sets is missing.
        """
        loop = asyncio.get_running_loop()
        self.__ident__ = "ESMTP harakapy"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, _Reader(limit=self.line_length_limit, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = _NO_HANDLER
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_smtputf8
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        # We decide ourselves, so that implicit-TLS listeners count as encrypted.
        self._auth_require_tls = False
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._handle_hooks: dict[str, Callable[..., Any]] = {}
        self._ehlo_hook_ver = None
        self._enforce_call_limit = False
        self._smtp_methods = {name: _Command(self, function)
                              for name, function in self._commands().items()}

    @classmethod
    @functools.cache
    def _commands(cls) -> dict[str, Callable[..., Awaitable[None]]]:
        """Each ``smtp_*`` method of the class by command name, as functions."""
        return {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}

    @classmethod
    @functools.cache
    def _mechanisms(cls) -> dict[str, str]:
        """Each ``auth_*`` method of the class by mechanism name, as aiosmtpd names them."""
        return {getattr(function, "__auth_mechanism_name__",
                        name.replace("auth_", "").replace("__", "-")): name
                for name, function in inspect.getmembers(cls) if name.startswith("auth_")}

    @functools.cached_property
    def _auth_methods(self) -> dict[str, _AuthMechAttr]:
        # aiosmtpd's smtp_AUTH calls these bound, with the protocol as first argument.
        return {mechanism: _AuthMechAttr(getattr(self, name), True)
                for mechanism, name in self._mechanisms().items()}

    async def _run_command(self, method: Callable[..., Awaitable[None]], arg: Any) -> None:
        """Every command: refuse NUL, mark the connection busy, close once idle when
        draining. Nothing more is done once the connection is closing: what the client
        pipelined after a command we hung up on is never acted on (a message queued
        after the client was told goodbye would be one it never heard a 250 for)."""
        if self.transport is None or self.transport.is_closing():
            return
        if arg is not None and "\x00" in arg:
            await self.push("501 5.5.2 NUL character not allowed")
            return
        self._busy = True
        try:
            await method(self, arg)
        finally:
            self._busy = False
        if self.server.draining and self._idle():
            await self._close_with("421 4.3.2 Service shutting down, closing connection")

    def _idle(self) -> bool:
        return not self._busy and (self.connection is None
                                   or self.connection.transaction is None)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = _printable(add_enhanced(status))
        await self._reply(status)

    async def _push_raw(self, status: str, *, flush: bool = False) -> None:
        await self._reply(status, flush=flush)

    async def _reply(self, status: str | bytes, *, flush: bool = False) -> None:
        """Queue one reply; send what is queued unless the client already sent its next
        command (RFC 2920: answer a pipelined batch in one write, as Postfix does)."""
        data = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii",
                             "replace") if isinstance(status, str) else status
        self._replies.append(data + b"\r\n")
        # A complete line waiting in the reader means the next read will not block, so a
        # success can ride along with the next reply. Anything else goes out at once:
        # aiosmtpd closes the connection right after some refusals, and after 221.
        if (not flush and data[:1] == b"2" and data[:3] not in (b"220", b"221")
                and b"\n" in self._reader._buffer):  # type: ignore[attr-defined]
            return
        replies, self._replies = b"".join(self._replies), []
        transport = self._writer.transport
        if transport is None or transport.is_closing():
            return  # the client is gone; nothing can be said to it
        try:
            self._writer.write(replies)
        except AttributeError:
            # asyncio's TLS transport once its connection was lost (the client dropped
            # the TLS session) has no protocol left to write through: the client is
            # gone, as above.
            return
        await self._writer.drain()

    async def _close_with(self, reply: str) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._push_raw(reply, flush=True)
        if self.transport is not None:
            self.transport.close()

    def begin_drain(self) -> None:
        """SIGTERM: close at once if idle; otherwise after the transaction in flight."""
        if self._idle() and self.transport is not None:
            self.transport.write(b"421 4.3.2 Service shutting down, closing connection\r\n")
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: tell the client why before closing (aiosmtpd just closes).
        if self.transport is not None and not self.transport.is_closing():
            log.info("%s timeout after %.0fs idle", self._cid, self._timeout_duration)
            self.transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                                 .encode())
        super()._timeout_cb()

    async def handle_exception(self, error: Exception) -> str:
        log.error("%s internal error", self._cid, exc_info=error)
        return "451 4.3.0 Internal error, please try again later"

    @property
    def _cid(self) -> str:
        return self.connection.id if self.connection is not None else "-"

    async def _handle_client(self) -> None:
        server = self.server
        transport = self.transport
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.connection = connection = Connection(
            new_id(), _plain_ip(peer[0]), peer[1], _plain_ip(sock[0]), sock[1])
        server.connections.add(self)
        try:
            log.info("%s connect from [%s]:%d to port %d%s", connection.id,
                     connection.remote_ip, connection.remote_port, connection.local_port,
                     " (TLS)" if connection.tls else "")
            if len(server.connections) > server.settings.max_connections:
                log.warning("%s refused: %d connections open (max_connections)",
                            connection.id, len(server.connections) - 1)
                metrics.connection("too_many")
                await self._close_with("421 4.3.2 Too many connections, try again later")
                return
            if server.draining:
                metrics.connection("shutting_down")
                await self._close_with("421 4.3.2 Service shutting down")
                return
            if self._implicit_handshake is not None and not await self._finish_tls(
                    self._implicit_handshake):
                return
            result = await server.plugins.call_first("connect", connection=connection)
            if isinstance(result, Result) and not result.is_ok:
                # RFC 5321 3.1: a refused connection hears 554 (or 421) instead of 220.
                code = result.code or (421 if result.action is Action.DENYSOFT else 554)
                reply = format_reply(code, result.message or "Connection refused",
                                     result.enhanced or "5.7.1")
                log.info("%s connect refused: %s", connection.id, reply)
                metrics.connection("refused")
                await self._close_with(reply)
                return
            metrics.connection("accepted")
            await super()._handle_client()
        finally:
            server.connections.discard(self)
            server.spawn(self._disconnected(connection))

    async def _disconnected(self, connection: Connection) -> None:
        log.info("%s disconnect after %.3fs, %d transaction(s)", connection.id,
                 time.time() - connection.started, connection.transaction_count)
        await self.server.plugins.call_all("disconnect", connection=connection)

    def _record_tls(self) -> None:
        assert self.connection is not None and self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.connection.tls = TlsInfo(*describe(ssl_object))

    async def _decide(self, hook: str, *, default_message: str, default_enhanced: str,
                      ok_reply: str | None, quiet: bool = False, **kwargs: object
                      ) -> Result | None:
        """Ask ``hook``; push its refusal (closing on DENYDISCONNECT) and return it, or
        push ``ok_reply`` (when given) and return ``None``.

        :param quiet: Return a refusal without answering: the caller answers later (BDAT
            reads its chunk first).
        """
        plugins = self.server.plugins
        # Most of these hooks have no plugin at all: then there is nothing to call.
        result = await plugins.call_first(
            hook, connection=self.connection, **kwargs) if plugins.has(hook) else None
        if isinstance(result, Result) and not result.is_ok:
            reply = reply_for(result, default_message=default_message,
                              default_enhanced=default_enhanced)
            log.info("%s %s refused: %s", self._cid, hook, reply.replace("\r\n", " / "))
            if quiet:
                return result
            if result.disconnects:
                await self._close_with(reply)
            else:
                await self._push_raw(reply)
            return result
        if ok_reply is not None:
            if isinstance(result, Result) and result.message:
                ok_reply = reply_for(result, default_message="",
                                     default_enhanced=ok_reply.split()[1])
            await self._push_raw(ok_reply)
        return None

    # -- commands ----------------------------------------------------------------------

    async def smtp_HELO(self, hostname: str | None) -> None:
        await self._greet(hostname, esmtp=False)

    async def smtp_EHLO(self, hostname: str | None) -> None:
        await self._greet(hostname, esmtp=True)

    async def _greet(self, hostname: str | None, *, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return
        connection = self.connection
        assert connection is not None
        hostname = hostname.strip()
        result = await self.server.plugins.call_first(
            verb.lower(), connection=connection, hostname=hostname)
        if isinstance(result, Result) and not result.is_ok:
            reply = reply_for(result, default_message=f"{verb} refused",
                              default_enhanced="5.7.1")
            log.info("%s %s refused: %s", connection.id, verb, reply)
            if result.disconnects:
                await self._close_with(reply)
            else:
                await self._push_raw(reply)
            return
        # RFC 5321 4.1.4: HELO/EHLO resets any transaction in progress.
        connection.transaction = None
        self._set_rset_state()
        connection.helo, connection.esmtp = hostname, esmtp
        self.session.host_name = hostname
        self.session.extended_smtp = esmtp
        if not esmtp:
            await self._push_raw(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME"]
        if self.enable_SMTPUTF8:
            lines.append("SMTPUTF8")
        lines += ["DSN", "ENHANCEDSTATUSCODES", "CHUNKING"]
        if self.tls_context is not None and connection.tls is None:
            lines.append("STARTTLS")
        if connection.tls is not None and self.server.plugins.has("auth"):
            lines.append("AUTH PLAIN LOGIN")
        if connection.tls is not None and self.server.offers_requiretls:
            # RFC 8689 2: only on a session that TLS protects.
            lines.append("REQUIRETLS")
        await self._push_raw("\r\n".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        assert self.connection is not None
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.connection.tls is not None:
            await self.push("454 4.7.0 TLS not available")
            return
        await self._push_raw("220 2.0.0 Ready to start TLS", flush=True)
        await self._finish_tls(self._begin_tls(self.tls_context))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self.implicit_tls:
            # Synchronously, before any data_received(): the client's ClientHello may be
            # in the very first read.
            self._implicit_handshake = self._begin_tls(self.server.tls_context)

    def _begin_tls(self, context: ssl.SSLContext | None) -> asyncio.Future[None]:
        """Put TLS on the live connection; the future completes with the handshake.

        aiosmtpd's STARTTLS, minus its own 220: its connection_made() then discards any
        plaintext pipelined after the command (RFC 3207 4.2, the command-injection
        attack). Implicit-TLS listeners use it too, with the context current at connect
        time, so that a certificate renewed and reloaded with SIGHUP reaches them as well.
        """
        from asyncio import sslproto

        waiter = self.loop.create_future()
        if context is None:
            waiter.set_exception(ssl.SSLError("no TLS context"))
            return waiter
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, context, waiter,
                                                  server_side=True,
                                                  ssl_handshake_timeout=self._timeout_duration)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        return waiter

    async def _finish_tls(self, waiter: asyncio.Future[None]) -> bool:
        """Wait for the handshake; whether it succeeded (a failure closes the connection)."""
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("%s TLS handshake failed: %s", self._cid, exc)
            if self._original_transport is not None:
                self._original_transport.close()
            elif self.transport is not None:
                self.transport.close()
            return False
        connection = self.connection
        assert connection is not None
        # RFC 3207 4.2: forget everything learnt before TLS.
        connection.helo, connection.esmtp, connection.transaction = None, False, None
        self._record_tls()
        if connection.tls is not None:
            log.info("%s TLS %s %s", connection.id, connection.tls.version,
                     connection.tls.cipher)
        return True

    async def smtp_AUTH(self, arg: str | None) -> None:
        connection = self.connection
        assert connection is not None
        if not self.server.plugins.has("auth"):
            await self.push("502 5.5.1 AUTH not available")
            return
        if connection.tls is None:
            await self.push("538 5.7.11 Encryption required for requested "
                            "authentication mechanism")
            return
        if connection.transaction is not None:
            await self.push("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        await super().smtp_AUTH(arg)
        if self.session.authenticated:
            return
        if self.transport is not None and arg and arg.split()[0].upper() in ("PLAIN", "LOGIN"):
            self._auth_failures += 1
            if self._auth_failures >= self.server.settings.max_auth_failures:
                log.warning("%s closing after %d failed AUTH attempts", connection.id,
                            self._auth_failures)
                await self._close_with("421 4.7.0 Too many failed authentication attempts")

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split PLAIN credentials")
            return AuthResult(success=False, handled=True)
        return await self._check_credentials("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await self.challenge_auth("Username:")
        else:
            try:
                user = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(user, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_credentials("LOGIN", user, password)

    async def _check_credentials(self, mechanism: str, user_bytes: bytes,
                                 password_bytes: bytes) -> AuthResult:
        connection = self.connection
        assert connection is not None
        try:
            user, password = user_bytes.decode(), password_bytes.decode()
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 Credentials are not UTF-8")
        result = await self.server.plugins.call_first(
            "auth", connection=connection, mechanism=mechanism, user=user, password=password)
        if isinstance(result, Result) and result.is_ok:
            connection.auth_user = user
            connection.relaying = True  # as Haraka: an authenticated client may relay
            log.info("%s AUTH %s user=%s ok", connection.id, mechanism, user)
            return AuthResult(success=True, auth_data=user,
                              message="235 2.7.0 Authentication successful")
        if result is None:
            result = Result(Action.DENY)
        # RFC 4954: 454 4.7.0 for a temporary failure, 535 5.7.8 for bad credentials.
        code = result.code or (454 if result.action is Action.DENYSOFT else 535)
        reply = format_reply(code, result.message or (
            "Temporary authentication failure" if code < 500
            else "Authentication credentials invalid"),
            result.enhanced or ("4.7.0" if code < 500 else "5.7.8"))
        log.info("%s AUTH %s user=%s refused: %s", connection.id, mechanism, user, reply)
        if result.disconnects:
            await self._close_with(reply)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=reply)

    async def smtp_MAIL(self, arg: str | None) -> None:
        connection = self.connection
        assert connection is not None
        if connection.helo is None:
            await self.push("503 5.5.1 Send HELO/EHLO first")
            return
        if connection.transaction is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        parsed = await self._read_path(arg, "MAIL FROM:", allow_null=True, smtputf8=False)
        if parsed is None:
            return
        sender, params = parsed
        problem = self._check_mail_params(params)
        if problem is not None:
            await self.push(problem)
            return
        transaction = connection.start_transaction(sender, params)
        refused = await self._decide("mail", transaction=transaction, sender=sender,
                                     params=params, default_message="Sender refused",
                                     default_enhanced="5.7.1", ok_reply="250 2.1.0 Ok")
        if refused is not None:
            connection.transaction = None

    def _postmaster(self, arg: str | None) -> tuple[Address, dict[str, str | bool]] | None:
        """``RCPT TO:<postmaster>`` in any case (RFC 5321 4.5.1), as the address of
        ``[main] postmaster``; ``None`` for any other recipient."""
        text = _after_keyword(arg, "TO:")
        if text is None or text[:12].lower() != "<postmaster>" or text[12:13] not in ("", " "):
            return None
        try:
            params = parse_params(text[12:]) if self.connection and self.connection.esmtp \
                else {}
        except AddressError:
            return None  # the normal parse says what is wrong
        target = self.server.settings.postmaster or f"postmaster@{self.hostname}"
        local, _, domain = target.rpartition("@")
        return Address(local, domain.lower()), params

    async def _read_path(self, arg: str | None, command: str, *, allow_null: bool,
                         smtputf8: bool) -> tuple[Address, dict[str, str | bool]] | None:
        """The path and parameters of MAIL or RCPT, or ``None`` after replying 501."""
        assert self.connection is not None
        esmtp = self.connection.esmtp
        text = _after_keyword(arg, command.split()[1])
        if text is None:
            await self.push(f"501 5.5.4 Syntax: {command}<address>")
            return None
        try:
            params = parse_params(text.partition(">")[2]) if esmtp else {}
            address, rest = parse_path(text, allow_null=allow_null,
                                       smtputf8=smtputf8 or bool(params.get("SMTPUTF8")))
            if rest and not esmtp:
                raise AddressError("parameters need EHLO")
        except AddressError as exc:
            await self.push(f"501 5.5.4 {exc}")
            return None
        return address, params

    def _check_mail_params(self, params: dict[str, str | bool]) -> str | None:
        for name, value in params.items():
            if name == "SIZE":
                if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
                    return "501 5.5.4 SIZE needs a number"
                if int(value) > self.data_size_limit:
                    return ("552 5.3.4 Message size exceeds fixed maximum message size "
                            f"({self.data_size_limit} bytes)")
            elif name == "BODY":
                if not isinstance(value, str) or value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
            elif name == "SMTPUTF8":
                if value is not True:
                    return "501 5.5.4 SMTPUTF8 takes no value"
                if not self.enable_SMTPUTF8:
                    return "555 5.5.4 SMTPUTF8 not supported"
            elif name == "AUTH":
                # RFC 4954 5: the identity that submitted the message, for servers that
                # trust the client's word on it; we do not, and keep nothing of it.
                if not isinstance(value, str) or not dsn.is_xtext(value):
                    return "501 5.5.4 AUTH= must be xtext or <>"
            elif name in ("RET", "ENVID"):
                problem = dsn.check_mail_param(name, value)
                if problem is not None:
                    return problem
            elif name == "REQUIRETLS":
                problem = self._check_requiretls(value)
                if problem is not None:
                    return problem
            else:
                return f"555 5.5.4 MAIL parameter {name} not supported"
        return None

    def _check_requiretls(self, value: str | bool) -> str | None:
        """RFC 8689 2: the parameter needs a TLS session. Without one it was not offered;
        the reply says what the sender can do about it rather than "unknown parameter"."""
        assert self.connection is not None
        if value is not True:
            return "501 5.5.4 REQUIRETLS takes no value"
        if not self.server.offers_requiretls:
            return "555 5.5.4 MAIL parameter REQUIRETLS not supported"
        if self.connection.tls is None:
            return "530 5.7.10 REQUIRETLS needs a TLS session: STARTTLS first"
        return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        connection = self.connection
        assert connection is not None
        transaction = connection.transaction
        if transaction is None:
            await self.push("503 5.5.1 Need MAIL command")
            return
        postmaster = self._postmaster(arg)
        parsed = postmaster or await self._read_path(arg, "RCPT TO:", allow_null=False,
                                                     smtputf8=transaction.smtputf8)
        if parsed is None:
            return
        recipient, params = parsed
        for name, value in params.items():
            problem = (dsn.check_rcpt_param(name, value) if name in ("NOTIFY", "ORCPT")
                       else f"555 5.5.4 RCPT parameter {name} not supported")
            if problem is not None:
                await self.push(problem)
                return
        if len(transaction.recipients) >= self.server.settings.max_recipients:
            await self.push("452 4.5.3 Too many recipients")
            return
        if postmaster is not None:
            # RFC 5321 4.5.1: accepted from anyone, whatever the plugins would say.
            transaction.add_recipient(recipient, params)
            log.info("%s rcpt <postmaster> accepted as %s", connection.id, recipient)
            await self._push_raw("250 2.1.5 Ok")
            return
        if routes_through(recipient) and not connection.relaying and \
                not self.server.settings.allow_untrusted_routing:
            log.info("%s rcpt %s refused: sender-specified routing", connection.id, recipient)
            await self.push("550 5.7.1 Sender-specified routing is not allowed "
                            "(allow_untrusted_routing)")
            return
        result = await self.server.plugins.call_first(
            "rcpt", connection=connection, transaction=transaction, recipient=recipient,
            params=params)
        if isinstance(result, Result) and result.is_ok:
            transaction.add_recipient(recipient, params)
            await self._push_raw(reply_for(result, default_message="Ok",
                                           default_enhanced="2.1.5"))
            return
        if result is None:
            # No plugin took this recipient: never an open relay by omission.
            result = Result(action=Action.DENY, message="Relaying denied",
                            enhanced="5.7.1")
        reply = reply_for(result, default_message="Recipient refused", default_enhanced="5.7.1")
        log.info("%s rcpt %s refused: %s", connection.id, recipient, reply)
        if result.disconnects:
            await self._close_with(reply)
        else:
            await self._push_raw(reply)

    def _set_rset_state(self) -> None:
        self._chunks = None  # RSET and EHLO drop a BDAT message half sent
        super()._set_rset_state()

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        assert self.connection is not None
        self.connection.transaction = None
        self._set_rset_state()
        await self.push("250 2.0.0 Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        connection = self.connection
        assert connection is not None
        transaction = connection.transaction
        if transaction is None:
            await self.push("503 5.5.1 Need MAIL command")
            return
        if self._chunks is not None:
            # RFC 3030 2: a message sent with BDAT is finished with BDAT.
            await self.push("503 5.5.1 DATA after BDAT; finish with BDAT LAST or RSET")
            return
        if not transaction.recipients:
            # RFC 2920 3.1: with pipelining, DATA after only refused recipients is 554.
            await self.push("554 5.5.1 No valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if await self._decide("data", transaction=transaction, default_message="Data refused",
                              default_enhanced="5.7.1", ok_reply=None) is not None:
            connection.transaction = None
            return
        await self._push_raw("354 End data with <CR><LF>.<CR><LF>", flush=True)
        try:
            async with asyncio.timeout(self.server.settings.data_timeout):
                content, problem = await self._read_data()
        except TimeoutError:
            log.info("%s DATA not finished within data_timeout", connection.id)
            await self._close_with("421 4.4.2 Timeout while receiving data, closing")
            return
        await self._complete(transaction, content, problem)

    async def _complete(self, transaction: Transaction, content: bytes,
                        problem: str | None) -> None:
        """The message has arrived (DATA's final dot, BDAT LAST): refuse it, or queue it."""
        connection = self.connection
        assert connection is not None
        if problem is None and count_received(content) >= self.server.settings.max_hops:
            # RFC 5321 6.3: a message that went round this often is in a mail loop.
            problem = "554 5.4.6 Too many hops (Received: headers), mail loop?"
        if problem is not None:
            connection.transaction = None
            log.info("%s message refused: %s", connection.id, problem)
            metrics.transaction(problem)
            await self.push(problem)
            return
        transaction.message = received_header(connection, transaction, self.hostname) + content
        await self._finish(transaction)

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING: ``BDAT <size> [LAST]``, then exactly ``size`` octets.

        The octets are read whatever the answer will be, so that none of them is taken
        for a command. A size that does not parse leaves no way to know where the chunk
        ends: the connection is closed.
        """
        connection = self.connection
        assert connection is not None
        words = (arg or "").split()
        if not (1 <= len(words) <= 2 and words[0].isdigit() and words[0].isascii()
                and len(words[0]) <= 12 and (len(words) == 1 or words[1].upper() == "LAST")):
            await self._close_with("501 5.5.4 Syntax: BDAT chunk-size [LAST]; closing")
            return
        size, last = int(words[0]), len(words) == 2
        transaction = connection.transaction
        refusal = None
        if transaction is None:
            refusal = "503 5.5.1 Need MAIL command"
        elif not transaction.recipients:
            refusal = "554 5.5.1 No valid recipients"
        elif self._chunks is None:
            result = await self._decide("data", transaction=transaction,
                                        default_message="Data refused",
                                        default_enhanced="5.7.1", ok_reply=None,
                                        quiet=True)
            if result is not None:
                refusal = reply_for(result, default_message="Data refused",
                                    default_enhanced="5.7.1")
                if result.disconnects:
                    await self._close_with(refusal)
                    return
                connection.transaction = None
            else:
                self._chunks = Chunks(self.data_size_limit, time.monotonic())
        chunks = self._chunks if refusal is None else None
        try:
            await self._read_chunk(size, chunks)
        except TimeoutError:
            log.info("%s BDAT chunk not received within timeout", connection.id)
            await self._close_with("421 4.4.2 Timeout while receiving data, closing")
            return
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("client closed the connection in BDAT") from None
        if refusal is not None:
            log.info("%s BDAT refused: %s", connection.id, refusal)
            await self.push(refusal)
            return
        assert chunks is not None and transaction is not None
        if time.monotonic() - chunks.started > self.server.settings.data_timeout:
            self._chunks = None
            log.info("%s BDAT not finished within data_timeout", connection.id)
            await self._close_with("421 4.4.2 Timeout while receiving data, closing")
            return
        if not last:
            await self._push_raw(f"250 2.0.0 {size} octets received")
            return
        self._chunks = None
        content, problem = chunks.message()
        await self._complete(transaction, content, problem)

    async def _read_chunk(self, size: int, chunks: Chunks | None) -> None:
        """Read ``size`` octets into ``chunks`` (or throw them away): ``timeout`` without
        progress raises :class:`TimeoutError`. Memory stays bounded: past the message
        limit, octets are dropped as they come."""
        left = size
        while left:
            async with asyncio.timeout(self._timeout_duration):
                piece = await self._reader.readexactly(min(left, CHUNK_PIECE))
            self._reset_timeout()
            left -= len(piece)
            if chunks is not None:
                chunks.add(piece)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read message text up to the final dot; return it decoded, or a reply saying why
        it is refused (sent only after the dot, RFC 5321 4.2.5).

        The reader's search runs in one piece over its buffer. Memory stays bounded by
        ``max_message_bytes``: beyond it, the text is read and thrown away until the dot.
        Waiting is bounded by ``timeout`` without progress (and by ``data_timeout`` in all,
        around this call).
        """
        reader = self._reader
        limit = self.data_size_limit
        # Private StreamReader fields, as aiosmtpd itself uses them: a CRLF put in front
        # lets "CRLF.CRLF" also find an empty message, and the search limit is raised from
        # the 1001-byte command limit to the message limit for this one read.
        reader._buffer[0:0] = b"\r\n"  # type: ignore[attr-defined]
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = limit + 2 * MAX_TEXT_LINE  # type: ignore[attr-defined]
        too_much = False
        try:
            while True:
                try:
                    if TERMINATOR in reader._buffer:  # type: ignore[attr-defined]
                        raw = await reader.readuntil(TERMINATOR)  # all here: no waiting
                    else:
                        raw = await self._read_while_sending()
                except asyncio.LimitOverrunError as exc:
                    await reader.readexactly(exc.consumed)  # over the limit: drop it
                    too_much = True
                    continue
                except asyncio.IncompleteReadError:
                    raise ConnectionResetError("client closed the connection in DATA"
                                               ) from None
                break
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if too_much:
            return b"", too_big(limit)
        return decode(raw[2:-3], limit)

    async def _read_while_sending(self) -> bytes:
        """``readuntil(TERMINATOR)`` while the client keeps sending; ``timeout`` without
        progress ends it with :class:`TimeoutError`.

        Progress is looked at twice per timeout from a timer (it also resets aiosmtpd's
        idle timer before that fires), not from a second task: a task and ``wait()`` per
        message cost more than the rest of the DATA read.
        """
        idle = self._timeout_duration
        async with asyncio.timeout(idle) as deadline:
            self._progress_check = self.loop.call_later(
                idle / 2, self._check_progress, deadline,
                len(self._reader._buffer))  # type: ignore[attr-defined]
            try:
                return await self._reader.readuntil(TERMINATOR)
            finally:
                self._progress_check.cancel()

    def _check_progress(self, deadline: asyncio.Timeout, seen: int) -> None:
        buffered = len(self._reader._buffer)  # type: ignore[attr-defined]
        if buffered != seen:
            deadline.reschedule(self.loop.time() + self._timeout_duration)
            self._reset_timeout()
        self._progress_check = self.loop.call_later(
            self._timeout_duration / 2, self._check_progress, deadline, buffered)

    async def _queue_outbound(self, transaction: Transaction) -> Result:
        """The core outbound queue: store durably, then 250 (never 250 before fsync)."""
        try:
            await self.server.enqueue(transaction)
        except SpoolError as exc:
            log.error("%s cannot queue %s: %s", self._cid, transaction.id, exc)
            return Result(Action.DENYSOFT, "Cannot queue the message now; try again later",
                          enhanced="4.3.0")
        return Result(Action.OK)

    async def _finish(self, transaction: Transaction) -> None:
        connection = self.connection
        assert connection is not None
        try:
            refused = await self._decide("data_post", transaction=transaction,
                                         default_message="Message refused",
                                         default_enhanced="5.7.1", ok_reply=None)
            if refused is not None:
                metrics.transaction(str(refused.code or (
                    4 if refused.action is Action.DENYSOFT else 5)))
                return
            hook = "queue_outbound" if connection.relaying else "queue"
            plugins = self.server.plugins
            result = await plugins.call_first(
                hook, connection=connection, transaction=transaction
            ) if plugins.has(hook) else None
            if result is None and hook == "queue_outbound" and self.server.queues_outbound:
                result = await self._queue_outbound(transaction)
            if isinstance(result, Result) and result.is_ok:
                reply = format_reply(250, result.message or f"Ok: queued as {transaction.id}",
                                     result.enhanced or "2.0.0")
                if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call
                    log.info("%s queued id=%s from=%s to=%s size=%d via=%s", connection.id,
                             transaction.id, transaction.sender, ",".join(
                                 str(r) for r in transaction.recipients),
                             len(transaction.message or b""), hook)
                metrics.transaction(reply)
                await self._push_raw(reply)
                return
            if result is None:
                what = ("Outbound delivery is not available" if hook == "queue_outbound"
                        else "No queue plugin accepted the message")
                result = Result(action=Action.DENYSOFT, message=f"{what}; try again later",
                                enhanced="4.3.2")
            reply = reply_for(result, default_message="Message not queued",
                              default_enhanced="5.3.0")
            log.info("%s %s refused id=%s: %s", connection.id, hook, transaction.id, reply)
            metrics.transaction(reply)
            if result.disconnects:
                await self._close_with(reply)
            else:
                await self._push_raw(reply)
        finally:
            connection.transaction = None
            self._set_post_data_state()


def _after_keyword(arg: str | None, keyword: str) -> str | None:
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _plain_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _printable(reply: str) -> str:
    # Replies may quote the client (an unknown verb, a bad address): never echo control
    # characters or undecodable bytes (lone surrogates are not printable) back.
    if reply.isprintable():
        return reply
    return "".join(c if c.isprintable() else "?" for c in reply)
