"""A fleet end to end (docs/fleet.md): harakapy nodes with their own spools sharing a real
``redis-server``, delivering to the same MTA-STS domains and reporting on them (RFC 8461,
RFC 8460; invariants 7 and 8 of DESIGN.md)."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
from collections import Counter
from contextlib import AsyncExitStack

import pytest

from tests.fleet_world import (
    FLUSH,
    MAX_DELAY,
    ROUND,
    FleetWorld,
    midnight_after,
    report_delay,
)
from tests.harness import advancing, eventually
from tests.processes import ServerProcess

pytestmark = pytest.mark.timeout(180)

START = 1_800_000_000.0  # 2027-01-15 08:00 UTC
LEASE = 4.0  # seconds, real time (Redis keeps it); renewed every third of it


def sessions(world: FleetWorld) -> list:
    """Every TLS session of every node, as its tls_result hook saw it."""
    return [item for node in world.nodes.values() for kind, item in node.captured
            if kind == "tls_result"]


def utc_day(moment: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).date()


async def reports_arrive(world: FleetWorld, count: int) -> None:
    """Round after round of the fleet's report senders until ``count`` reports arrived."""
    async with asyncio.timeout(60):
        while len(world.collector.reports) < count:
            await world.step(ROUND)


async def next_day(world: FleetWorld) -> None:
    """The fleet's clock past the UTC midnight and every report's delay."""
    await world.step(midnight_after(world.clock.now) - world.clock.now + MAX_DELAY
                     + 2 * FLUSH + 1)


def totals(report: dict) -> tuple[int, int]:
    """A report's successful and failed sessions, over its policies."""
    return (sum(p["summary"]["total-successful-session-count"] for p in report["policies"]),
            sum(p["summary"]["total-failure-session-count"] for p in report["policies"]))


def sent_policies(report: dict) -> list[dict]:
    return sorted(report["policies"], key=lambda p: json.dumps(p, sort_keys=True))


async def three_nodes(stack: AsyncExitStack, tmp_path) -> FleetWorld:
    """Redis, a.test and b.test, and the nodes n1, n2 and n3."""
    world = await FleetWorld(stack, tmp_path, ("a.test", "b.test"), START).start()
    for name in ("n1", "n2", "n3"):
        await world.node(name)
    return world


async def the_days_reports(world: FleetWorld) -> tuple[datetime.date, dict[str, list]]:
    """Today's reports: the fleet on to the next day until one per domain arrived, then
    more rounds on every node (nothing may go twice); the day, and the reports by
    domain."""
    day = utc_day(world.clock.now)
    await next_day(world)
    await reports_arrive(world, len(world.domains))
    for _ in range(3):
        await world.step(ROUND)
    return day, world.collector.by_domain()


async def test_three_nodes_fetch_each_policy_once_and_send_one_report_of_every_session(
        tmp_path):
    async with AsyncExitStack() as stack:
        world = await three_nodes(stack, tmp_path)
        # Every node sends to every domain at the same time: they all want the policies
        # at once.
        await asyncio.gather(*(world.send(node, f"bob@{domain}", 2)
                               for node in world.nodes for domain in world.domains))
        await eventually(lambda: len(world.mx.messages) == 12, timeout=30)
        assert Counter(world.fetches) == {"a.test": 1, "b.test": 1}
        results = sessions(world)
        assert all(r.success and r.policy_type == "sts" for r in results)
        await world.handed_in(len(results))
        day, reports = await the_days_reports(world)
        assert sorted(reports) == ["a.test", "b.test"]
        for domain, (report,) in reports.items():
            assert totals(report) == (sum(r.domain == domain for r in results), 0)
            alone = world.local_counts((tmp_path / n for n in world.nodes), day, domain)
            assert sent_policies(report) == sent_policies(alone)
            assert {k: v for k, v in report.items() if k != "policies"} == \
                {k: v for k, v in alone.items() if k != "policies"}
        # A day on, the policies were half way through their max_age: the fleet renewed
        # each once, not once per node.
        assert Counter(world.fetches) == {"a.test": 2, "b.test": 2}


async def test_redis_killed_mid_run_delivery_goes_on_under_the_policy_and_nothing_is_lost(
        tmp_path):
    async with AsyncExitStack() as stack:
        world = await three_nodes(stack, tmp_path)
        tally = SessionTally(world)

        async def traffic(delivered: int) -> None:
            for node in world.nodes:
                for domain in world.domains:
                    await world.send(node, f"bob@{domain}")
            await eventually(lambda: len(world.mx.messages) == delivered, timeout=30)
            tally.take()

        await traffic(6)
        await world.handed_in(tally.total)

        world.redis.kill()
        # A node restarted during the outage has only its own copy of the policies: it
        # applies them (enforce, verified) and fetches nothing.
        await world.stop_node("n3")
        await world.node("n3")
        tally.restarted("n3")
        await traffic(12)
        results = [item for kind, item in world.nodes["n3"].captured if kind == "tls_result"]
        assert results
        assert all(r.success and r.policy_type == "sts" and r.level == "verify"
                   for r in results), results
        assert Counter(world.fetches) == {"a.test": 1, "b.test": 1}
        for _ in range(3):  # rounds and hand-ins while Redis is away: counted locally
            world.clock.advance(FLUSH)
            await world.step(ROUND)
        assert world.collector.reports == []

        world.redis.start()  # empty: Redis kept nothing
        await traffic(18)
        await world.handed_in(tally.total)
        day, reports = await the_days_reports(world)
        for domain, (report,) in reports.items():
            assert totals(report) == (tally.by_domain[domain], 0)
            alone = world.local_counts((tmp_path / n for n in world.nodes), day, domain)
            assert sent_policies(report) == sent_policies(alone)
        assert Counter(world.fetches) == {"a.test": 2, "b.test": 2}  # a refresh, as above


class SessionTally:
    """The sessions the nodes' tls_result hooks saw, across a node's restart (which
    starts its record anew)."""

    def __init__(self, world: FleetWorld) -> None:
        self.world = world
        self.taken: dict[str, int] = {}
        self.by_domain: Counter = Counter()

    def take(self) -> None:
        for name, node in self.world.nodes.items():
            results = [item for kind, item in node.captured if kind == "tls_result"]
            for result in results[self.taken.get(name, 0):]:
                self.by_domain[result.domain] += 1
            self.taken[name] = len(results)

    def restarted(self, name: str) -> None:
        self.taken[name] = 0

    @property
    def total(self) -> int:
        return sum(self.by_domain.values())


async def renewed(world: FleetWorld, lease: bytes) -> None:
    """Wait until the holder renews ``lease``: its time to live goes up again."""
    with world.redis.client() as client:
        seen = [client.pttl(lease)]

        def went_up() -> bool:
            now = client.pttl(lease)
            up = now > seen[-1]
            seen.append(now)
            return up

        await eventually(went_up, timeout=2 * LEASE)


def lease_world_day() -> tuple[datetime.date, str]:
    """Two days ago (so that a node on the real clock finds its reports due whatever the
    hour), and a domain whose report for that day is due well after midnight."""
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=2)
    domain = next(f"d{n}.test" for n in range(100) if report_delay(day, f"d{n}.test") > 120)
    return day, domain


async def test_a_node_killed_holding_the_report_lease_leaves_it_to_another_without_a_double(
        tmp_path):
    day, domain = lease_world_day()
    noon = datetime.datetime.combine(day, datetime.time(12), datetime.UTC).timestamp()
    async with AsyncExitStack() as stack:
        world = await FleetWorld(stack, tmp_path, (domain,), noon).start()
        world.collector.stall_first = True
        extra = f"[tlsrpt]\nlease = {LEASE:.0f}s\n"
        for name in ("n1", "n2"):
            world.write_node(name, extra)
            await world.node(name)
        await world.send("n1", f"bob@{domain}", 2)
        await world.send("n2", f"bob@{domain}", 3)
        await eventually(lambda: len(world.mx.messages) == 5, timeout=30)
        await world.handed_in(len(sessions(world)))
        n1_sessions = len(sessions(world)) - len(
            [i for k, i in world.nodes["n2"].captured if k == "tls_result"])
        # Just after midnight: both nodes hand in their counts of the whole day; the
        # report is not due yet (its delay is more than two minutes).
        midnight = midnight_after(world.clock.now)
        world.clock.advance(midnight - world.clock.now)

        def handed_in_after_midnight() -> bool:
            with world.redis.client() as client:
                states = client.hgetall("t:tlsrpt:nodes")
            return len(states) == 2 and all(
                json.loads(v)["shipped"] >= midnight + 2 * FLUSH for v in states.values())

        await advancing(world.clock, FLUSH, handed_in_after_midnight)
        assert world.clock.now < midnight + report_delay(day, domain)
        await world.stop_node("n1")

        # n1 again, as `harakapy run` on the real clock, for which the report is long
        # due: it takes the lease and posts, and dies mid-POST.
        n1 = ServerProcess("-c", str(tmp_path / "n1"))
        try:
            try:
                await eventually(lambda: world.collector.started == 1, timeout=60)
            except TimeoutError:
                raise AssertionError(f"n1 posted nothing: {n1.log[-3000:]}") from None
            with world.redis.client() as client:
                (lease,) = client.keys("t:tlsrpt:lease:*")
                assert client.get(lease).startswith(b"n1 ")
            # While n1 is alive its lease holds, for longer than its length: n2's rounds,
            # with the report due, leave the report to n1.
            world.clock.advance(max(0.0, datetime.datetime.now(datetime.UTC).timestamp()
                                    - world.clock.now))
            # Six renewals (one every third of the lease) are two leases' length: after
            # each, n2's round finds the report due and the lease n1's.
            for _ in range(6):
                await renewed(world, lease)
                await world.step(ROUND)
            assert world.collector.started == 1, n1.log[-3000:]
            n1.signal(signal.SIGKILL)
            await asyncio.to_thread(n1.wait, 10)
        finally:
            n1.stop()
        await eventually(world.collector.stalled_sender_gone, timeout=10)
        world.collector.release.set()
        await eventually(lambda: world.collector.aborted == 1, timeout=10)

        # Once the dead holder's lease lapses, n2 sends what is not marked sent.
        await reports_arrive(world, 1)
        for _ in range(3):
            await world.step(ROUND)
        (report,) = world.collector.reports
        assert world.collector.started == 2
        assert totals(report) == (len(sessions(world)) + n1_sessions, 0)
        alone = world.local_counts((tmp_path / "n1", tmp_path / "n2"), day, domain)
        assert sent_policies(report) == sent_policies(alone)
        assert report["date-range"]["start-datetime"] == f"{day.isoformat()}T00:00:00Z"


async def test_a_redis_that_refuses_writes_does_not_stop_delivery(tmp_path, caplog):
    async with AsyncExitStack() as stack:
        world = await FleetWorld(stack, tmp_path, ("a.test",), START).start()
        with world.redis.client() as client:  # out of memory: every write refused
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1")
        await world.node("n1")
        await world.send("n1", "bob@a.test")
        await eventually(lambda: len(world.mx.messages) == 1, timeout=30)
        (result,) = sessions(world)
        assert result.success and result.policy_type == "sts" and result.level == "verify"
        assert Counter(world.fetches) == {"a.test": 1}
        assert any("Redis refused a command" in r.getMessage() for r in caplog.records)


async def test_a_destination_no_host_of_which_answered_one_node_waits_on_every_node(
        tmp_path):
    async with AsyncExitStack() as stack:
        world = await FleetWorld(stack, tmp_path, ("a.test",), START).start()
        for name in ("n1", "n2"):
            world.write_node(name, "[destinations]\nshare = yes\n")
            await world.node(name)

        def subscribers() -> int:
            with world.redis.client() as client:
                return dict(client.pubsub_numsub("t:dest:suspended"))[b"t:dest:suspended"]

        await eventually(lambda: subscribers() == 2, timeout=10)
        first, second = (world.nodes[n].server.outbound for n in ("n1", "n2"))
        await world.send("n1", "bob@dead.test")
        await eventually(lambda: first.stats()["suspended"] == ["dead.test"], timeout=20)
        until = first._suspended["dead.test"]
        # n2 heard it: its mail for dead.test waits for the same time, without a try.
        await eventually(lambda: second.stats()["suspended"] == ["dead.test"], timeout=10)
        assert second._suspended["dead.test"] == until
        await world.send("n2", "carol@dead.test")
        await eventually(lambda: [job.due for (_, domain), job in second._jobs.items()
                                  if domain == "dead.test"] == [until], timeout=10)
        queue = tmp_path / "n2" / "queue"
        assert len(list((queue / "msg").iterdir())) == 1  # waiting in n2's own spool
        assert not any('"state"' in path.read_text() for path in (queue / "log").glob("*"))
