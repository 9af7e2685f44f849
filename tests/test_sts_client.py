"""The MTA-STS client (harakapy.tls.sts_client): cache, TXT id changes, failures that
never downgrade, back-off, restarts. Real DNS, a real HTTPS policy host, a SQLite cache,
and time moved by the test."""

from __future__ import annotations

import dns.zone
import pytest

from harakapy.dns import Resolver
from harakapy.tls.results import ResultType
from harakapy.tls.sts_client import StsClient, StsSettings
from harakapy.tls.sts_store import SqliteStore
from tests.dns_server import DnsServer
from tests.harness import ManualClock
from tests.policy_host import PolicyHost, server_context

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
mta-sts.good.test. A 127.0.0.41
{txt}
"""

ENFORCE = b"version: STSv1\nmode: enforce\nmx: mail.good.test\nmax_age: 86400\n"
TESTING = b"version: STSv1\nmode: testing\nmx: *.good.test\nmax_age: 3600\n"
NONE = b"version: STSv1\nmode: none\nmax_age: 86400\n"


class World:
    """DNS, the policy host, a cache file and a clock; ``client()`` is a new client over
    the same cache, as after a restart."""

    def __init__(self, dns_server: DnsServer, host: PolicyHost, path, ca_file) -> None:
        self.dns, self.host, self.path, self.ca_file = dns_server, host, path, ca_file
        self.clock = ManualClock()
        self.answer = (200, ENFORCE)

    def txt(self, record: str | None) -> None:
        line = f'_mta-sts.good.test. TXT "{record}"' if record else ""
        self.dns.zone = dns.zone.from_text(ZONE.format(txt=line), origin="test.",
                                           relativize=False, check_origin=False)

    def client(self) -> StsClient:
        resolver = Resolver(["127.0.0.1"], port=self.dns.port, timeout=2)
        return StsClient(resolver, SqliteStore(self.path), self.clock,
                         StsSettings(ca_file=self.ca_file, port=self.host.port))

    def txt_queries(self) -> int:
        return sum(1 for name, kind in self.dns.queries if kind == "TXT")


@pytest.fixture
async def world(tls_ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    server = await DnsServer(ZONE.format(txt="")).start()
    holder: dict[str, World] = {}

    async def answer(request):
        from aiohttp import web

        status, body = holder["world"].answer
        return web.Response(status=status, body=body, content_type="text/plain")

    async with PolicyHost("127.0.0.41", server_context(tls_ca, "mta-sts.good.test"),
                          answer) as host:
        holder["world"] = World(server, host, tmp_path / "sts.sqlite", ca_file)
        holder["world"].txt("v=STSv1; id=one")
        yield holder["world"]
    server.close()


async def test_a_policy_is_fetched_once_and_then_comes_from_the_cache(world):
    client = world.client()
    answer = await client.lookup("good.test")
    assert answer.policy.mx == ("mail.good.test",) and answer.failure is None
    assert answer.entry.record_id == "one"
    queries = world.txt_queries()
    world.clock.advance(299)
    assert (await client.lookup("good.test")).policy.mx == ("mail.good.test",)
    assert world.txt_queries() == queries  # checked 299 s ago: no DNS, no fetch
    assert world.host.requests == ["/.well-known/mta-sts.txt"]


async def test_the_same_id_later_is_no_new_policy_and_a_new_id_is_fetched(world):
    client = world.client()
    await client.lookup("good.test")
    world.clock.advance(301)
    await client.lookup("good.test")
    assert len(world.host.requests) == 1  # the TXT record said nothing new
    world.answer = (200, TESTING)
    world.txt("v=STSv1; id=two")
    world.clock.advance(301)
    answer = await client.lookup("good.test")
    assert answer.policy.mode.value == "testing" and answer.entry.record_id == "two"
    assert len(world.host.requests) == 2


async def test_a_failed_fetch_keeps_the_cached_policy_and_waits_five_minutes(world):
    client = world.client()
    await client.lookup("good.test")
    world.answer = (500, b"")
    world.txt("v=STSv1; id=two")
    world.clock.advance(301)
    answer = await client.lookup("good.test")
    assert answer.policy.mx == ("mail.good.test",)  # never a downgrade
    assert answer.failure.result_type is ResultType.STS_POLICY_FETCH_ERROR
    world.clock.advance(299)
    answer = await client.lookup("good.test")
    assert answer.failure is not None and len(world.host.requests) == 2  # backed off
    world.answer = (200, TESTING)
    world.clock.advance(2)
    answer = await client.lookup("good.test")
    assert answer.failure is None and answer.policy.mode.value == "testing"
    assert len(world.host.requests) == 3


async def test_an_invalid_policy_is_reported_and_does_not_replace_a_good_one(world):
    client = world.client()
    await client.lookup("good.test")
    world.answer = (200, b"version: STSv1\nmode: enforce\nmax_age: 1\n")  # no mx
    world.txt("v=STSv1; id=two")
    world.clock.advance(301)
    answer = await client.lookup("good.test")
    assert answer.failure.result_type is ResultType.STS_POLICY_INVALID
    assert answer.policy.mx == ("mail.good.test",)


async def test_dns_trouble_keeps_the_cache_and_defers_only_without_one(world):
    client = world.client()
    world.dns.servfail.add("_mta-sts.good.test")
    answer = await client.lookup("good.test")
    assert answer.defer and answer.policy is None  # nothing known: the mail waits
    world.dns.servfail.clear()
    assert (await client.lookup("good.test")).policy is not None
    world.dns.servfail.add("_mta-sts.good.test")
    world.clock.advance(301)
    answer = await client.lookup("good.test")
    assert not answer.defer and answer.policy.mx == ("mail.good.test",)
    assert answer.failure is not None


async def test_a_removed_record_keeps_the_policy_until_it_expires(world):
    client = world.client()
    await client.lookup("good.test")
    world.txt(None)
    world.clock.advance(86399)
    assert (await client.lookup("good.test")).policy is not None
    world.clock.advance(1)
    answer = await client.lookup("good.test")
    assert answer.policy is None and answer.failure is None


async def test_a_cached_policy_survives_a_restart_with_its_host_and_dns_down(world):
    await world.client().lookup("good.test")
    world.answer = (503, b"")
    world.dns.servfail.add("_mta-sts.good.test")
    world.clock.advance(3600)
    answer = await world.client().lookup("good.test")  # a new process, the same file
    assert answer.policy.mx == ("mail.good.test",)


async def test_nothing_cached_and_the_fetch_fails_means_no_policy_reported(world):
    world.answer = (404, b"")
    answer = await world.client().lookup("good.test")
    assert answer.policy is None and not answer.defer
    assert answer.failure.result_type is ResultType.STS_POLICY_FETCH_ERROR


async def test_mode_none_replaces_the_cached_policy_and_is_cached_itself(world):
    client = world.client()
    await client.lookup("good.test")
    world.answer = (200, NONE)
    world.txt("v=STSv1; id=off")
    world.clock.advance(301)
    answer = await client.lookup("good.test")
    assert answer.policy.mode.value == "none" and answer.failure is None
    assert SqliteStore(world.path).get("good.test").policy().mode.value == "none"
    world.clock.advance(301)
    await world.client().lookup("good.test")  # a restart: the same id fetches nothing
    assert len(world.host.requests) == 2


async def test_a_refresh_fetches_even_when_the_txt_record_is_gone(world):
    client = world.client()
    await client.lookup("good.test")
    world.txt(None)
    world.clock.advance(3600)
    refreshed = await client.refresh("good.test")
    assert refreshed.fetched and refreshed.entry.record_id == "one"
    assert len(world.host.requests) == 2
    world.dns.servfail.add("_mta-sts.good.test")
    world.clock.advance(3600)
    assert (await client.refresh("good.test")).fetched


async def test_a_first_failure_is_remembered_past_the_next_refresh_pass(world):
    world.answer = (404, b"")
    await world.client().lookup("good.test")
    entry = SqliteStore(world.path).get("good.test")
    assert entry.used == world.clock.time() and entry.failed_id == "one"


async def test_refresh_fetches_again_whatever_the_id_says(world):
    client = world.client()
    first = await client.lookup("good.test")
    world.clock.advance(3600)
    refreshed = await client.refresh("good.test")
    assert len(world.host.requests) == 2
    assert refreshed.entry.expires == first.entry.expires + 3600  # from the last fetch
