"""The fleet tests' world: a real ``redis-server`` (tests/redis_server.py), three (or
more) harakapy nodes with their own config directories and spools pointed at it, and
the destinations they share: domains with MTA-STS policies on a real HTTPS policy host
that counts its fetches, a receiving MX with certificates from the test's CA, and an
HTTPS collector for the TLS reports those domains ask for (RFC 8460 ``https:`` rua).

The in-process nodes share one :class:`ManualClock`, so that a test moves the whole
fleet to the next UTC day at once; a node in a subprocess runs on the real clock."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import json
from collections.abc import Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import dns.zone
import trustme
from aiohttp import web

from harakapy.tls.tlsrpt_report import report_json
from harakapy.tls.tlsrpt_store import SessionStore
from tests.dns_server import DnsServer
from tests.harness import (
    ManualClock,
    Running,
    advancing,
    eventually,
    running_server,
    sendmail,
)
from tests.outbound_env import RECORDER, Certs, free_port_on_all
from tests.policy_host import PolicyHost, server_context
from tests.redis_server import RedisServer
from tests.servers import ReceivingMTA
from tests.sts_world import policy

MX_IP, POLICY_IP, COLLECTOR_IP = "127.0.0.21", "127.0.0.41", "127.0.0.44"
DEAD_IP = "127.0.0.23"
FLUSH = 1.0  # tlsrpt.ini flush_interval
ROUND = 97.0  # tlsrpt.ini check_interval (a number no other task of the server sleeps)
MAX_DELAY = 3600.0
DAY = 86400.0

HEAD = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
"""


class FleetClock(ManualClock):
    """The fleet's clock; it knows which sleeps are report rounds (``ROUND`` long)."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.rounds: set[asyncio.Future] = set()

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        if seconds == ROUND:
            self.rounds.add(future)
        try:
            await future
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not future]
            self.rounds.discard(future)

    def rounds_asleep(self) -> int:
        return sum(1 for future in self.rounds if not future.done())


def report_delay(day: datetime.date, domain: str) -> float:
    """The sender's delay for a day's report to ``domain`` (harakapy.tlsrpt rule 3)."""
    digest = hashlib.sha256(f"{day}/{domain}".encode()).digest()
    return MAX_DELAY * int.from_bytes(digest[:4]) / 2**32


def midnight_after(moment: float) -> float:
    return (moment // DAY + 1) * DAY


@dataclass
class Collector:
    """The reports' HTTPS endpoint. ``stall_first``: the first POST waits for
    ``release`` before it reads anything, and is dropped if its sender is gone by then."""

    stall_first: bool = False
    started: int = 0
    reports: list[dict] = field(default_factory=list)
    aborted: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: web.Request | None = None

    def stalled_sender_gone(self) -> bool:
        transport = self.stalled.transport if self.stalled is not None else None
        return self.stalled is not None and (transport is None or transport.is_closing())

    async def handle(self, request: web.Request) -> web.Response:
        self.started += 1
        if self.stall_first and self.started == 1:
            self.stalled = request
            try:  # a test that failed before releasing it must not hang the cleanup
                await asyncio.wait_for(self.release.wait(), 30)
            except TimeoutError:
                self.aborted += 1
                return web.Response(status=503)
            if self.stalled_sender_gone():
                self.aborted += 1
                return web.Response(status=499)
        body = await request.read()
        self.reports.append(json.loads(gzip.decompress(body)))
        return web.Response(status=201, text="thank you\n")

    def by_domain(self) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for report in self.reports:
            found.setdefault(report["policies"][0]["policy"]["policy-domain"],
                             []).append(report)
        return found


class FleetWorld:
    """Redis, the destinations and the nodes; everything stops with the test."""

    def __init__(self, stack: AsyncExitStack, tmp_path: Path, domains: Iterable[str],
                 clock_start: float) -> None:
        self.stack, self.tmp_path = stack, tmp_path
        self.domains = tuple(domains)
        self.clock = FleetClock(clock_start)
        self.certs = Certs(trustme.CA(), tmp_path)
        self.ca_file = tmp_path / "ca.pem"
        self.certs.ca.cert_pem.write_to_path(str(self.ca_file))
        self.redis = RedisServer(tmp_path / "redis")
        self.nodes: dict[str, Running] = {}
        self.fetches: list[str] = []
        self.collector = Collector()

    async def start(self) -> FleetWorld:
        self.redis.start()
        self.stack.callback(self.redis.stop)
        self.port = free_port_on_all((21,))

        async def answer(request: web.Request) -> web.Response:
            name = request.host.partition(":")[0].removeprefix("mta-sts.")
            self.fetches.append(name)
            return web.Response(body=policy("enforce", f"mx.{name}"),
                                headers={"Content-Type": "text/plain"})

        self.policy_host = await self.stack.enter_async_context(PolicyHost(
            POLICY_IP, server_context(self.certs.ca, *(f"mta-sts.{d}" for d in self.domains)),
            answer))
        self.collector_host = await self.stack.enter_async_context(PolicyHost(
            COLLECTOR_IP, server_context(self.certs.ca, "reports.test"),
            lambda request: self.collector.handle(request), method="POST"))
        # dead.test: an MX on an address where nothing listens (every connection refused).
        lines = [f"reports.test. A {COLLECTOR_IP}", "dead.test. MX 10 mx.dead.test.",
                 f"mx.dead.test. A {DEAD_IP}"]
        for name in self.domains:
            lines += [f"{name}. MX 10 mx.{name}.", f"mx.{name}. A {MX_IP}",
                      f'_mta-sts.{name}. TXT "v=STSv1; id=1"', f"mta-sts.{name}. A {POLICY_IP}",
                      f'_smtp._tls.{name}. TXT "v=TLSRPTv1; rua=https://reports.test:'
                      f'{self.collector_host.port}/tlsrpt"']
        zone = dns.zone.from_text(HEAD + "\n".join(lines) + "\n", origin="test.",
                                  relativize=False, check_origin=False)
        self.dns = DnsServer(HEAD)
        self.dns.zone = zone
        await self.dns.start()
        self.stack.callback(self.dns.close)
        cert = self.certs.files("mx", *(f"mx.{d}" for d in self.domains))
        self.mx = await self.stack.enter_async_context(
            ReceivingMTA(MX_IP, self.port, cert=cert))
        return self

    def node_files(self, name: str, redis_extra: str = "") -> dict[str, str]:
        return {
            "me": f"{name}.test\n",
            "plugins": "relay\ntlsrpt\nmta_sts\nrecorder\n",
            "dns.ini": f"[main]\nnameservers = 127.0.0.1\nport = {self.dns.port}\n"
                       "timeout = 1\n",
            "outbound.ini": f"[main]\nport = {self.port}\nmin_backoff = 60\n"
                            "connect_timeout = 2\ncommand_timeout = 5\n",
            "tls.ini": f"[outbound]\nca_file = {self.ca_file}\n",
            "mta_sts.ini": f"[main]\nport = {self.policy_host.port}\ncheck_interval = 5m\n",
            "tlsrpt.ini": "[main]\norganization = Example Fleet\n"
                          "contact = tlsrpt@fleet.test\n"
                          f"max_delay = {MAX_DELAY:.0f}s\nflush_interval = {FLUSH:.0f}s\n"
                          f"check_interval = {ROUND:.0f}s\nretention_days = 3\n",
            "redis.ini": f"[main]\nurl = {self.redis.url}\nnode = {name}\nprefix = t:\n"
                         f"timeout = 1s\n{redis_extra}",
        }

    def write_node(self, name: str, redis_extra: str = "") -> Path:
        from tests.harness import write_config_dir

        return write_config_dir(self.tmp_path / name, self.node_files(name, redis_extra),
                                {"recorder": RECORDER})

    async def node(self, name: str, redis_extra: str = "") -> Running:
        root = self.tmp_path / name
        if not root.exists():
            self.write_node(name, redis_extra)
        running = await self.stack.enter_async_context(running_server(root,
                                                                      clock=self.clock))
        self.nodes[name] = running
        return running

    async def stop_node(self, name: str) -> None:
        await self.nodes.pop(name).server.stop(grace=1.0)

    async def send(self, node: str, recipient: str, count: int = 1) -> None:
        for n in range(count):
            await sendmail(self.nodes[node].port, "alice@sender.test", [recipient],
                           f"Subject: {n}\r\n\r\nhello {n}\r\n".encode())

    def asleep(self) -> bool:
        """Every node's report round is asleep until its next round: moving the clock
        now wakes it rather than landing in the middle of one."""
        return self.clock.rounds_asleep() >= len(self.nodes)

    async def step(self, seconds: float) -> None:
        """Move the fleet's clock, then wait until each node's round ran and sleeps."""
        await eventually(self.asleep)
        self.clock.advance(seconds)
        await eventually(self.asleep)

    async def handed_in(self, total: int) -> None:
        """Wait until the fleet's counts in Redis add up to ``total`` sessions, moving the
        clock a flush interval at a time (the nodes flush and hand in on it)."""
        def counted() -> bool:
            with self.redis.client() as client:
                return total == sum(int(v) for key in client.keys("t:tlsrpt:counts:*")
                                    for v in client.hvals(key))

        await advancing(self.clock, FLUSH, counted)

    def local_counts(self, roots: Iterable[Path], day: datetime.date, domain: str) -> dict:
        """The report one node would send for every session the fleet's nodes counted
        (their own files, added up), to compare field by field with what was sent."""
        rows = []
        for root in roots:
            store = SessionStore(root / "state" / "tlsrpt" / "reports.sqlite")
            try:
                rows += store.rows(day, domain)
            finally:
                store.close()
        from harakapy.tls.tlsrpt_store import tally

        return report_json(organization="Example Fleet", contact="tlsrpt@fleet.test",
                           day=day, domain=domain, policies=tally(rows))
