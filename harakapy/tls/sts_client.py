"""The MTA-STS client: which policy applies to a policy domain now (RFC 8461 3.3, 5.1).

Rules:

1. A valid cached policy is applied as it is; its TXT record is looked at again at most
   every ``check_interval`` seconds. A changed ``id`` means fetch; the same ``id`` means
   nothing new (the policy's lifetime still runs from its last fetch).
2. Nothing replaces a valid cached policy but its expiry or a newly fetched one
   (invariant 8): a failed TXT lookup, a missing TXT record, a failed or invalid fetch all
   leave it applied, and the failure is given with it, for the log and the report. A
   ``mode: none`` policy is cached like any other (RFC 8461 8.3): it ends an enforce
   policy, and nothing applies until the TXT ``id`` changes.
3. A failed fetch for an ``id`` is not tried again for ``retry_after`` seconds (RFC 8461
   3.3: five minutes); meanwhile the failure stands.
4. With nothing cached: no STS record is no policy; a failed fetch is no policy with the
   failure (RFC 8461 3.3: deliver as if the domain had none); a failed TXT lookup (SERVFAIL,
   timeout) asks the caller to wait (``defer``), as any DNS failure does (invariant 3).
5. A refresh fetches a cached policy again whatever its TXT record says, and also when
   the record is gone, broken or cannot be read (RFC 8461 10.2), under the ``id`` it has.
6. In a fleet (``config/redis.ini``) the cache is the newer of the node's copy and the
   fleet's (:class:`SharedPolicies`, harakapy.fleet.sts): what one node fetched or
   checked, the others apply without asking DNS or the policy host again; a fetch
   takes the fleet's turn for the domain, and a node that waited for the turn takes
   the answer it finds. Redis being down leaves the node's own copy in charge.

The cache, the resolver and the clock are given; the HTTPS fetch is ``sts_fetch``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from harakapy import metrics
from harakapy.clock import Clock
from harakapy.dns import DnsError, Resolver
from harakapy.tls.mta_sts import NoRecord, StsError, StsPolicy, select_record
from harakapy.tls.results import Failure, ResultType
from harakapy.tls.sts_fetch import FetchError, fetch_policy, policy_host_context
from harakapy.tls.sts_store import CachedPolicy, PolicyStore, SharedPolicies, newer

log = logging.getLogger("harakapy.mta_sts")

# A cached policy's TXT record is read at most this often for mail that waits.
RECHECK_INTERVAL = 60.0
# "Mail went to the domain" is written to the cache at most this often per domain: the
# refresh needs days, not every message.
USE_RESOLUTION = 60.0
# Answers kept in memory at most, per process.
MEMORY_LIMIT = 50_000


@dataclass(frozen=True, slots=True)
class StsSettings:
    """How the client fetches and how often it looks again.

    :param ca_file: Trust anchors for policy hosts; ``None`` for the system's.
    :param port: The policy hosts' HTTPS port.
    :param connect_timeout: Seconds for TCP and TLS to a policy host.
    :param timeout: Seconds for a whole fetch.
    :param retry_after: Seconds before a failed ``id`` is fetched again.
    :param check_interval: Seconds between looks at the TXT record of a cached policy.
    """

    ca_file: Path | None = None
    port: int = 443
    connect_timeout: float = 10.0
    timeout: float = 60.0
    retry_after: float = 300.0
    check_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class StsAnswer:
    """What applies to the domain now.

    :ivar policy: The domain's policy; ``None`` for none (a ``mode: none`` policy also
        means that none applies).
    :ivar failure: Why the latest look went wrong, if it did (reported even when a cached
        policy still applies).
    :ivar defer: Nothing is known and the TXT lookup failed: the mail waits (rule 4).
    :ivar entry: The cache entry behind the answer, for ``harakapy tls-policy``.
    :ivar attempted: ``failure`` comes from a lookup or fetch made for this answer, not
        from an earlier one that still stands.
    :ivar fetched: The policy was fetched from the policy host for this answer.
    """

    policy: StsPolicy | None = None
    failure: Failure | None = None
    defer: bool = False
    entry: CachedPolicy | None = None
    attempted: bool = False
    fetched: bool = False


class StsClient:
    """Policies for policy domains, from the cache, DNS and the policy hosts.

    :param resolver: For ``_mta-sts`` TXT records and the policy hosts.
    :param store: The cache (blocking calls: run in a thread here).
    :param clock: For expiry, checks and back-off.
    :param settings: See :class:`StsSettings`.
    :param fleet: The fleet's shared cache (rule 6), if there is a fleet.
    """

    def __init__(self, resolver: Resolver, store: PolicyStore, clock: Clock,
                 settings: StsSettings, fleet: SharedPolicies | None = None) -> None:
        self.resolver = resolver
        self.store = store
        self.clock = clock
        self.settings = settings
        self.fleet = fleet
        self._context = policy_host_context(settings.ca_file)
        self._locks: dict[str, asyncio.Lock] = {}
        self._seen: dict[str, _Seen] = {}

    async def lookup(self, domain: str, *, recheck: bool = False,
                     use: bool = True) -> StsAnswer:
        """The policy for mail to ``domain`` now (rules 1 to 4); notes the use.

        An answer is kept in memory for as long as it would stand in the cache (a valid
        policy until its TXT record is due, no policy until ``check_interval`` has
        passed), so that mail to a domain costs no file read, no parsing and no DNS query
        in between.

        :param recheck: Read the TXT record even within ``check_interval`` (at most once
            a minute): for mail that is waiting, which RFC 8461 5.1 wants checked against
            a changed policy before it bounces.
        :param use: Mail goes to the domain (``False`` for a diagnosis): noted for the
            refresh, which renews only what mail uses.
        """
        interval = min(self.settings.check_interval, RECHECK_INTERVAL) if recheck \
            else self.settings.check_interval
        now = self.clock.time()
        seen = self._seen.get(domain)
        if seen is not None and seen.stands(now, interval):
            if use and seen.answer.entry is not None and now - seen.used >= USE_RESOLUTION:
                seen.used = now
                await asyncio.to_thread(self.store.touch, domain, now)
            metrics.sts_lookup(cached=True)
            return seen.answer
        metrics.sts_lookup(cached=False)
        async with self._locks.setdefault(domain, asyncio.Lock()):  # one fetch at a time
            now = self.clock.time()
            entry = await self.current(domain)
            if use and entry is not None and now - entry.used >= USE_RESOLUTION:
                entry = replace(entry, used=now)
                await asyncio.to_thread(self.store.touch, domain, now)
            if entry is not None and entry.valid_at(now) and now - entry.checked < interval:
                answer = self._cached(entry, now, _failure_of(entry.error))  # it stands
            else:
                answer = await self._discover(domain, entry, now, force=False,
                                              used=now if use else 0.0)
            return self._remember(domain, answer, now)

    async def refresh(self, domain: str) -> StsAnswer:
        """Look at the TXT record and fetch the policy now, whatever its ``id`` says (the
        proactive refresh, ``harakapy mta-sts refresh``); the 5-minute back-off holds.

        A cached policy is fetched again even when its TXT record is gone, broken or
        cannot be read (RFC 8461 10.2: refresh regardless of the record), under the
        ``id`` it has.
        """
        async with self._locks.setdefault(domain, asyncio.Lock()):
            now = self.clock.time()
            entry = await self.current(domain)
            answer = await self._discover(domain, entry, now, force=True)
            return self._remember(domain, answer, now)

    async def current(self, domain: str) -> CachedPolicy | None:
        """The cache entry for ``domain``: the node's, or the fleet's when that is newer
        (rule 6), which then becomes the node's; the node's goes to the fleet when the
        fleet has none as new (a fetch made while Redis was away)."""
        mine = await asyncio.to_thread(self.store.get, domain)
        if self.fleet is None:
            return mine
        reached, theirs = await self.fleet.shared(domain)
        if not reached:
            return mine
        newest = newer(mine, theirs)
        if newest is theirs and theirs is not None:
            newest = replace(theirs, used=mine.used if mine is not None else 0.0)
            await asyncio.to_thread(self.store.put, newest)
        elif newest is not None and (theirs is None or (theirs.fetched, theirs.checked)
                                     != (newest.fetched, newest.checked)):
            await self._share(newest)
        return newest

    async def _keep(self, entry: CachedPolicy) -> None:
        """Store ``entry`` here and, in a fleet, for the fleet."""
        await asyncio.to_thread(self.store.put, entry)
        await self._share(entry)

    async def _share(self, entry: CachedPolicy) -> None:
        if self.fleet is not None:
            # Not shared now (Redis away): current() shares it once Redis is back.
            await self.fleet.publish(entry, self.clock.time())

    def _remember(self, domain: str, answer: StsAnswer, now: float) -> StsAnswer:
        if len(self._seen) >= MEMORY_LIMIT:
            # Mail to many domains: what no longer stands is read again anyway.
            interval = self.settings.check_interval
            self._seen = {name: seen for name, seen in self._seen.items()
                          if seen.stands(now, interval)}
            if len(self._seen) >= MEMORY_LIMIT:
                self._seen.clear()
        if answer.defer:
            self._seen.pop(domain, None)  # nothing known: ask again next time
        else:
            # A valid policy stands until its TXT record is due; one whose TXT lookup just
            # failed, and no policy, until check_interval from now.
            looked = answer.entry.checked if (answer.policy is not None and answer.entry
                                              and answer.failure is None) else now
            self._seen[domain] = _Seen(replace(answer, attempted=False), looked, now)
        return answer

    def _cached(self, entry: CachedPolicy | None, now: float,
                failure: Failure | None = None) -> StsAnswer:
        if entry is not None and entry.valid_at(now):
            return StsAnswer(entry.policy(), failure, entry=entry)
        return StsAnswer(None, failure, entry=entry)

    async def _discover(self, domain: str, entry: CachedPolicy | None, now: float, *,
                        force: bool, used: float = 0.0) -> StsAnswer:
        cached = entry is not None and entry.valid_at(now)
        try:
            texts = await self.resolver.txt(f"_mta-sts.{domain}")
        except DnsError as exc:
            failure = Failure(ResultType.STS_POLICY_FETCH_ERROR, exc.reason)
            if cached and force:
                return await self._refetch(domain, entry, now, used)
            if cached:
                return self._cached(entry, now, failure)
            log.warning("MTA-STS: %s: %s; the mail waits", domain, failure.reason)
            return StsAnswer(None, failure, defer=True, entry=entry, attempted=True)
        try:
            record = select_record(texts)
        except NoRecord:
            # RFC 8461 3.1: no record does not evict a cached policy.
            if cached and force:
                return await self._refetch(domain, entry, now, used)
            return self._cached(entry, now)
        except StsError as exc:
            # Nor does a broken one; with nothing cached it is no policy, and reported.
            failure = Failure(ResultType.STS_POLICY_INVALID,
                              f"_mta-sts.{domain} TXT: {exc.reason}")
            if cached and force:
                return await self._refetch(domain, entry, now, used)
            if cached:
                log.info("MTA-STS: %s: %s; the cached policy applies", domain,
                         failure.reason)
                return self._cached(entry, now)
            log.warning("MTA-STS: %s: %s; no policy applies", domain, failure.reason)
            return StsAnswer(None, failure, entry=entry, attempted=True)
        if (not force and entry is not None and entry.valid_at(now)
                and entry.record_id == record.id):
            checked = replace(entry, checked=now)
            await self._keep(checked)
            return self._cached(checked, now)
        if entry is not None and not entry.retry_allowed(record.id, now):
            return self._cached(entry, now, _failure_of(entry.error))
        return await self._fetch(domain, entry, record.id, now, used)

    async def _refetch(self, domain: str, entry: CachedPolicy, now: float,
                       used: float) -> StsAnswer:
        """The refresh of a cached policy whose TXT record says nothing usable."""
        if not entry.retry_allowed(entry.record_id, now):
            return self._cached(entry, now, _failure_of(entry.error))
        return await self._fetch(domain, entry, entry.record_id, now, used)

    async def _fetch(self, domain: str, entry: CachedPolicy | None, record_id: str,
                     now: float, used: float = 0.0) -> StsAnswer:
        if self.fleet is None:
            return await self._fetch_now(domain, entry, record_id, now, used)
        async with self.fleet.turn(domain):
            latest = await self.current(domain)
            if latest is not None and newer(entry, latest) is latest and latest != entry:
                # Another node fetched (or failed to) while this one decided to: its
                # answer stands for the whole fleet.
                if latest.failed_id == record_id and not latest.retry_allowed(record_id,
                                                                              now):
                    return self._cached(latest, now, _failure_of(latest.error))
                if latest.record_id == record_id and latest.valid_at(now):
                    return self._cached(latest, now)
            return await self._fetch_now(domain, latest or entry, record_id,
                                         self.clock.time(), used)

    async def _fetch_now(self, domain: str, entry: CachedPolicy | None, record_id: str,
                         now: float, used: float = 0.0) -> StsAnswer:
        try:
            fetched = await fetch_policy(
                domain, resolver=self.resolver, context=self._context,
                port=self.settings.port, connect_timeout=self.settings.connect_timeout,
                timeout=self.settings.timeout)
        except FetchError as exc:
            metrics.sts_fetch(ok=False)
            failure = Failure(exc.result_type, exc.reason)
            noted = (entry or CachedPolicy(domain, used=used or now)).failed_now(
                record_id, f"{exc.result_type.value}: {exc.reason}", now,
                self.settings.retry_after)
            await self._keep(noted)
            log.warning("MTA-STS: %s: %s%s", domain, exc,
                        "; the cached policy still applies" if noted.valid_at(now) else "")
            return replace(self._cached(noted, now, failure), attempted=True)
        metrics.sts_fetch(ok=True)
        policy = fetched.policy
        # A none policy is cached like any other (RFC 8461 8.3): it replaces what was
        # there, and the domain has no policy until its TXT id changes.
        fresh = (entry or CachedPolicy(domain, used=used)).fetched_now(
            _body(policy), policy, record_id, now)
        await self._keep(fresh)
        log.info("MTA-STS: %s: policy %s fetched (mode %s, max_age %d)", domain, record_id,
                 policy.mode.value, policy.max_age)
        return StsAnswer(policy, entry=fresh, fetched=True)


@dataclass(slots=True)
class _Seen:
    """An answer kept in memory: ``looked`` is when its TXT record was last read."""

    answer: StsAnswer
    looked: float
    used: float

    def stands(self, now: float, interval: float) -> bool:
        entry = self.answer.entry
        if self.answer.policy is not None and (entry is None or not entry.valid_at(now)):
            return False  # expired
        return now - self.looked < interval


def _body(policy: StsPolicy) -> bytes:
    """The policy as it came, lines joined: what the store keeps (the fetch's own line
    ends do not matter to the grammar)."""
    return ("\n".join(policy.lines) + "\n").encode()


def _failure_of(error: str) -> Failure | None:
    """The stored ``result-type: reason`` as a failure again."""
    kind, _, reason = error.partition(": ")
    try:
        return Failure(ResultType(kind), reason) if error else None
    except ValueError:
        return Failure(ResultType.STS_POLICY_FETCH_ERROR, error)
