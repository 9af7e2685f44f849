"""The MTA-STS cache over time (the proactive refresh, idle domains, forgetting), our own
policies served by the built-in HTTPS listener, and two worker processes sharing one
cache. Real DNS, a real policy host, time moved by the test where harakapy runs in
this process, real time where it runs as ``harakapy run``."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

from harakapy.dns import Resolver
from harakapy.mta_sts import JITTER, MtaSts
from harakapy.tls.mta_sts import Mode
from harakapy.tls.sts_client import StsSettings
from harakapy.tls.sts_config import Refresh, StsConfig
from harakapy.tls.sts_fetch import fetch_policy
from harakapy.tls.sts_store import CachedPolicy, SqliteStore
from tests.harness import eventually
from tests.processes import ServerProcess, free_port
from tests.sts_world import MX_IP, Answer, policy

DAY = 86400.0


async def until(check, timeout: float = 10.0):
    """``eventually`` for an async check: its first true answer."""
    async with asyncio.timeout(timeout):
        while not (answer := await check()):
            await asyncio.sleep(0.05)
    return answer


async def test_the_refresh_task_renews_a_used_policy_before_it_expires(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert world.fetches("a.test") == 1
    # Half way through its max_age (a day) the task, which looks every hour, fetches it
    # again, though its TXT id is the same.
    await world.env.advance(DAY / 2 + 3600)
    await eventually(lambda: world.fetches("a.test") == 2)


def service_on(world, path, **refresh) -> MtaSts:
    env = world.env
    resolver = Resolver(["127.0.0.1"], port=env.dns.port, timeout=2)
    settings = StsConfig(StsSettings(ca_file=env.hp.root.parent / "ca.pem",
                                     port=world.host.port), refresh=Refresh(**refresh))
    return MtaSts(settings, SqliteStore(path), resolver, env.clock)


async def test_a_pass_renews_what_is_used_lets_idle_ones_run_out_and_forgets_the_dead(
        sts_world, tmp_path):
    world = await sts_world()
    for name in ("a.test", "b.test", "lapsed.test"):
        world.domain(name, answer=Answer(body=policy("enforce", f"mx.{name}",
                                                     max_age=int(30 * DAY))))
    service = service_on(world, tmp_path / "cache.sqlite")
    clock = world.env.clock
    for name in ("a.test", "b.test", "lapsed.test"):
        assert (await service.lookup(name)).policy is not None
    clock.advance(DAY / 2)
    await service.lookup("a.test")  # mail went to a.test again; to b.test not since
    clock.advance(DAY)  # a day and a half after the fetches
    await service.refresh_pass()
    assert world.fetches("a.test") == 2  # used within idle_after (7 days): renewed
    assert world.fetches("b.test") == 2  # used 1.5 days ago: renewed too
    clock.advance(8 * DAY)  # a.test and b.test: last used over 7 days ago
    await service.refresh_pass()
    assert world.fetches("a.test") == 2 and world.fetches("b.test") == 2  # idle: not renewed
    assert (await service.entry("a.test")) is not None  # expired, not yet forgotten
    clock.advance(31 * DAY)
    await service.refresh_pass()
    assert await service.entries() == []


async def test_a_failing_refresh_keeps_the_policy_and_is_noted(sts_world, tmp_path):
    world = await sts_world()
    world.domain("a.test", answer=Answer(body=policy("enforce", "mx.a.test",
                                                     max_age=int(30 * DAY))))
    service = service_on(world, tmp_path / "cache.sqlite")
    await service.lookup("a.test")
    world.answers["a.test"] = Answer(500, b"down")
    world.env.clock.advance(DAY)
    (answer,) = await service.refresh_pass()
    assert answer.policy is not None and answer.policy.mode is Mode.ENFORCE
    assert answer.failure.result_type.value == "sts-policy-fetch-error"
    entry = await service.entry("a.test")
    assert entry.valid_at(world.env.clock.time()) and "answered 500" in entry.error


def test_each_domain_is_due_a_little_early_by_its_own_jitter():
    service = MtaSts(StsConfig(client=StsSettings()), None, None, None)  # no I/O here
    now = 1_000_000.0
    due_at = {}
    for name in ("a.test", "b.test", "c.test", "d.test"):
        entry = CachedPolicy(name, b"x", "1", fetched=now, expires=now + 7 * DAY, used=now)
        later = next(t for t in range(0, int(DAY) + 60, 60)
                     if service.refresh_due(entry, now + t))
        assert DAY * (1 - JITTER) <= later <= DAY
        due_at[name] = later
    assert len(set(due_at.values())) > 1  # fetched together, not all renewed together


# -- our own policies -------------------------------------------------------------------------

async def test_the_built_in_listener_serves_our_policy_to_an_mta_sts_client(sts_world):
    world = await sts_world()
    certs = world.env.certs
    cert, key = certs.files("policy-ours", "mta-sts.ours.test")
    port = free_port()
    ini = world.env.hp.root / "config" / "mta_sts.ini"
    ini.write_text(ini.read_text() + f"[listen]\naddress = 127.0.0.43:{port}\ncert = {cert}\n"
                   f"key = {key}\n[publish ours.test]\nmode = enforce\n")
    world.records["ours.test"] = ["ours.test. MX 10 mx.ours.test.",
                                  "mta-sts.ours.test. A 127.0.0.43"]
    world.publish_zone()
    assert await world.env.hp.server.reload()
    resolver = Resolver(["127.0.0.1"], port=world.env.dns.port, timeout=2)
    context = ssl.create_default_context(cafile=str(world.env.hp.root.parent / "ca.pem"))

    async def fetched():
        try:
            return await fetch_policy("ours.test", resolver=resolver, context=context,
                                      port=port, connect_timeout=2, timeout=5)
        except Exception:
            return None

    await until(fetched)
    got = (await fetch_policy("ours.test", resolver=resolver, context=context, port=port,
                              connect_timeout=2, timeout=5)).policy
    assert got.mode is Mode.ENFORCE and got.mx == ("mx.ours.test",)  # from DNS
    assert got.max_age == 7 * 86400


async def test_the_listener_answers_404_for_a_domain_that_is_not_ours(sts_world):
    import aiohttp

    world = await sts_world()
    cert, key = world.env.certs.files("policy-ours", "mta-sts.ours.test",
                                      "mta-sts.other.test")
    port = free_port()
    ini = world.env.hp.root / "config" / "mta_sts.ini"
    ini.write_text(ini.read_text() + f"[listen]\naddress = 127.0.0.43:{port}\ncert = {cert}\n"
                   f"key = {key}\n[publish ours.test]\nmx = mx.ours.test\n")
    assert await world.env.hp.server.reload()
    context = ssl.create_default_context(cafile=str(world.env.hp.root.parent / "ca.pem"))
    # This client asks by address with a Host header of each name: what is under test is
    # the listener's choice by Host, not a client's name check (the chain is still
    # checked; harakapy's own fetch checks the name: test_sts_fetch.py, and
    # test_the_built_in_listener_serves_our_policy_to_an_mta_sts_client).
    context.check_hostname = False

    async def get(host: str, path: str = "/.well-known/mta-sts.txt"):
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"https://127.0.0.43:{port}{path}", headers={"Host": host},
                    ssl=context) as response:
                return response.status, await response.text(), response.content_type
        except aiohttp.ClientConnectionError:
            return None

    await until(lambda: get("mta-sts.ours.test"))
    assert (await get("mta-sts.ours.test"))[::2] == (200, "text/plain")
    assert (await get("mta-sts.other.test"))[0] == 404
    assert (await get("mta-sts.ours.test", "/"))[0] == 404


# -- several processes ------------------------------------------------------------------------

async def test_two_workers_share_one_cache(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    root = world.env.hp.root
    await world.env.hp.server.stop(grace=1.0)
    port = free_port()
    (root / "config" / "smtp.ini").write_text(
        f"[main]\nlisten = 127.0.0.1:{port}\nworkers = 2\nshutdown_grace = 2\n")
    (root / "config" / "plugins").write_text("relay\nmta_sts\n")
    process = ServerProcess("-c", str(root))
    try:
        await asyncio.to_thread(process.wait_for, "worker 1 of 2 ready", 30)
        await asyncio.to_thread(process.wait_for, "worker 2 of 2 ready", 30)

        def send(count: int, tag: str) -> None:
            for number in range(count):
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    smtp.sendmail("alice@sender.test", [f"{tag}{number}@a.test"],
                                  b"Subject: t\r\n\r\nhello\r\n")

        await asyncio.to_thread(send, 1, "first")
        await eventually(lambda: len(mx.messages) == 1, timeout=30)
        await asyncio.to_thread(send, 20, "more")
        await eventually(lambda: len(mx.messages) == 21, timeout=30)
        workers = {line.split("]")[0].rsplit("[", 1)[1] for line in process.lines
                   if "delivered" in line and "harakapy.outbound[" in line}
    finally:
        await asyncio.to_thread(process.stop)
    assert workers == {"1", "2"}  # both delivered ...
    assert world.fetches("a.test") == 1  # ... under the policy one of them fetched
    assert all(message.tls for message in mx.messages)
