"""What the ``tlsrpt`` plugin does: count every outbound TLS session, and once a day send
each domain that asks for it (``_smtp._tls``) its report (RFC 8460).

Rules:

1. Every ``tls_result`` is counted in memory and added to the shared SQLite file in
   batches, off the delivery path (``flush_interval``); a stop flushes what is left.
2. Sessions that carry our own reports are not counted: report mail is queued under
   ids of its own (``tlsrpt-...``), and the plugin gives those messages the level
   ``may`` itself, so that a destination's MTA-STS or DANE failure never holds back the
   report about it (RFC 8460 section 3).
3. A day's report for a domain is sent once the UTC day is over plus a delay between 0
   and ``max_delay`` that is the same for a domain and day every time (so that a
   restart does not move it), to every ``mailto:`` and ``https:`` destination of its
   record: mail through our own queue, from the null sender (no notices about notices),
   DKIM-signed with the keys of ``config/dkim_sign.ini`` for the submitter's domain;
   HTTPS as a POST of ``application/tlsrpt+gzip``.
4. A destination that accepted the report is marked ``sent`` and never gets it again; a
   failing one is tried again with a back-off from 5 minutes, for up to 24 hours.
5. A domain with no TLSRPT record gets no report; every day's data is dropped after
   ``retention`` days, sent or not.
6. In a fleet (``config/redis.ini``) each node counts as above and hands its totals to
   the fleet every ``flush_interval``; the reports cover every node's sessions and one
   node sends each (``harakapy.fleet.tlsrpt``). While Redis is away reports wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email
import email.message
import email.policy
import email.utils
import hashlib
import logging
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.dkim import DkimSigner, verified_domains
from harakapy.dns import DnsError, Resolver
from harakapy.fleet import FleetDown, fleet_link
from harakapy.fleet.tlsrpt import FleetLedger
from harakapy.spool.store import QueuedMessage, SpoolError
from harakapy.tls.policy import Level, Policy
from harakapy.tls.results import TlsResult
from harakapy.tls.sts_fetch import ServerResolver
from harakapy.tls.tlsrpt import TlsrptError, TlsrptRecord, select_record
from harakapy.tls.tlsrpt_ledger import Lease, Ledger, LocalLedger

if TYPE_CHECKING:
    from harakapy.fleet.link import RedisLink
from harakapy.tls.tlsrpt_report import (
    compressed,
    file_name,
    report_id,
    report_json,
    session_key,
)
from harakapy.tls.tlsrpt_store import DeliveryLog, SessionStore

log = logging.getLogger("harakapy.tlsrpt")

ID_PREFIX = "tlsrpt-"
DATA_NAME = "reports.sqlite"
RECEIVED_NAME = "received.sqlite"
STATE_FOLDER = "tlsrpt"
FIRST_RETRY = 300.0
RETRY_FOR = 86400.0
MAX_POSTED = 10 * 1024 * 1024  # what receivers commonly take (../shared/specs/tlsrpt.md)

Submit = Callable[..., Awaitable[QueuedMessage]]


@dataclass(frozen=True, slots=True)
class TlsrptSettings:
    """``config/tlsrpt.ini``."""

    organization: str
    contact: str
    max_delay: float = 4 * 3600.0
    flush_interval: float = 5.0
    check_interval: float = 300.0
    retention: int = 2
    https_timeout: float = 60.0
    mailbox: str = ""  # where reports about our domains arrive (our rua), "" for none
    listen: tuple[str, int] | None = None  # the HTTPS endpoint for POSTed reports
    cert: Path | None = None
    key: Path | None = None

    @property
    def submitter(self) -> str:
        return self.contact.rpartition("@")[2].lower()

    @classmethod
    def from_config(cls, config: Config) -> TlsrptSettings:
        ini = config.ini("tlsrpt.ini")
        ini.check_known(config.shipped_ini("tlsrpt.ini"))
        me = (config.value("me") or "").strip() or socket.getfqdn()
        contact = ini.get_str("main", "contact") or f"tlsrpt-noreply@{me}"
        if "@" not in contact or any(c in contact for c in " \t\r\n<>"):
            raise ini.error("main", "contact", f"{contact!r} is not a mail address")
        settings = cls(
            organization=ini.get_str("main", "organization") or me,
            contact=contact,
            max_delay=ini.get_duration("main", "max_delay", 4 * 3600.0),
            flush_interval=ini.get_duration("main", "flush_interval", 5.0),
            check_interval=ini.get_duration("main", "check_interval", 300.0),
            retention=ini.get_int("main", "retention_days", 2, minimum=1),
            mailbox=ini.get_str("receive", "mailbox").lower())
        if settings.mailbox and ("@" not in settings.mailbox or " " in settings.mailbox):
            raise ini.error("receive", "mailbox", f"{settings.mailbox!r} is not an address")
        address = ini.get_str("receive", "listen")
        if address:
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ini.error("receive", "listen", f"expected host:port, got {address!r}")
            paths = []
            for key in ("cert", "key"):
                if not ini.get_str("receive", key):
                    raise ini.error("receive", "listen", f"the endpoint needs [receive] {key}")
                paths.append(config.resolve(ini.get_str("receive", key)))
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*paths)
            except (OSError, ssl.SSLError) as exc:
                raise ini.error("receive", "cert", f"cannot load the certificate and key: "
                                                   f"{exc}") from None
            settings = dataclasses.replace(settings, listen=(host.strip("[]"), int(port)),
                                           cert=paths[0], key=paths[1])
        if settings.flush_interval <= 0 or settings.check_interval <= 0:
            raise ini.error("main", "flush_interval" if settings.flush_interval <= 0
                            else "check_interval", "must be more than 0 seconds")
        return settings


@dataclass(frozen=True, slots=True)
class Outcome:
    """One destination's fate in one sending round."""

    rua: str
    state: str
    error: str = ""


def utc_day(moment: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).date()


def data_path(config: Config) -> Path:
    """The plugin's SQLite file, ``DIR/state/tlsrpt/reports.sqlite``."""
    folder = config.state_dir() / STATE_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / DATA_NAME


def received_path(config: Config) -> Path:
    """Where the reports received about our domains are kept."""
    return data_path(config).with_name(RECEIVED_NAME)


class Tlsrpt:
    """The counter and the sender.

    :param submit: ``server.submit`` (``None`` in a command without a queue: mailto
        destinations then wait for the server).
    :param fleet: The fleet's ledger (rule 6): built from the link with this node's own.
    """

    def __init__(self, settings: TlsrptSettings, path: Path, resolver: Resolver,
                 clock: Clock, submit: Submit | None, signer: DkimSigner | None,
                 ca_file: Path | None = None, fleet: RedisLink | None = None) -> None:
        self.settings = settings
        self.sessions = SessionStore(path)
        self.deliveries = DeliveryLog(path)
        local = LocalLedger(self.sessions, self.deliveries)
        self.fleet = None if fleet is None else FleetLedger(
            fleet, local, lease=fleet.settings.lease, settle=fleet.settings.settle,
            grace=max(60.0, 10 * settings.flush_interval),
            flushed=2 * settings.flush_interval, retention=settings.retention)
        self.ledger: Ledger = self.fleet or local
        self._fleet_down = False
        self.resolver = resolver
        self.clock = clock
        self.submit = submit
        self.signer = signer
        self.ca_file = ca_file
        self._pending: Counter = Counter()
        self._flushing = asyncio.Lock()

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver, clock: Clock,
                    submit: Submit | None) -> Tlsrpt:
        """One per config generation and process; the keys of ``config/dkim_sign.ini``
        sign the report mail."""
        from harakapy.outbound.tls_policy import tls_settings

        settings = config.derive("tlsrpt.settings", TlsrptSettings.from_config)
        signer = config.derive("dkim_sign.signer", DkimSigner.from_config)
        if settings.submitter not in signer.keys:
            log.warning("TLSRPT: no DKIM key for %s in config/dkim_sign.ini: receivers "
                        "ignore unsigned report mail (RFC 8460 3)", settings.submitter)
        link = fleet_link(config)
        return cls(settings, data_path(config), resolver, clock, submit, signer,
                   tls_settings(config).ca_file,
                   link if link is not None and link.settings.share_tlsrpt else None)

    @staticmethod
    def check_config(config: Config) -> TlsrptSettings:
        DkimSigner.from_config(config)
        return config.derive("tlsrpt.settings", TlsrptSettings.from_config)

    # -- counting -------------------------------------------------------------------------

    def record(self, result: TlsResult) -> None:
        """Rule 1 (rule 2: the plugin's own policy marks report sessions)."""
        if result.decided_by == "tlsrpt":
            return
        self._pending[session_key(result, self.clock.time())] += 1

    async def flush(self) -> None:
        """Write what was counted; a flush already writing is waited for, so that what
        follows (the day's report) sees every session this process counted."""
        async with self._flushing:
            batch, self._pending = self._pending, Counter()
            if batch:
                try:
                    await asyncio.to_thread(self.sessions.add, batch)
                except Exception:
                    self._pending.update(batch)  # kept for the next flush
                    raise

    async def run_flush(self) -> None:
        while True:
            await self.clock.sleep(self.settings.flush_interval)
            await self.flush()

    async def ship(self) -> bool:
        """Rule 6: hand this node's counts to the fleet; whether Redis took them (always
        true without a fleet)."""
        if self.fleet is None:
            return True
        try:
            await self.fleet.ship(self.clock.time())
        except FleetDown:
            return False
        return True

    async def run_ship(self) -> None:
        """Rule 6, every ``flush_interval`` (nothing without a fleet)."""
        if self.fleet is None:
            return
        while True:
            await self.clock.sleep(self.settings.flush_interval)
            await self.ship()

    @staticmethod
    def is_report(message: QueuedMessage | None) -> bool:
        """Whether ``message`` is one of our reports (rule 2)."""
        return message is not None and message.id.startswith(ID_PREFIX)

    @staticmethod
    def report_policy() -> Policy:
        """Rule 2's policy for report mail."""
        return Policy(Level.MAY, reason="a TLS report (RFC 8460 3: delivered whatever "
                                        "the destination's TLS policy)")

    # -- reports ----------------------------------------------------------------------------

    def delay(self, day: datetime.date, domain: str) -> float:
        digest = hashlib.sha256(f"{day}/{domain}".encode()).digest()
        return self.settings.max_delay * int.from_bytes(digest[:4]) / 2**32

    def due_at(self, day: datetime.date, domain: str) -> float:
        midnight = datetime.datetime.combine(day + datetime.timedelta(days=1),
                                             datetime.time(), datetime.UTC).timestamp()
        # Every process has flushed the day's last sessions by then.
        settled = 2 * self.settings.flush_interval
        return midnight + settled + self.delay(day, domain)

    async def report(self, day: datetime.date, domain: str) -> dict[str, Any]:
        counts = await self.ledger.counts(day, domain)
        return report_json(organization=self.settings.organization,
                           contact=self.settings.contact, day=day, domain=domain,
                           policies=counts)

    async def discover(self, domain: str) -> TlsrptRecord | None:
        """The domain's record; ``None`` when it asks for no reports.

        :raises DnsError: the lookup failed: try again later.
        """
        texts = await self.resolver.txt(f"_smtp._tls.{domain}")
        try:
            return select_record(texts)
        except TlsrptError as exc:
            if texts:
                log.info("TLSRPT: %s: %s; no report", domain, exc.reason)
            return None

    def mime(self, report: dict[str, Any], body: bytes, domain: str, to: str) -> bytes:
        """Rule 3's message (RFC 8460 5.3), DKIM-signed when a key is configured."""
        submitter = self.settings.submitter
        day = datetime.date.fromisoformat(report["date-range"]["start-datetime"][:10])
        message = email.message.EmailMessage(policy=email.policy.SMTP)
        message["From"] = self.settings.contact
        message["To"] = to
        message["Date"] = email.utils.formatdate(self.clock.time(), usegmt=True)
        message["Subject"] = (f"Report Domain: {domain} Submitter: {submitter} "
                              f"Report-ID: <{report['report-id']}>")
        message["Message-ID"] = email.utils.make_msgid("tlsrpt", domain=submitter)
        message["TLS-Report-Domain"] = domain
        message["TLS-Report-Submitter"] = submitter
        message["TLS-Required"] = "No"
        message.set_content(
            f"This is an SMTP TLS report (RFC 8460) for {domain}, for "
            f"{day.isoformat()} (UTC), from {self.settings.organization}.\n")
        message.add_attachment(body, maintype="application", subtype="tlsrpt+gzip",
                               filename=file_name(submitter, domain, day))
        boundary = f"tlsrpt-{secrets.token_hex(16)}"
        message.replace_header("Content-Type", "multipart/report; report-type=\"tlsrpt\"; "
                               f"boundary=\"{boundary}\"")
        raw = message.as_bytes()
        if self.signer is not None:
            raw = self.signer.sign(raw, domain=submitter)
        return raw

    async def send(self, day: datetime.date, domain: str, *,
                   schemes: tuple[str, ...] = ("mailto", "https")) -> list[Outcome]:
        """Rules 3 and 4 for one domain and day: every destination not yet done.

        :param schemes: The destinations to try now (a command without the queue sends
            to ``https`` ones only; the others keep their state for the server).
        """
        ident = report_id(day, domain, self.settings.submitter)
        async with self.ledger.lease(ident) as lease:
            if not lease.held:
                log.info("TLSRPT: another node is sending the report %s", ident)
                return []
            return await self._send(day, domain, ident, lease, schemes)

    async def _send(self, day: datetime.date, domain: str, ident: str, lease: Lease,
                    schemes: tuple[str, ...]) -> list[Outcome]:
        record = await self.discover(domain)
        now = self.clock.time()
        if record is None or not record.rua:
            await self.ledger.begin(ident, [], now)
            return []
        ruas = [str(rua) for rua in record.rua]
        await self.ledger.begin(ident, ruas, now)
        states = await self.ledger.states(ident)
        report = await self.report(day, domain)
        body = compressed(report)
        outcomes = []
        for rua in record.rua:
            state, attempts, first_try, next_try, _error = states[str(rua)]
            if state != DeliveryLog.PENDING or next_try > now or rua.scheme not in schemes:
                continue
            if not await lease.renew():
                log.warning("TLSRPT: the lease on the report %s lapsed; its holder's "
                            "successor sends the rest", ident)
                break
            error = await (self._mail(report, body, domain, rua.target, ident)
                           if rua.scheme == "mailto" else self.post(rua.target, body))
            if not error:
                new_state, retry = DeliveryLog.SENT, 0.0
                log.info("TLSRPT: the report %s went to %s", ident, rua)
            elif now - first_try >= RETRY_FOR:
                new_state, retry = DeliveryLog.GAVE_UP, 0.0
                log.warning("TLSRPT: giving up on %s for %s after 24 hours: %s", rua,
                            ident, error)
            else:
                new_state = DeliveryLog.PENDING
                retry = now + min(FIRST_RETRY * 2 ** attempts, 6 * 3600.0)
                log.info("TLSRPT: %s for %s failed (%s); trying again later", rua, ident,
                         error)
            await self.ledger.update(ident, str(rua), new_state, next_try=retry,
                                     error=error)
            outcomes.append(Outcome(str(rua), new_state, error))
        return outcomes

    async def _mail(self, report: dict[str, Any], body: bytes, domain: str, to: str,
                    ident: str) -> str:
        if self.submit is None:
            return "no outbound queue runs in this command"
        message = await asyncio.to_thread(self.mime, report, body, domain, to)
        queue_id = ID_PREFIX + hashlib.sha256(f"{ident} {to}".encode()).hexdigest()[:32]
        try:
            await self.submit("", [to], message, id=queue_id)
        except SpoolError as exc:
            if "already in the spool" in str(exc):
                return ""  # queued before a restart: the queue delivers it
            return str(exc)
        return ""

    async def post(self, url: str, body: bytes) -> str:
        """POST a compressed report (RFC 8460 5.4); empty on success, else why not."""
        import aiohttp

        # RFC 8460 5.4: a submitter MAY ignore certificate errors; we check, with the
        # same trust anchors as delivery, and retry rather than post blind.
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file else None)
        timeout = aiohttp.ClientTimeout(total=self.settings.https_timeout)
        connector = aiohttp.TCPConnector(resolver=ServerResolver(self.resolver),
                                         use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                             trust_env=False) as session, session.post(
                    url, data=body, ssl=context, allow_redirects=False,
                    headers={"Content-Type": "application/tlsrpt+gzip"}) as response:
                if 200 <= response.status < 300:
                    return ""
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    # -- the daily round --------------------------------------------------------------------

    async def due(self) -> list[tuple[datetime.date, str]]:
        """The (day, domain) pairs whose report is due and not done."""
        now = self.clock.time()
        today = utc_day(now)
        found = []
        for day in await self.ledger.days():
            if day >= today:
                continue
            for domain in await self.ledger.domains(day):
                ident = report_id(day, domain, self.settings.submitter)
                due = self.due_at(day, domain)
                if now < due or await self.ledger.done(ident):
                    continue
                waiting = await self.ledger.ready(day, now, due)
                if waiting:
                    log.info("TLSRPT: the report %s waits: %s", ident, waiting)
                    continue
                found.append((day, domain))
        return found

    async def send_due(self) -> list[Outcome]:
        outcomes = []
        if not await self.ship():
            self._note_down()
            return outcomes
        try:
            for day, domain in await self.due():
                try:
                    outcomes += await self.send(day, domain)
                except DnsError as exc:
                    log.info("TLSRPT: the _smtp._tls record of %s could not be read (%s); "
                             "trying again later", domain, exc.reason)
            cutoff = utc_day(self.clock.time()) - datetime.timedelta(
                days=self.settings.retention)
            await self.ledger.forget(cutoff)
        except FleetDown:
            self._note_down()
        else:
            self._fleet_down = False
        return outcomes

    def _note_down(self) -> None:
        if not self._fleet_down:
            log.warning("TLSRPT: the reports wait for the fleet's Redis (a report without "
                        "every node's sessions would be wrong); counting goes on")
        self._fleet_down = True

    async def run_sender(self) -> None:
        while True:
            await self.flush()
            await self.send_due()
            await self.clock.sleep(self.settings.check_interval)

    # -- reports about our domains ---------------------------------------------------------

    @staticmethod
    def received_path(config: Config) -> Path:
        """Where the reports about our domains are kept (``harakapy tlsrpt received``)."""
        return received_path(config)

    def for_mailbox(self, recipients: list[str]) -> bool:
        """Whether a message goes to our report mailbox only."""
        mailbox = self.settings.mailbox
        return bool(mailbox) and bool(recipients) and all(
            r.lower() == mailbox for r in recipients)

    async def receive_mail(self, message: bytes, received: Path) -> str:
        """Store the report a message carries (RFC 8460 3: only with a valid DKIM
        signature); what happened, for the log."""
        loop = asyncio.get_running_loop()

        def txt_for(name: bytes, timeout: int = 5) -> bytes:
            # dkimpy asks synchronously, from its thread: the resolver runs on the loop.
            future = asyncio.run_coroutine_threadsafe(
                self.resolver.txt(name.decode().rstrip(".")), loop)
            return "".join(future.result(timeout + 5)).encode()

        from harakapy.tls.tlsrpt_received import ReceivedStore, ReportError, parse_report

        signers = await asyncio.to_thread(verified_domains, message, txt_for, tlsrpt=True)
        submitter = _header(message, "TLS-Report-Submitter").lower().rstrip(".")
        if not any(submitter == d or submitter.endswith("." + d) for d in signers):
            return (f"ignored: no valid DKIM signature of the submitter "
                    f"{submitter or '(no TLS-Report-Submitter)'} (RFC 8460 3; signed by: "
                    f"{', '.join(signers) or 'nobody'})")
        attachment = _report_part(message)
        if attachment is None:
            return "ignored: no application/tlsrpt+gzip or +json part"
        try:
            report = parse_report(attachment)
        except ReportError as exc:
            return f"ignored: {exc.reason}"
        store = ReceivedStore(received)
        try:
            added = await asyncio.to_thread(store.add, report)
        finally:
            store.close()
        state = "stored" if added else "a duplicate"
        return f"{state}: {report['organization-name']}, {report['report-id']}"

    async def serve(self, received: Path) -> None:
        """The HTTPS endpoint of ``[receive] listen``, until cancelled; nothing without
        one. A POSTed report (RFC 8460 5.4, gzip or JSON) is stored and answered 201."""
        from aiohttp import web

        from harakapy.tls.tlsrpt_received import ReceivedStore, ReportError, parse_report

        if self.settings.listen is None or self.settings.cert is None:
            return
        store = ReceivedStore(received)

        async def handle(request: web.Request) -> web.Response:
            body = await request.content.read(MAX_POSTED + 1)
            if len(body) > MAX_POSTED:
                return web.Response(status=413, text="too large\n")
            try:
                report = parse_report(body)
            except ReportError as exc:
                return web.Response(status=400, text=f"not a TLS report: {exc.reason}\n")
            added = await asyncio.to_thread(store.add, report)
            log.info("TLSRPT: a report POSTed by %s: %s", request.remote,
                     "stored" if added else "a duplicate")
            return web.Response(status=201 if added else 200, text="thank you\n")

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.cert, self.settings.key)
        app = web.Application(client_max_size=MAX_POSTED + 1)
        app.router.add_route("POST", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = self.settings.listen
        await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True).start()
        log.info("TLSRPT: reports received on https://%s:%d/", host, port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            store.close()

    def retire(self) -> None:
        """A reload replaced this service: write what it counted, then close, in the
        background (the caller is a hook that must not wait)."""
        async def finish() -> None:
            try:
                await self.flush()
            finally:
                self.close()

        self._retiring = asyncio.get_running_loop().create_task(finish())

    def close(self) -> None:
        self.sessions.close()
        self.deliveries.close()


def _header(message: bytes, name: str) -> str:
    parsed = email.message_from_bytes(message.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n",
                                      policy=email.policy.compat32)
    return str(parsed.get(name, "")).strip()


def _report_part(message: bytes) -> bytes | None:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    for part in parsed.walk():
        if part.get_content_type() in ("application/tlsrpt+gzip", "application/tlsrpt+json"):
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else None
    return None
