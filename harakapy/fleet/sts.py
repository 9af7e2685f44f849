"""The fleet's MTA-STS policy cache in Redis, beside each node's own SQLite copy.

Rules:

1. An entry is shared as it is cached (:class:`CachedPolicy` without ``used``, which is
   each node's own), under ``PREFIX sts:policy:DOMAIN``, until a while after it expires.
2. The newer of two copies is the one fetched later, then checked later. A write never
   replaces a newer shared copy (a script compares and sets in one step), so nodes that
   fetched at once, or a node that kept its copy through an outage, cannot roll the
   shared one back.
3. One node fetches a domain at a time: it holds ``PREFIX sts:fetching:DOMAIN`` for at
   most a fetch's whole timeout; the others wait for the key (``LONGEST_WAIT`` at most,
   then they fetch for themselves), then look at the shared copy, which by then holds
   its answer. A holder that dies frees the key when it lapses.
4. Redis being down never stops anything: the turn is granted at once and each node
   fetches for itself, with its local copy standing; nothing here raises for it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from harakapy.fleet.errors import FleetDown
from harakapy.tls.sts_store import CachedPolicy

if TYPE_CHECKING:
    from harakapy.fleet.link import RedisLink

POLL = 0.05  # seconds between looks at a turn another node holds
# A delivery waits this long at most for another node's fetch, then fetches itself: the
# hook it runs in has plugin_timeout (30 s by default) to answer.
LONGEST_WAIT = 20.0

_PUBLISH = """
local current = redis.call('GET', KEYS[1])
if current then
  local old = cjson.decode(current)
  local fetched, checked = tonumber(ARGV[2]), tonumber(ARGV[3])
  if old.fetched > fetched or (old.fetched == fetched and old.checked >= checked) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
"""


class StsFleet:
    """Rules 1 to 3 for one node.

    :param link: The node's Redis link.
    :param hold: Seconds a fetch may take at most: how long a turn is held.
    :param keep: Seconds a shared entry is kept past its expiry (``forget_after``).
    """

    def __init__(self, link: RedisLink, *, hold: float, keep: float) -> None:
        self.link = link
        self.hold = hold
        self.keep = keep
        self._publish = link.client().register_script(_PUBLISH)

    def _key(self, kind: str, domain: str) -> str:
        return self.link.key("sts", kind, domain)

    async def shared(self, domain: str) -> tuple[bool, CachedPolicy | None]:
        """``(reached, entry)``: whether Redis answered, and the fleet's copy of
        ``domain``'s entry if it has one."""
        try:
            raw = await self.link.run(lambda client: client.get(
                self._key("policy", domain)))
        except FleetDown:
            return False, None
        if raw is None:
            return True, None
        try:
            data = json.loads(raw)
            return True, CachedPolicy(
                domain, base64.b64decode(data["body"]), data["record_id"], data["fetched"],
                data["expires"], data["checked"], 0.0, data["error"], data["failed_id"],
                data["retry_after"])
        except (ValueError, KeyError, TypeError):
            return True, None  # not ours to read: the next write replaces it

    async def publish(self, entry: CachedPolicy, now: float) -> bool:
        """Share ``entry`` unless the fleet has a newer copy (rule 2); whether it did
        (not when Redis cannot be reached)."""
        text = json.dumps({
            "body": base64.b64encode(entry.body).decode(), "record_id": entry.record_id,
            "fetched": entry.fetched, "expires": entry.expires, "checked": entry.checked,
            "error": entry.error, "failed_id": entry.failed_id,
            "retry_after": entry.retry_after})
        until = max(entry.expires, entry.retry_after, entry.checked, now) + self.keep
        ttl = max(1000, int((until - now) * 1000))
        try:
            done = await self.link.run(lambda client: self._publish(
                keys=[self._key("policy", entry.domain)],
                args=[text, repr(entry.fetched), repr(entry.checked), ttl], client=client))
        except FleetDown:
            return False
        return bool(done)

    async def forget(self, domain: str) -> None:
        await self.link.run(lambda client: client.delete(self._key("policy", domain)))

    @asynccontextmanager
    async def turn(self, domain: str) -> AsyncIterator[bool]:
        """Rule 3: hold the domain's turn to fetch, waiting while another node holds it;
        yields whether the turn is this node's (``False``: Redis is down, rule 4)."""
        from harakapy.fleet.link import Hold

        hold = Hold(self.link, self._key("fetching", domain), self.hold)
        deadline = time.monotonic() + min(self.hold, LONGEST_WAIT)
        try:
            while True:
                try:
                    if await hold.take() or time.monotonic() >= deadline:
                        break
                except FleetDown:
                    break
                await asyncio.sleep(POLL)
            yield hold.held
        finally:
            await hold.release()
