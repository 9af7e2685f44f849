"""Destinations suspended fleet-wide (``config/redis.ini [destinations] share``, off by
default): a destination none of whose hosts answered one node waits on every node.

Rules:

1. A node's queue that suspends a destination (harakapy.outbound.queue: no host
   answered) publishes ``{"node", "domain", "until"}`` on ``PREFIX dest:suspended``.
2. Every process of every node subscribes, and suspends the destination in its own queue
   until the same time; its own suspensions it hears back are ignored.
3. Publish and subscribe, Redis's pub/sub: nothing is stored, nothing waits on it, and
   nothing is asked of Redis per message; what is missed in an outage is only a
   suspension each node then finds for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from harakapy.fleet.errors import FleetDown

if TYPE_CHECKING:
    from harakapy.fleet.link import RedisLink

log = logging.getLogger("harakapy.fleet")

RESUBSCRIBE = 5.0  # seconds between tries while Redis is away


class SharedSuspensions:
    """Rules 1 to 3 for one process.

    :param suspend: The queue's ``suspend(domain, until)``.
    """

    def __init__(self, link: RedisLink, suspend: Callable[[str, float], None]) -> None:
        self.link = link
        self.suspend = suspend
        self.channel = link.key("dest", "suspended")
        self._sending: set[asyncio.Task[None]] = set()

    def suspended(self, domain: str, until: float) -> None:
        """Rule 1, in the background (the queue must not wait)."""
        message = json.dumps({"node": self.link.node, "domain": domain, "until": until})
        task = asyncio.get_running_loop().create_task(self._publish(message))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, message: str) -> None:
        with contextlib.suppress(FleetDown):  # rule 3
            await self.link.run(lambda client: client.publish(self.channel, message))

    def heard(self, raw: bytes | str) -> None:
        """Rule 2, for one message."""
        try:
            data = json.loads(raw)
            node, domain, until = str(data["node"]), str(data["domain"]), float(data["until"])
        except (ValueError, KeyError, TypeError):
            return
        if node != self.link.node:
            self.suspend(domain, until)
            log.info("fleet: %s suspended by %s until %.0f: none of its hosts answered "
                     "there", domain, node, until)

    async def listen(self) -> None:
        """Rule 2, until cancelled; across outages."""
        while True:
            try:
                pubsub = self.link.client().pubsub(ignore_subscribe_messages=True)
                try:
                    await self.link.run(lambda _client, p=pubsub: p.subscribe(self.channel))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.heard(message["data"])
                finally:
                    await pubsub.aclose()
            except FleetDown:
                pass
            except Exception as exc:  # a dropped subscription: subscribe again
                log.debug("fleet: the suspensions' subscription ended: %s", exc)
            await asyncio.sleep(RESUBSCRIBE)
