"""What the ``mta_sts`` plugin does, in one place that the plugin and the ``harakapy
mta-sts`` and ``tls-policy`` commands share.

Rules:

1. The policy domain is the next hop: the recipient domain for mail that goes by MX
   records, the routed host for mail a ``get_mx`` plugin routed; never a parent zone.
2. A policy applies as :meth:`StsPolicy.policy` builds it (``verify`` with the host's
   own name, the ``mx`` patterns, ``enforce`` from the mode or ``[domain NAME] apply``).
3. Nothing known and the TXT lookup failed: the mail waits (invariant 3). Nothing known
   and the fetch failed: the policy the plugins after this one (or the default) give,
   with the failure attached for the session's report (RFC 8461 3.3: deliver as if the
   domain had no policy).
4. The refresh renews every cached policy that mail went to within ``idle_after`` once
   it is ``after`` old or half way through its ``max_age``, each domain a little early
   by its own jitter so that policies fetched together are not refreshed together;
   entries expired and unused for ``forget_after`` are removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.dns import Resolver
from harakapy.fleet import fleet_link
from harakapy.fleet.sts import StsFleet
from harakapy.outbound.mx import MxHost
from harakapy.outbound.tls_policy import tls_settings
from harakapy.results import Result, denysoft
from harakapy.spool.store import QueuedMessage
from harakapy.tls.mta_sts import STS, Mode
from harakapy.tls.policy import Policy, PolicySource
from harakapy.tls.sts_client import StsAnswer, StsClient
from harakapy.tls.sts_config import Apply, Published, StsConfig
from harakapy.tls.sts_publish import PolicyServer
from harakapy.tls.sts_store import CachedPolicy, PolicyStore, SqliteStore

log = logging.getLogger("harakapy.mta_sts")

CACHE_NAME = "policies.sqlite"
STATE_FOLDER = "mta_sts"  # the plugin's state folder, DIR/state/mta_sts
JITTER = 0.1  # a refresh comes up to this share of its wait early, per domain
PUBLISHED_MX_TTL = 300.0


def sts_config(config: Config) -> StsConfig:
    """``config/mta_sts.ini``, checked, with ``[outbound] ca_file`` of ``tls.ini``."""
    return config.derive("mta_sts.config", lambda c: StsConfig.from_config(
        c, tls_settings(c).ca_file, tls_settings(c).min_version))


def sts_fleet(config: Config, settings: StsConfig) -> StsFleet | None:
    """The fleet's shared cache, when ``config/redis.ini`` names a fleet that shares it."""
    link = fleet_link(config)
    if link is None or not link.settings.share_mta_sts:
        return None
    client = settings.client
    return StsFleet(link, hold=client.connect_timeout + client.timeout + 5.0,
                    keep=settings.refresh.forget_after)


def cache_path(config: Config) -> Path:
    """Where the policy cache is: ``[main] cache``, else the plugin's state folder."""
    configured = sts_config(config).cache
    if configured is not None:
        return configured
    folder = config.state_dir() / STATE_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / CACHE_NAME


class MtaSts:
    """The MTA-STS client as the server runs it: policies for delivery, the refresh, and
    our own published policies.

    :param config: ``config/mta_sts.ini``.
    :param store: The policy cache.
    :param resolver: For TXT, MX and the policy hosts' addresses.
    :param clock: For expiry, refresh and back-off.
    """

    def __init__(self, config: StsConfig, store: PolicyStore, resolver: Resolver,
                 clock: Clock, fleet: StsFleet | None = None) -> None:
        self.config = config
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self.client = StsClient(resolver, store, clock, config.client, fleet)
        self._published_mx: dict[str, tuple[float, tuple[str, ...]]] = {}

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver, clock: Clock) -> MtaSts:
        """One per config generation and process (the cache file is shared; so is the
        fleet's, when ``config/redis.ini`` names one)."""
        settings = sts_config(config)
        return cls(settings, SqliteStore(cache_path(config)), resolver, clock,
                   sts_fleet(config, settings))

    @staticmethod
    def check_config(config: Config) -> StsConfig:
        """``config/mta_sts.ini``, parsed; raises :class:`ConfigError` naming the line."""
        return sts_config(config)

    # -- delivery -------------------------------------------------------------------------

    async def tls_policy(self, domain: str, hosts: list[MxHost], *, routed: bool,
                         message: QueuedMessage | None,
                         next_policy: Callable[[], Awaitable[Policy]]
                         ) -> Policy | Result | None:
        """The ``tls_policy`` answer for mail to ``domain`` (rules 1 to 3).

        :param next_policy: What the plugins after this one decide.
        """
        policy_domain = nexthop_of(domain, hosts, routed=routed)
        if not policy_domain:
            return None
        apply = self.config.apply_for(policy_domain)
        if apply is Apply.IGNORE:
            return None
        waiting = message is not None and message.attempts.get(domain, 0) > 0
        answer = await self.client.lookup(policy_domain, recheck=waiting,
                                          use=message is not None)
        if answer.defer:
            assert answer.failure is not None
            return denysoft(f"the MTA-STS policy of {policy_domain} is not known: "
                            f"{answer.failure.reason}", enhanced="4.7.0")
        if answer.policy is None:
            if answer.failure is None:
                return None
            base = await next_policy()
            return replace(base, source=PolicySource(STS, policy_domain),
                           discovery_failure=answer.failure,
                           reason=f"{base.reason}; no MTA-STS policy of {policy_domain} "
                                  f"could be fetched ({answer.failure.reason})")
        policy = answer.policy.policy(policy_domain,
                                      enforce=True if apply is Apply.ENFORCE else None)
        if policy is None:
            return None  # mode: none
        # RFC 8461 4.2 (and 3.3): TLS 1.2 at least, whatever [outbound] min_version says;
        # a stricter min_version stands.
        policy = replace(policy, min_protocol=max(self.config.min_version,
                                                  ssl.TLSVersion.TLSv1_2))
        if answer.failure is not None and answer.attempted:
            policy = replace(policy, discovery_failure=answer.failure)
        return policy

    # -- the cache --------------------------------------------------------------------------

    async def lookup(self, domain: str) -> StsAnswer:
        return await self.client.lookup(domain)

    async def refresh(self, domain: str) -> StsAnswer:
        """Fetch ``domain``'s policy now (``harakapy mta-sts refresh``)."""
        return await self.client.refresh(domain)

    async def entries(self) -> list[CachedPolicy]:
        return await asyncio.to_thread(self.store.entries)

    async def entry(self, domain: str) -> CachedPolicy | None:
        return await asyncio.to_thread(self.store.get, domain)

    def refresh_due(self, entry: CachedPolicy, now: float) -> bool:
        """Whether the refresh renews ``entry`` now (rule 4)."""
        settings = self.config.refresh
        if not entry.valid_at(now) or now - entry.used > settings.idle_after:
            return False
        wait = min(settings.after, (entry.expires - entry.fetched) / 2)
        return now - entry.fetched >= wait * (1 - JITTER * _spread(entry.domain))

    def forgettable(self, entry: CachedPolicy, now: float) -> bool:
        return not entry.valid_at(now) and now - entry.used > self.config.refresh.forget_after

    async def refresh_pass(self) -> list[StsAnswer]:
        """One look over the cache: renew what is due, forget what is long dead."""
        now = self.clock.time()
        answers = []
        for entry in await self.entries():
            if self.forgettable(entry, now):
                await asyncio.to_thread(self.store.delete, entry.domain)
                log.info("MTA-STS: %s: expired and unused, removed from the cache",
                         entry.domain)
            elif self.refresh_due(entry, now):
                # Another node of a fleet may have renewed it meanwhile.
                current = await self.client.current(entry.domain)
                if current is not None and self.refresh_due(current, now):
                    answers.append(await self.client.refresh(entry.domain))
        return answers

    async def run_refresh(self) -> None:
        """The refresh, forever (a background task)."""
        while True:
            await self.refresh_pass()
            await self.clock.sleep(self.config.refresh.interval)

    # -- our own domains ----------------------------------------------------------------

    async def published_mx(self, published: Published) -> tuple[str, ...]:
        """The ``mx`` lines of a policy of ours: configured, else the domain's MX hosts.

        :raises DnsError: they come from DNS, and DNS failed.
        """
        if published.mx:
            return published.mx
        now = self.clock.time()
        cached = self._published_mx.get(published.domain)
        if cached is not None and now - cached[0] < PUBLISHED_MX_TTL:
            return cached[1]
        hosts = tuple(dict.fromkeys(name.rstrip(".").lower() for _, name in
                                    sorted(await self.resolver.mx(published.domain))))
        self._published_mx[published.domain] = (now, hosts)
        return hosts

    async def published_policy(self, domain: str) -> bytes | None:
        """The policy file we serve for ``domain``; ``None`` when it is not ours.

        :raises DnsError: the MX hosts come from DNS, and DNS failed.
        """
        published = self.config.published.get(domain)
        if published is None:
            return None
        return policy_text(published, await self.published_mx(published))

    async def serve(self) -> None:
        """The HTTPS listener of ``[listen]``, until cancelled; nothing without one."""
        listener = self.config.listener
        if listener is None:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(listener.cert, listener.key)
        server = PolicyServer(self.published_policy, context)
        await server.start(listener.host, listener.port)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            close()


def nexthop_of(domain: str, hosts: list[MxHost], *, routed: bool) -> str:
    """The policy domain (rule 1): for routed mail the route's host name, without
    brackets; an IP address has no policy."""
    if not routed:
        return domain
    if not hosts:
        return ""
    name = hosts[0].hostname.strip("[]").rstrip(".").lower()
    if not name or name.replace(".", "").isdigit() or ":" in name:
        return ""
    return name


def policy_text(published: Published, mx: tuple[str, ...]) -> bytes:
    """A policy file (RFC 8461 3.2), CRLF line ends."""
    lines = ["version: STSv1", f"mode: {published.mode.value}"]
    if published.mode is not Mode.NONE:
        lines += [f"mx: {pattern}" for pattern in mx]
    lines.append(f"max_age: {published.max_age}")
    return "".join(f"{line}\r\n" for line in lines).encode()


def policy_id(text: bytes) -> str:
    """The TXT ``id`` for a policy: its digest, so that every change of the policy
    changes the ``id`` (RFC 8461 3.1 asks for that)."""
    return hashlib.sha256(text).hexdigest()[:20]


def _spread(domain: str) -> float:
    """A number in [0, 1) that is the same for a domain every time."""
    return int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4]) / 2**32

