"""One delivery attempt: the recipients of one message in one domain, tried at each host in
turn, and what became of each recipient.

The connection step (:meth:`Delivery.open_session`) is the one place a session is opened,
greeted and encrypted, and it encrypts only through :class:`~harakapy.outbound.negotiate.
Negotiator`, which enforces the destination's TLS policy. This module does not schedule,
write the spool or call hooks: the queue runner does, with the :class:`Outcome` returned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field

from harakapy.dns import DnsError, NoSuchDomain, Resolver
from harakapy.dsn import DsnRequest
from harakapy.outbound.client import Reply, SessionError, SmtpSession, Stage
from harakapy.outbound.downgrade import to_7bit
from harakapy.outbound.mx import MxHost
from harakapy.outbound.negotiate import HostPlan, Negotiator, TlsFailure
from harakapy.outbound.settings import OutboundSettings
from harakapy.outbound.tls_policy import Route
from harakapy.spool.store import RecipientState
from harakapy.tls.results import Failure

log = logging.getLogger("harakapy.outbound")


@dataclass(slots=True)
class RecipientResult:
    """What happened to one recipient in this attempt."""

    index: int
    state: RecipientState  # delivered, deferred or bounced
    reply: str
    enhanced: str
    mx: str = ""
    remote: bool = False
    dsn_passed: bool = False  # delivered to a server that took our DSN parameters
    final: bool = False  # delivered into a mailbox (LMTP), not relayed on


@dataclass(slots=True)
class Outcome:
    """:ivar errors: Per-host failures, for logs and DSNs.
    :ivar tls_status: The RFC 3463 status of the last TLS policy failure (``4.7.5``), when
        one kept the mail from a host: a deferral and an expiry say so.
    :ivar tls_failure: That failure.
    """

    results: list[RecipientResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tls_status: str = ""
    tls_failure: Failure | None = None
    requiretls_why: str = ""  # why REQUIRETLS could not be met, when not from a session
    requiretls_met: bool = False  # delivered under a REQUIRETLS policy
    requiretls_exempt: bool = False  # a REQUIRETLS message routed to this machine
    seven_bit: bytes | None = None  # the message made 7-bit, once; b"" when it cannot be
    contacted: bool = False  # some host answered (greeted, or refused us politely)
    tried: bool = False  # some connection was attempted

    @property
    def unreachable(self) -> bool:
        """Connections were tried and none got an answer: the destination is down."""
        return self.tried and not self.contacted and not self.results


def _enhanced(reply: Reply, default: str) -> str:
    return reply.enhanced or default


class ConnectionPool:
    """Idle sessions kept for reuse, keyed by host, address, port, protocol and TLS state.

    A session opened under one TLS policy is never handed to a delivery under another: the
    key carries the policy's :attr:`~harakapy.outbound.negotiate.HostPlan.session_key`.
    """

    def __init__(self, settings: OutboundSettings, loop_time) -> None:
        self.settings = settings
        self._time = loop_time
        self._idle: dict[tuple, list[tuple[float, SmtpSession]]] = {}

    def take(self, key: tuple) -> SmtpSession | None:
        sessions = self._idle.get(key)
        now = self._time()
        while sessions:
            since, session = sessions.pop()
            if now - since <= self.settings.idle_timeout and session.is_usable:
                return session
            session.abort()
        return None

    async def give_back(self, key: tuple, session: SmtpSession) -> None:
        if (not self.settings.connection_reuse or not session.is_usable
                or session.messages_sent >= self.settings.max_messages_per_connection):
            await session.quit()
            return
        self._idle.setdefault(key, []).append((self._time(), session))

    async def expire(self) -> None:
        """Close sessions idle longer than ``idle_timeout``."""
        now = self._time()
        for key in list(self._idle):
            keep = []
            for since, session in self._idle[key]:
                if now - since > self.settings.idle_timeout or not session.is_usable:
                    await session.quit()
                else:
                    keep.append((since, session))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close(self) -> None:
        for sessions in self._idle.values():
            for _since, session in sessions:
                await session.quit()
        self._idle.clear()


class Delivery:
    """Delivers messages to hosts; one per queue runner (it owns the connection pool)."""

    def __init__(self, settings: OutboundSettings, resolver: Resolver, me: str,
                 tls: Negotiator) -> None:
        self.settings = settings
        self.resolver = resolver
        self.me = me
        self.tls = tls
        self.pool = ConnectionPool(settings, asyncio.get_running_loop().time)

    async def addresses(self, host: MxHost) -> list[str]:
        """The IPs for ``host``: itself when it is an IP literal, else A/AAAA.

        :raises DnsError: when the lookup fails (NoSuchDomain when the name is gone).
        """
        literal = host.hostname.strip("[]")
        try:
            return [str(ipaddress.ip_address(literal))]
        except ValueError:
            pass
        return await self.resolver.addresses(host.hostname, ipv4=self.settings.ipv4,
                                             ipv6=self.settings.ipv6)

    async def open_session(self, plan: HostPlan, ip: str, *, reuse: bool = True
                           ) -> tuple[SmtpSession, tuple, bool]:
        """Connect, EHLO, and TLS as ``plan`` demands: the one connection step.

        :param reuse: Take an idle session from the pool when there is one.
        :returns: the session, its pool key, and whether it came from the pool.
        :raises SessionError: the host cannot be used now (:class:`TlsFailure` when it did
            not meet the TLS policy: nothing but EHLO, STARTTLS and QUIT was sent).
        """
        host = plan.host
        # The settings too: after a reload that changed ca_file, no session verified
        # against the old CAs is reused.
        key = (host.hostname, ip, host.port, host.lmtp, plan.session_key, self.tls.settings)
        pooled = self.pool.take(key) if reuse else None
        if pooled is not None:
            return pooled, key, True

        async def connect() -> SmtpSession:
            session = await SmtpSession.open(ip, host.port, timeouts=self.settings.timeouts,
                                             lmtp=host.lmtp,
                                             source_address=self.settings.local_address)
            session.chunking = self.settings.chunking
            try:
                await session.ehlo(self.me)
            except SessionError:
                session.abort()
                raise
            return session

        session = await connect()
        try:
            session = await self.tls.secure(session, plan, connect)
        except SessionError:
            session.abort()
            raise
        return session, key, False

    async def attempt(self, routes: list[Route], sender: str, recipients: list[str],
                      message: bytes, *, smtputf8: bool, dsn: DsnRequest | None = None
                      ) -> Outcome:
        """Try the hosts in order, each under its TLS policy, until one takes a decision
        on every recipient.

        A host that fails the TLS policy, cannot be reached, greets badly, fails EHLO,
        refuses MAIL with 4xx, drops the line, or cannot carry this message (no 8BITMIME,
        SMTPUTF8, too small a SIZE) is skipped for the next. Per-recipient replies are final
        for this attempt (2xx delivered, 4xx deferred, 5xx bounced). When no host decided,
        the recipients bounce only if every failure was permanent (no such host, no address,
        no host can carry the message); otherwise they wait for a retry.
        """
        outcome = Outcome()
        eight_bit = not message.isascii()
        head = message.split(b"\r\n\r\n", 1)[0]
        # RFC 6531: a message needs SMTPUTF8 only if its envelope or header is UTF-8.
        needs_utf8 = smtputf8 and (not sender.isascii() or not head.isascii()
                                   or any(not r.isascii() for r in recipients))
        temporary = False
        capability: tuple[str, str] | None = None
        for route in routes:
            host = route.host
            try:
                plan = await self.tls.plan(route.policy, host, route.nexthop)
            except TlsFailure as exc:
                outcome.errors.append(f"{host.hostname}: {exc.status} {exc.reason}")
                outcome.tls_status, outcome.tls_failure = exc.status, exc.failure
                if exc.final:
                    capability = exc.status, f"{host.hostname}: {exc.reason}"
                else:
                    temporary = True
                continue
            try:
                addresses = await self.addresses(host)
            except NoSuchDomain as exc:
                outcome.errors.append(f"{host.hostname}: {exc.reason}")
                continue
            except DnsError as exc:
                outcome.errors.append(f"{host.hostname}: {exc.reason}")
                temporary = True
                continue
            if not addresses:
                outcome.errors.append(f"{host.hostname}: no address records")
                continue
            for ip in addresses:
                status = await self._attempt_at(plan, ip, sender, recipients, message,
                                                smtputf8=needs_utf8, eight_bit=eight_bit,
                                                outcome=outcome, dsn=dsn)
                if status == "done":
                    return outcome
                if isinstance(status, tuple):
                    capability = status
                    break  # the host's other addresses run the same software
                temporary = True
        if not temporary:
            if capability is not None:
                status_code, reason = capability
            else:
                status_code = "5.4.4"
                reason = "no usable host: " + "; ".join(outcome.errors[-3:])
            outcome.results = [RecipientResult(i, RecipientState.BOUNCED, reason, status_code)
                               for i in range(len(recipients))]
        return outcome

    async def _attempt_at(self, plan: HostPlan, ip: str, sender: str, recipients: list[str],
                          message: bytes, *, smtputf8: bool, eight_bit: bool,
                          outcome: Outcome, fresh: bool = False,
                          dsn: DsnRequest | None = None) -> str | tuple[str, str]:
        """One session: ``"done"``, ``"failed"``, or ``(status, reason)`` when this host
        cannot carry the message."""
        host = plan.host
        where = f"{host.hostname}[{ip}]:{host.port}"
        outcome.tried = True
        try:
            session, key, pooled = await self.open_session(plan, ip, reuse=not fresh)
        except TlsFailure as exc:
            outcome.errors.append(f"{where}: {exc.status} {exc.reason}")
            outcome.tls_status, outcome.tls_failure = exc.status, exc.failure
            outcome.contacted = True
            if exc.final:  # as a host that cannot carry the message: the next one
                return exc.status, f"{where}: {exc.reason}"
            return "failed"
        except SessionError as exc:
            outcome.errors.append(f"{where}: {exc.reason}")
            outcome.contacted |= exc.stage is not Stage.CONNECT
            log.info("host %s unusable: %s", where, exc.reason)
            return "failed"
        outcome.contacted = True
        if eight_bit and not session.supports("8BITMIME"):
            # RFC 6152 3: converted to 7-bit for this server where that can be done.
            if outcome.seven_bit is None:
                outcome.seven_bit = await asyncio.to_thread(to_7bit, message) or b""
            if outcome.seven_bit:
                message, eight_bit = outcome.seven_bit, False
        refusal = self._cannot_carry(session, message, smtputf8=smtputf8,
                                     eight_bit=eight_bit)
        if refusal is not None:
            status, reason = refusal
            outcome.errors.append(f"{where}: {reason}")
            await self.pool.give_back(key, session)
            return status, f"{where}: {reason}"
        params = []
        if session.supports("SIZE"):
            params.append(f"SIZE={len(message)}")
        if eight_bit and session.supports("8BITMIME"):
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        if session.ssl_object is not None:  # never on a session that is not protected
            params += plan.policy.mail_parameters
        # RFC 3461 5.2: to a server that offers DSN, the sender's wishes go along and the
        # server answers for them; to one that does not, we do (a "relayed" notice).
        dsn_passed = dsn is not None and session.supports("DSN")
        rcpt_params: list[list[str]] = []
        if dsn_passed:
            params += dsn.mail_params()
            rcpt_params = [dsn.rcpt_params(i) for i in range(len(recipients))]
        try:
            result = await session.send(sender, recipients, message, mail_params=params,
                                        rcpt_params=rcpt_params)
        except SessionError as exc:
            session.abort()
            if pooled:
                # The server closed an idle session we kept: not the host's fault.
                return await self._attempt_at(plan, ip, sender, recipients, message,
                                              smtputf8=smtputf8, eight_bit=eight_bit,
                                              outcome=outcome, fresh=True, dsn=dsn)
            outcome.errors.append(f"{where}: {exc.reason}")
            log.info("delivery to %s broke off: %s", where, exc.reason)
            return "failed"
        if result.mail.transient:
            outcome.errors.append(f"{where}: MAIL FROM refused: {result.mail}")
            await self.pool.give_back(key, session)
            return "failed"
        for index, reply in enumerate(result.recipients):
            if reply.positive:
                state, default = RecipientState.DELIVERED, "2.0.0"
            elif reply.transient:
                state, default = RecipientState.DEFERRED, "4.0.0"
            else:
                state, default = RecipientState.BOUNCED, "5.0.0"
            outcome.results.append(RecipientResult(index, state, str(reply),
                                                   _enhanced(reply, default), host.hostname,
                                                   remote=not reply.local,
                                                   dsn_passed=dsn_passed, final=host.lmtp))
        outcome.requiretls_met = plan.policy.requiretls
        await self.pool.give_back(key, session)
        return "done"

    @staticmethod
    def _cannot_carry(session: SmtpSession, message: bytes, *, smtputf8: bool,
                      eight_bit: bool) -> tuple[str, str] | None:
        if smtputf8 and not session.supports("SMTPUTF8"):
            return "5.6.7", "the message needs SMTPUTF8, which the server does not offer"
        if eight_bit and not session.supports("8BITMIME"):
            return "5.6.3", ("8-bit text in a header, and the server does not offer "
                             "8BITMIME: no 7-bit form of it means the same")
        limit = session.extensions.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) and len(message) > int(limit):
            return "5.3.4", f"message of {len(message)} bytes is over the server's SIZE {limit}"
        return None
