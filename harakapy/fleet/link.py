"""One node's connection to the fleet's Redis, and what an outage looks like from here.

Rules:

1. Every Redis call goes through :meth:`RedisLink.run`. A call that cannot reach Redis
   (refused, reset, timed out, credentials refused) raises :class:`FleetDown`, and the
   link is taken for down: calls in the next second fail at once, without waiting for
   a timeout, and the wait doubles up to 15 seconds while Redis stays away. Callers go
   on with their local copies (invariant 8); nothing waits on Redis.
2. The outage and the return are logged once each, not per call.
3. A command that Redis refuses (out of memory, a failed snapshot, a read-only replica)
   leaves Redis as unusable as an outage does: :class:`FleetError`, a kind of
   :class:`FleetDown` with Redis's words, and the same pause.
4. A :class:`Hold` is a key one node holds for a while (a fetch's turn, a report's
   lease): taken only when free, kept and given back only by the token that took it,
   and lapsing by itself when its holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from harakapy import metrics
from harakapy.fleet.errors import FleetDown, FleetError
from harakapy.fleet.settings import FleetSettings

log = logging.getLogger("harakapy.fleet")

T = TypeVar("T")

FIRST_PAUSE = 1.0
LONGEST_PAUSE = 15.0
_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
                TimeoutError)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RedisLink:
    """The node's client, made on first use in the running event loop.

    :param settings: ``config/redis.ini``.
    """

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self._client: redis.asyncio.Redis | None = None
        self._down_until = 0.0
        self._pause = 0.0
        self._reason = ""

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    @property
    def node(self) -> str:
        return self.settings.node

    @property
    def up(self) -> bool:
        """Whether the last call reached Redis (or none was made yet)."""
        return not self._reason

    def key(self, *parts: str) -> str:
        """A key of the fleet's: the prefix, then the parts joined by ``:``."""
        return self.prefix + ":".join(parts)

    async def run(self, call: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """``call(client)``, or :class:`FleetDown` (rule 1)."""
        if self._reason and time.monotonic() < self._down_until:
            metrics.fleet_call("down", up=False)
            raise FleetDown(self._reason)
        try:
            result = await call(self.client())
        except redis.exceptions.AuthenticationError as exc:
            raise self._down(f"Redis refused the credentials: {exc}") from None
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise self._down(f"Redis refused the credentials: {exc}") from None
            self._down(f"Redis refused a command: {exc}", outcome="error")
            raise FleetError(f"Redis refused a command: {exc}") from None
        except _UNREACHABLE as exc:
            raise self._down(f"{type(exc).__name__}: {exc}" if str(exc)
                             else type(exc).__name__) from None
        metrics.fleet_call("ok", up=True)
        if self._reason:
            log.warning("fleet: Redis (%s) answers again; shared state resumes",
                        self.settings.where)
            self._reason, self._pause = "", 0.0
        return result

    def _down(self, reason: str, outcome: str = "down") -> FleetDown:
        metrics.fleet_call(outcome, up=False)
        if not self._reason:
            log.warning("fleet: Redis (%s) cannot be reached (%s); going on with this "
                        "node's own copies", self.settings.where, reason)
        self._reason = reason
        self._pause = min(LONGEST_PAUSE, max(FIRST_PAUSE, self._pause * 2))
        self._down_until = time.monotonic() + self._pause
        return FleetDown(reason)

    def client(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = connect(self.settings)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class Hold:
    """Rule 4: ``key``, held for ``seconds`` at a time by whoever :meth:`take` s it."""

    def __init__(self, link: RedisLink, key: str, seconds: float) -> None:
        self.link, self.key = link, key
        self.milliseconds = max(1, int(seconds * 1000))
        self.token = f"{link.node} {secrets.token_hex(8)}"
        self.held = False

    async def take(self) -> bool:
        """Take the key if it is free; whether this holds it now.

        :raises FleetDown: Redis cannot be reached.
        """
        self.held = bool(await self.link.run(lambda client: client.set(
            self.key, self.token, nx=True, px=self.milliseconds)))
        return self.held

    async def renew(self) -> bool:
        """Hold it for another while; whether it was still held (Redis down: not)."""
        if self.held:
            try:
                self.held = bool(await self.link.run(lambda client: client.eval(
                    _RENEW, 1, self.key, self.token, self.milliseconds)))
            except FleetDown:
                self.held = False
        return self.held

    async def keep(self) -> None:
        """Renew it a third of the way through each while, for as long as it is held
        (a task of the holder's: when the holder dies, so does this, and it lapses)."""
        while self.held:
            await asyncio.sleep(self.milliseconds / 3000)
            await self.renew()

    async def release(self) -> None:
        """Give it back, if it is still this one's (Redis down: it lapses)."""
        if self.held:
            self.held = False
            with contextlib.suppress(FleetDown):
                await self.link.run(lambda client: client.eval(
                    _RELEASE, 1, self.key, self.token))


def connect(settings: FleetSettings) -> redis.asyncio.Redis:
    """A client for ``settings``: TCP, TLS, a Unix socket or Sentinel."""
    options: dict[str, Any] = {
        "username": settings.username, "password": settings.password,
        "socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout,
        # One retry on a fresh connection: a pooled connection that Redis's restart
        # closed fails its first command; a real outage fails both.
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }
    parsed = urllib.parse.urlsplit(settings.url)
    tls: dict[str, Any] = {}
    if parsed.scheme == "rediss" or (settings.sentinels and settings.ca_file):
        tls = {"ssl_ca_certs": str(settings.ca_file) if settings.ca_file else None,
               "ssl_certfile": str(settings.cert) if settings.cert else None,
               "ssl_keyfile": str(settings.key) if settings.key else None,
               "ssl_cert_reqs": "required"}
    if settings.sentinels:
        from redis.asyncio.sentinel import Sentinel

        db = int(parsed.path.strip("/") or 0)
        sentinel_options = {"password": settings.sentinel_password,
                            "socket_timeout": settings.timeout, **tls}
        if tls:
            sentinel_options["ssl"] = True
            options.update(tls, ssl=True)
        sentinel = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_options,
                            db=db, **options)
        return sentinel.master_for(settings.service)
    return redis.asyncio.Redis.from_url(settings.url, **options, **tls)
