"""The queue runner: which (message, domain) to deliver when, with what concurrency, and what
to do with each outcome (record it, call hooks, retry, bounce, expire).

Rules:

1. Work is a *job*: one message's recipients in one domain. Jobs wait in a heap ordered by
   their next attempt; nothing scans the spool after startup.
2. An outcome is recorded in the spool before a hook hears of it, and a bounce's DSN is in
   the spool before its recipient is recorded as bounced: a crash may repeat a DSN, never
   lose one.
3. ``concurrency`` jobs run at once, at most ``domain_concurrency`` per domain.
4. An attempt that settles a message's last recipients writes no journal line: the
   message is removed from the spool instead (a crash before the removal reaches the disk
   delivers it again, which SMTP allows; it never loses it). A message just accepted is
   delivered from memory the first time, without reading it back from the spool.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import heapq
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from harakapy import metrics
from harakapy.clock import Clock
from harakapy.dns import Resolver
from harakapy.dsn import DELAY, FAILURE, NEVER, SUCCESS, DsnRequest, wants
from harakapy.outbound.bounce import Failure, build_dsn, redact_notice
from harakapy.outbound.delivery import Delivery, Outcome, RecipientResult
from harakapy.outbound.mx import MxError, MxHost, next_hops
from harakapy.outbound.negotiate import Negotiator
from harakapy.outbound.requiretls import (
    REQUIRETLS_STATUSES,
    RequireTlsRefused,
    opts_out,
    requiretls_settings,
)
from harakapy.outbound.requiretls import routes as policy_routes
from harakapy.outbound.settings import OutboundSettings
from harakapy.outbound.tls_policy import PolicyLookupError, tls_settings
from harakapy.results import Result
from harakapy.spool.store import (
    JournalEvent,
    QueuedMessage,
    RecipientState,
    Spool,
    SpoolError,
    new_id,
)
from harakapy.tls import outcomes

if TYPE_CHECKING:
    from harakapy.config import Config
    from harakapy.dispatch import HookCaller
    from harakapy.tls.results import TlsResult

DELIVERED, DEFERRED, BOUNCED = (RecipientState.DELIVERED, RecipientState.DEFERRED,
                                RecipientState.BOUNCED)

log = logging.getLogger("harakapy.outbound")

# Bytes of just-accepted messages kept in memory for their first attempt (rule 4).
FRESH_BYTES = 32 << 20


class QueueHost(Protocol):
    """What the queue runner needs of the running server; it reads each at every use, so
    a SIGHUP reload applies to the next delivery."""

    @property
    def config(self) -> Config: ...

    @property
    def me(self) -> str: ...

    @property
    def plugins(self) -> HookCaller: ...


@dataclass(slots=True)
class Job:
    message_id: str
    domain: str
    due: float
    cancelled: bool = False


class OutboundQueue:
    """The spool plus the runner that empties it.

    :param server: For hooks, ``me`` and settings (see :class:`QueueHost`).
    :param spool: The spool directory.
    :param clock: Where time comes from (tests move it).
    :param slot: This worker's slot and the number of workers: it delivers only the
        messages of its slots (rule 6 of ``spool/store.py``); ``(0, 1)`` for all.
    """

    def __init__(self, server: QueueHost, spool: Spool, *, clock: Clock | None = None,
                 slot: tuple[int, int] = (0, 1)) -> None:
        self.server = server
        self.spool = spool
        self.clock = clock or Clock()
        self.slot, self.slots = slot
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._jobs: dict[tuple[str, str], Job] = {}
        self._open_domains: dict[str, set[str]] = {}  # message id -> domains not done
        self._waiting: dict[str, list[Job]] = {}
        # Destinations none of whose hosts answered: until when their other jobs wait
        # without an attempt (Postfix's "delivery temporarily suspended").
        self._suspended: dict[str, float] = {}
        # Told of each suspension this queue makes (a fleet shares them): (domain, until).
        self.on_suspend: Callable[[str, float], None] | None = None
        self._active_domains: dict[str, int] = {}
        self._active = 0
        self._running: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._delivery: Delivery | None = None
        # Spool writes wait on fsync; many in flight at once let the file system commit
        # them together (the default executor has only a few threads).
        self._io = ThreadPoolExecutor(max_workers=64, thread_name_prefix="spool")
        # Messages just accepted, with their text, for their first attempt (rule 4).
        self._fresh: dict[str, tuple[QueuedMessage, bytes]] = {}
        self._fresh_bytes = 0
        self._resolver_for: object = None
        self._arrivals: dict[str, float] = {}  # message id -> arrival, for the metrics
        self._gauged = 0.0

    # -- settings that follow reloads -----------------------------------------------------

    @property
    def settings(self) -> OutboundSettings:
        return self.server.config.derive("outbound.settings", OutboundSettings.from_config)

    @property
    def delivery(self) -> Delivery:
        config = self.server.config
        if self._delivery is None or self._resolver_for is not config:
            resolver = config.derive("outbound.resolver", Resolver.from_config)
            old = self._delivery
            negotiator = Negotiator(tls_settings(config), report=self._report_tls)
            self._delivery = Delivery(self.settings, resolver, self.server.me, negotiator)
            if old is not None:
                self._delivery.pool = old.pool  # idle sessions survive a reload
                old.pool.settings = self.settings
            self._resolver_for = config
        return self._delivery

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the spool (the only full scan) and start delivering."""
        self.spool.create()
        count = await self._in_thread(self._recover)
        log.info("spool %s: %d message(s) queued", self.spool.root, count)
        # The jobs recovered from a large spool live long: leave them out of the cyclic
        # garbage collector's full passes, which would otherwise walk them all again and
        # again (measured: 100,000 queued slowed delivery by a fifth).
        gc.freeze()
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def owns(self, message: QueuedMessage) -> bool:
        """Whether this worker delivers ``message``."""
        return message.slot % self.slots == self.slot

    def _recover(self) -> int:
        count = 0
        self.spool.remove_unfinished(self.slot, self.slots)
        if self.slots == 1:
            # Other workers may be writing journals now; the supervisor clears orphans
            # before it starts any (harakapy.supervisor).
            self.spool.remove_orphan_journals()
        for message_id in list(self.spool.ids()):
            try:
                if self.slots > 1 and self.spool.slot_of(message_id) % self.slots != self.slot:
                    continue
                message = self.spool.load(message_id)
            except SpoolError as exc:
                log.error("skipping unreadable spool entry: %s", exc)
                continue
            domains = message.domains()
            if not domains:
                self.spool.remove(message_id)
                continue
            count += 1
            self._open_domains[message_id] = set(domains)
            self._arrivals[message_id] = message.arrival
            for domain in domains:
                self._schedule(message_id, domain, message.next_attempt.get(domain, 0.0))
        return count

    def adopt(self, message_id: str) -> bool:
        """Start delivering a message a command wrote into the spool while this worker
        runs (``harakapy tlsrpt send``); whether this worker took it (another worker's
        slot, or one it has already, is not taken)."""
        if message_id in self._open_domains:
            return False
        try:
            if self.spool.slot_of(message_id) % self.slots != self.slot:
                return False
            message = self.spool.load(message_id)
        except SpoolError:
            return False
        domains = message.domains()
        if not domains:
            return False
        self._open_domains[message_id] = set(domains)
        self._arrivals[message_id] = message.arrival
        for domain in domains:
            self._schedule(message_id, domain, 0.0)
        return True

    async def stop(self, grace: float = 0.0) -> None:
        """Start nothing new; let deliveries in flight finish within ``grace`` seconds,
        then cut them off (their recipients stay queued: at worst a re-send)."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._delivery is not None:
            await self._delivery.pool.close()
        self._io.shutdown(wait=True)

    async def _in_thread(self, function, /, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, functools.partial(function, *args,
                                                                       **kwargs))

    # -- entering the queue ---------------------------------------------------------------

    async def submit(self, sender: str, recipients: list[str], message: bytes, *,
                     id: str | None = None, smtputf8: bool | None = None,
                     body_8bit: bool = False, requiretls: bool = False, ret: str = "",
                     envid: str = "", notify: list[str] | None = None,
                     orcpt: list[str] | None = None, client: str = "") -> QueuedMessage:
        """Store a message durably and schedule its delivery.

        :param id: The queue id (a received message keeps its transaction's); a new one
            when ``None``.
        :param smtputf8: Whether delivery needs SMTPUTF8; ``None``: when an address is
            not ASCII.
        :param requiretls: Deliver it only as REQUIRETLS allows (RFC 8689).
        :param ret: RFC 3461 ``RET``; ``envid`` its ``ENVID``.
        :param notify: Each recipient's ``NOTIFY`` (RFC 3461), in order; ``orcpt`` its
            ``ORCPT``.
        :param client: The inbound transaction it came from, for logs.
        :raises SpoolError: it could not be stored; a client must hear 4xx.
        :raises ValueError: no recipient, or an address with CR, LF or NUL (a plugin's
            mistake: such an address would reach headers of notices and reports).
        """
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        for address in (sender, *recipients):
            if "\r" in address or "\n" in address or "\0" in address or \
                    (address and "@" not in address):
                raise ValueError(f"not a mail address: {address!r}")
        if smtputf8 is None:
            smtputf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        queued = await self._in_thread(
            self.spool.accept, id=id or new_id(), sender=sender, recipients=recipients,
            message=message, smtputf8=smtputf8, body_8bit=body_8bit, requiretls=requiretls,
            tls_optional=not requiretls and opts_out(message), ret=ret, envid=envid,
            notify=notify, orcpt=orcpt, client=client, arrival=self.clock.time(),
            slot=self.slot)
        await self.server.plugins.call_all("init_outbound", message=queued)
        domains = queued.domains()
        if len(domains) == 1 and self._fresh_bytes + len(message) <= FRESH_BYTES:
            # Several domains' jobs would share one object; those read their own copy.
            self._fresh[queued.id] = (queued, message)
            self._fresh_bytes += len(message)
        self._open_domains[queued.id] = set(domains)
        self._arrivals[queued.id] = queued.arrival
        for domain in domains:
            self._schedule(queued.id, domain, 0.0)
        return queued

    def _schedule(self, message_id: str, domain: str, due: float) -> None:
        job = Job(message_id, domain, due)
        old = self._jobs.get((message_id, domain))
        if old is not None:
            old.cancelled = True
        self._jobs[(message_id, domain)] = job
        heapq.heappush(self._heap, (due, next(self._seq), job))
        self._wake.set()

    # -- operator commands ----------------------------------------------------------------

    def flush(self, message_id: str | None = None) -> int:
        """Make every waiting job (or those of one message) due now; how many."""
        count = 0
        for (mid, domain), job in list(self._jobs.items()):
            if (mid, domain) in self._running:
                continue  # being delivered right now; a second attempt would send twice
            if (message_id is None or mid == message_id) and not job.cancelled and \
                    job.due > 0:
                self._suspended.pop(domain, None)
                self._schedule(mid, domain, 0.0)
                count += 1
        return count

    def delete(self, message_id: str) -> bool:
        """Drop a message of this worker's from the queue and the spool; whether it was
        here (another worker's message is that worker's to delete)."""
        if message_id not in self._open_domains:
            try:
                if self.spool.slot_of(message_id) % self.slots != self.slot:
                    return False
            except SpoolError:
                return False
        found = False
        for (mid, domain), job in list(self._jobs.items()):
            if mid == message_id:
                job.cancelled = True
                del self._jobs[(mid, domain)]
                found = True
        self._open_domains.pop(message_id, None)
        self._arrivals.pop(message_id, None)
        self._take_fresh(message_id)
        if (self.spool.msg_dir / message_id).exists():
            found = True
        self.spool.remove(message_id)
        return found

    def suspend(self, domain: str, until: float) -> None:
        """Hold ``domain``'s jobs without an attempt until ``until``, as if none of its
        hosts had answered here (another node of a fleet found that they did not)."""
        if until > self._suspended.get(domain, 0.0):
            self._suspended[domain] = until

    def stats(self) -> dict[str, Any]:
        now = self.clock.time()
        return {"jobs": len(self._jobs), "active": self._active,
                "messages": len(self._open_domains),
                "suspended": sorted(d for d, until in self._suspended.items() if until > now)}

    # -- the runner -----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The runner must outlive any one bad job or config; log and go on.
                log.exception("queue runner error")
                await asyncio.sleep(1.0)

    async def _run_once(self) -> None:
        """Start the jobs that are due (within the limits), then sleep until the next one
        is due or something changes."""
        now = self.clock.time()
        settings = self.settings
        while self._heap and self._heap[0][0] <= now and \
                self._active < settings.concurrency:
            _, _, job = heapq.heappop(self._heap)
            if job.cancelled:
                continue
            until = self._suspended.get(job.domain)
            if until is not None and until > now and (job.message_id, job.domain) \
                    not in self._running:
                self._schedule(job.message_id, job.domain, until)
                continue
            if self._active_domains.get(job.domain, 0) >= settings.domain_concurrency:
                self._waiting.setdefault(job.domain, []).append(job)
                continue
            self._start(job)
        await self.delivery.pool.expire()
        if metrics.enabled() and now - self._gauged >= 1.0:
            # At most once a second: the minimum walks every queued message.
            self._gauged = now
            oldest = min(self._arrivals.values(), default=now)
            metrics.queue_depth(len(self._open_domains), now - oldest)
        self._wake.clear()
        delay = 5.0
        if self._heap and self._active < settings.concurrency:
            delay = min(delay, max(0.0, self._heap[0][0] - now))
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _start(self, job: Job) -> None:
        self._running.add((job.message_id, job.domain))
        self._active += 1
        self._active_domains[job.domain] = self._active_domains.get(job.domain, 0) + 1
        task = asyncio.get_running_loop().create_task(self._deliver_job(job))
        self._tasks.add(task)
        task.add_done_callback(lambda t, job=job: self._finished(t, job))

    def _finished(self, task: asyncio.Task[None], job: Job) -> None:
        self._tasks.discard(task)
        self._running.discard((job.message_id, job.domain))
        self._active -= 1
        self._active_domains[job.domain] -= 1
        if not self._active_domains[job.domain]:
            del self._active_domains[job.domain]
        waiting = self._waiting.get(job.domain)
        if waiting:
            next_job = waiting.pop(0)
            if not waiting:
                del self._waiting[job.domain]
            heapq.heappush(self._heap, (0.0, next(self._seq), next_job))
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery of %s to %s failed unexpectedly", job.message_id,
                      job.domain, exc_info=task.exception())
            # Never lose it: try again later.
            self._schedule(job.message_id, job.domain,
                           self.clock.time() + self.settings.min_backoff)
        self._wake.set()

    def _take_fresh(self, message_id: str) -> tuple[QueuedMessage, bytes] | None:
        fresh = self._fresh.pop(message_id, None)
        if fresh is not None:
            self._fresh_bytes -= len(fresh[1])
        return fresh

    async def _deliver_job(self, job: Job) -> None:
        if self._jobs.get((job.message_id, job.domain)) is not job:
            return
        fresh = self._take_fresh(job.message_id)
        body: bytes | None = None
        if fresh is not None:
            message, body = fresh
        else:
            try:
                message = await self._in_thread(self.spool.load, job.message_id)
            except SpoolError as exc:
                log.error("cannot load %s: %s", job.message_id, exc)
                self._jobs.pop((job.message_id, job.domain), None)
                return
        pending = message.pending(job.domain)
        if not pending:
            await self._domain_done(message, job.domain)
            return
        settings = self.settings
        lifetime = settings.bounce_lifetime if message.is_bounce else \
            settings.max_queue_lifetime
        indexes = [message.recipients.index(r) for r in pending]
        try:
            hosts, routed = await self._hosts(message, job.domain)
            routes = await policy_routes(self.server.plugins, self.server.config,
                                         self.delivery.resolver, job.domain, hosts,
                                         routed=routed, message=message)
        except RequireTlsRefused as exc:
            outcome = Outcome([RecipientResult(i, BOUNCED, exc.reason, exc.status)
                               for i in indexes], [exc.reason], requiretls_why=exc.why)
            await self._apply(message, job, indexes, outcome, lifetime)
            return
        except MxError as exc:
            state = BOUNCED if exc.permanent else DEFERRED
            outcome = Outcome([RecipientResult(i, state, exc.reason, exc.enhanced)
                               for i in indexes], [exc.reason])
            await self._apply(message, job, indexes, outcome, lifetime)
            return
        except PolicyLookupError as exc:
            outcome = Outcome([RecipientResult(i, DEFERRED, str(exc), "4.7.0")
                               for i in indexes], [str(exc)])
            await self._apply(message, job, indexes, outcome, lifetime)
            return
        if body is None:
            body = await self._in_thread(message.read)
        outcome = await self.delivery.attempt(
            routes, message.sender, [message.recipients[i].address for i in indexes], body,
            smtputf8=message.smtputf8, dsn=_dsn_request(message, indexes))
        outcome.requiretls_exempt = message.requiretls and not any(
            route.policy.requiretls for route in routes)
        if outcome.unreachable:
            # No host answered: other mail for the domain would only knock on the same
            # closed doors. It waits for this message's retry (Postfix does the same).
            until = self.clock.time() + settings.min_backoff
            self._suspended[job.domain] = until
            if self.on_suspend is not None:
                self.on_suspend(job.domain, until)
        elif outcome.contacted:
            self._suspended.pop(job.domain, None)
        # attempt() numbers results by position in the list it was given.
        for result in outcome.results:
            result.index = indexes[result.index]
        await self._apply(message, job, indexes, outcome, lifetime)

    async def _hosts(self, message: QueuedMessage, domain: str) -> tuple[list[MxHost], bool]:
        return await next_hops(self.server.plugins, self.delivery.resolver, domain,
                               port=self.settings.port, me=self.server.me, message=message)

    async def _report_tls(self, result: TlsResult) -> None:
        metrics.tls_session(result.level, result.policy_type,
                            result.failure.result_type.value if result.failure else "success",
                            result.tls_version)
        outcomes.record(result)
        await self.server.plugins.call_all("tls_result", result=result)

    async def _apply(self, message: QueuedMessage, job: Job, indexes: list[int],
                     outcome: Outcome, lifetime: float) -> None:
        """Record an attempt's outcome, tell the hooks, and schedule what remains."""
        server, now = self.server, self.clock.time()
        decided = {result.index: result for result in outcome.results}
        reason = "; ".join(outcome.errors[-3:]) or "no host could be reached"
        delivered = [r for r in outcome.results if r.state == DELIVERED]
        bounced = [r for r in outcome.results if r.state == BOUNCED]
        deferred = [r for r in outcome.results if r.state == DEFERRED]
        undecided = [i for i in indexes if i not in decided]
        expired = now - message.arrival >= lifetime
        if expired:
            # Out of time: what would be retried bounces now, with the last reason.
            for result in deferred:
                result.state, result.enhanced = BOUNCED, "5.4.7"
                result.reply = f"delivery time expired; last error: {result.reply}"
                result.remote = False  # our verdict, not the server's reply
            bounced += deferred
            deferred = []
            # A TLS policy failure says so in the DSN: 5.7.x, not only "expired".
            status = "5" + outcome.tls_status[1:] if outcome.tls_status else "5.4.7"
            bounced += [RecipientResult(i, BOUNCED, f"delivery time expired; last error: "
                                        f"{reason}", status) for i in undecided]
            undecided = []

        # Rule 4: when this attempt settles the message, its removal is the record.
        attempted = set(indexes)
        settles = (not deferred and not undecided
                   and self._open_domains.get(message.id) == {job.domain}
                   and all(r.is_final for i, r in enumerate(message.recipients)
                           if i not in attempted))
        marker = _requiretls_marker(message, outcome)
        if metrics.enabled():
            for result in delivered:
                metrics.recipient("delivered", result.enhanced, now - message.arrival)
            for result in bounced:
                metrics.recipient("bounced", result.enhanced)
            for result in deferred:
                metrics.recipient("deferred", result.enhanced)
            for _ in undecided:
                metrics.recipient("deferred", outcome.tls_status or "4.4.1")
        for result in delivered:
            log.info("%s delivered to <%s> via %s%s: %s", message.id,
                     message.recipients[result.index].address, result.mx, marker,
                     result.reply)
        if delivered:
            await self._record(message, JournalEvent(
                rcpt=tuple(r.index for r in delivered), state=DELIVERED, mx=delivered[0].mx,
                reply=delivered[0].reply), durable=True, settles=settles)
        if bounced:
            await self._bounce(message, bounced, settles=settles, marker=marker)
        await self._notify_success(message, delivered)  # queued before the message goes
        if settles:
            await self._domain_done(message, job.domain)  # before the hooks hear (rule 2)
        for result in delivered:
            await server.plugins.call_all(
                "delivered", message=message, recipients=[message.recipients[result.index]],
                mx=result.mx, reply=result.reply)
        if settles:
            return

        retry = [r.index for r in deferred] + undecided
        if retry:
            attempts = message.attempts.get(job.domain, 0) + 1
            next_attempt = now + self.settings.backoff(attempts)
            why = "; ".join(sorted({r.reply for r in deferred})) or reason
            log.info("%s deferred %d recipient(s) in %s until %.0fs from now%s: %s",
                     message.id, len(retry), job.domain, next_attempt - now, marker, why)
            await self._record(message, JournalEvent(
                rcpt=tuple(retry), state=DEFERRED, reply=why, domain=job.domain,
                attempts=attempts, next_attempt=next_attempt, error=why), durable=False)
            await server.plugins.call_all(
                "deferred", message=message,
                recipients=[message.recipients[i] for i in retry], reason=why,
                next_attempt=next_attempt)
            await self._maybe_warn(message, retry, why, lifetime)
            if self._jobs.get((message.id, job.domain)) is job:
                self._schedule(message.id, job.domain, next_attempt)
            return
        await self._domain_done(message, job.domain)

    async def _record(self, message: QueuedMessage, event: JournalEvent, *,
                      durable: bool, settles: bool = False) -> None:
        """Journal ``event`` and apply it; with ``settles``, apply it only: the message's
        removal from the spool follows and records it (rule 4)."""
        if message.id not in self._open_domains:
            return  # deleted by the operator meanwhile
        if settles:
            written = replace(event, time=self.clock.time())
        else:
            written = await self._in_thread(self.spool.record, message.id, event,
                                            durable=durable)
            message.journaled = True
        message.history.append(written)
        written.apply(message)

    async def _notify_success(self, message: QueuedMessage,
                              delivered: list[RecipientResult]) -> None:
        """RFC 3461 NOTIFY=SUCCESS for recipients handed to a server without DSN: a
        ``relayed`` notice from us, ``delivered`` for an LMTP mailbox (a server with DSN
        took the request along)."""
        told = [r for r in delivered if not r.dsn_passed and not message.is_bounce
                and wants(message.recipients[r.index].notify, SUCCESS)]
        if not told:
            return
        notices = [Failure(message.recipients[r.index].address, "2.0.0", r.reply, r.mx,
                           remote=True, orcpt=message.recipients[r.index].orcpt)
                   for r in told]
        # RFC 3464 2.3.3: "delivered" into a mailbox (an LMTP backend), else "relayed".
        action = "delivered" if all(r.final for r in told) else "relayed"
        dsn = await self._in_thread(build_dsn, message, notices, me=self.server.me,
                                    action=action)
        queued = await self._submit_notice(message, dsn)
        log.info("%s success notice (NOTIFY=SUCCESS) queued as %s for <%s>", message.id,
                 queued.id, message.sender)

    async def _submit_notice(self, message: QueuedMessage, dsn: bytes) -> QueuedMessage:
        # RFC 8689 5: a notice carries the original header, so it travels as the original
        # did. NOTIFY=NEVER: no notice about a notice, wherever it goes.
        return await self.submit("", [message.sender], dsn, requiretls=message.requiretls,
                                 notify=[NEVER])

    async def _bounce(self, message: QueuedMessage, bounced: list[RecipientResult], *,
                      settles: bool = False, marker: str = "") -> None:
        failures = [Failure(message.recipients[r.index].address, r.enhanced or "5.0.0",
                            r.reply, r.mx, r.remote, message.recipients[r.index].orcpt)
                    for r in bounced]
        for failure in failures:
            log.info("%s bounced <%s>%s: %s %s", message.id, failure.recipient, marker,
                     failure.status, failure.diagnostic)
        recipients = [message.recipients[r.index] for r in bounced]
        # RFC 3461 4.1: only recipients whose NOTIFY asks for failures (or who gave none).
        told = [f for f, r in zip(failures, recipients, strict=True)
                if wants(r.notify, FAILURE)]
        if not message.is_bounce and not told:
            log.info("%s no DSN: NOTIFY of the bounced recipients does not ask for one",
                     message.id)
        elif not message.is_bounce:
            dsn = await self._in_thread(build_dsn, message, told, me=self.server.me)
            answer = await self.server.plugins.call_first(
                "bounce", message=message, recipients=recipients, dsn=dsn)
            if isinstance(answer, bytes):
                dsn = answer
            if isinstance(answer, Result) and not answer.is_ok:
                # A plugin failed while judging the bounce (the log has why): send our
                # own DSN, so the sender still hears of it.
                answer = None
            if answer is None or isinstance(answer, bytes):
                queued = await self._submit_notice(message, dsn)
                log.info("%s DSN queued as %s for <%s>", message.id, queued.id,
                         message.sender)
        elif message.requiretls and any(f.status in REQUIRETLS_STATUSES for f in failures):
            await self._notice_without_requiretls(message)
        else:
            log.warning("%s is itself a bounce: dropping it (no errors about errors)",
                        message.id)
        await self._record(message, JournalEvent(
            rcpt=tuple(r.index for r in bounced), state=BOUNCED,
            reply="; ".join(f.diagnostic for f in failures)[:500],
            enhanced=failures[0].status), durable=True, settles=settles)

    async def _notice_without_requiretls(self, notice: QueuedMessage) -> None:
        """A notice about a REQUIRETLS message could not go back with REQUIRETLS: once
        more without it, and without the header it was protecting
        (``[notices] fallback``)."""
        if not requiretls_settings(self.server.config).redact_notices:
            log.warning("%s: a notice that could not be delivered with REQUIRETLS: "
                        "dropped ([notices] fallback = drop)", notice.id)
            return
        try:
            text = await self._in_thread(notice.read)
        except SpoolError as exc:
            log.error("%s: cannot read the notice to redact it: %s", notice.id, exc)
            return
        try:
            redacted = await self._in_thread(redact_notice, text, me=self.server.me)
        except ValueError:
            # A notice some client relayed to us with REQUIRETLS, not one of ours: there
            # is no report in it to keep.
            log.warning("%s: a REQUIRETLS notice that is not ours could not go back with "
                        "REQUIRETLS: dropped", notice.id)
            return
        queued = await self.submit("", [r.address for r in notice.recipients], redacted,
                                   notify=[NEVER] * len(notice.recipients))
        log.info("%s: a notice that could not be delivered with REQUIRETLS; sent again "
                 "without it and without the original header, as %s", notice.id, queued.id)

    async def _maybe_warn(self, message: QueuedMessage, retry: list[int], why: str,
                          lifetime: float) -> None:
        warning = self.settings.delay_warning
        if (not warning or message.warned or message.is_bounce
                or self.clock.time() - message.arrival < warning):
            return
        failures = [Failure(message.recipients[i].address, "4.4.7", why,
                            orcpt=message.recipients[i].orcpt)
                    for i in retry if wants(message.recipients[i].notify, DELAY)]
        if failures:
            dsn = await self._in_thread(build_dsn, message, failures, me=self.server.me,
                                        delayed=True, retry_until=message.arrival + lifetime)
            await self._submit_notice(message, dsn)
        await self._record(message, JournalEvent(warned=True), durable=True)

    async def _domain_done(self, message: QueuedMessage, domain: str) -> None:
        self._jobs.pop((message.id, domain), None)
        domains = self._open_domains.get(message.id)
        if domains is None:
            return
        domains.discard(domain)
        if not domains:
            del self._open_domains[message.id]
            self._arrivals.pop(message.id, None)
            # Another domain's job may have written the journal this copy has not seen.
            journal = message.journaled or len({r.domain for r in message.recipients}) > 1
            # In a thread: an unlink on ext4 takes a fifth of a millisecond, which the
            # event loop would otherwise stand still for.
            await self._in_thread(self.spool.remove, message.id, journal=journal)
            log.info("%s done: removed from the spool", message.id)


def _requiretls_marker(message: QueuedMessage, outcome: Outcome) -> str:
    """The delivery log's word on REQUIRETLS, in Postfix's form: `` requiretls`` when it
    was met, `` requiretls:exempt`` for a route to this machine, `` !requiretls:<why>``
    when it kept the mail back; empty for other mail."""
    if not message.requiretls:
        return ""
    if outcome.requiretls_met:
        return " requiretls"
    if outcome.requiretls_exempt:
        return " requiretls:exempt"
    why = outcome.requiretls_why
    if not why and outcome.tls_failure is not None:
        failure = outcome.tls_failure
        why = failure.code if failure.code == "requiretls-not-offered" else \
            failure.result_type.value
    return f" !requiretls:{why or 'not-delivered'}"


def _dsn_request(message: QueuedMessage, indexes: list[int]) -> DsnRequest | None:
    """The DSN parameters to pass on for these recipients; ``None`` when the sender gave
    none (then none are sent)."""
    recipients = [message.recipients[i] for i in indexes]
    if not (message.ret or message.envid or any(r.notify or r.orcpt for r in recipients)):
        return None
    return DsnRequest(message.ret, message.envid, tuple(r.notify for r in recipients),
                      tuple(r.orcpt for r in recipients))
