"""``harakapy mta-sts list|refresh|publish`` and the MTA-STS block of ``harakapy
tls-policy``, run as an operator runs them, beside the server that fills the cache."""

from __future__ import annotations

import asyncio
import json

from harakapy.mta_sts import policy_id
from harakapy.tls.context import self_signed_context
from tests.harness import eventually
from tests.processes import harakapy
from tests.sts_world import MX2_IP, MX_IP, Answer, policy


async def cli(*args: str):
    # In a thread: the DNS server and the policy host live on this test's loop.
    return await asyncio.to_thread(harakapy, *args)


async def delivered_once(world, name: str = "a.test"):
    world.domain(name)
    mx = await world.mx(MX_IP, f"mx.{name}")
    await world.env.send(f"bob@{name}")
    await eventually(lambda: mx.messages)
    return mx


async def test_list_shows_what_the_server_cached(sts_world):
    world = await sts_world()
    await delivered_once(world)
    root = str(world.env.hp.root)
    done = await cli("mta-sts", "list", "-c", root, "--json")
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)
    assert entry["domain"] == "a.test" and entry["id"] == "1" and entry["mode"] == "enforce"
    assert entry["mx"] == ["mx.a.test"] and entry["valid"] and entry["last_error"] == ""
    assert entry["policy"][1] == "mode: enforce"
    text = (await cli("mta-sts", "list", "-c", root)).stdout
    assert "a.test\n  policy id 1, mode enforce, max_age 86400, valid" in text


async def test_refresh_fetches_now_whatever_the_id_says(sts_world):
    world = await sts_world()
    await delivered_once(world)
    world.answers["a.test"] = Answer(body=policy("testing", "mx.a.test"))  # same id
    done = await cli("mta-sts", "refresh", "a.test", "-c", str(world.env.hp.root))
    assert done.returncode == 0, done.stderr
    assert "a.test: policy fetched" in done.stdout and "mode testing" in done.stdout
    assert world.fetches("a.test") == 2


async def test_a_failed_refresh_says_the_cached_policy_still_applies(sts_world):
    world = await sts_world()
    await delivered_once(world)
    world.answers["a.test"] = Answer(503, b"busy")
    done = await cli("mta-sts", "refresh", "a.test", "-c", str(world.env.hp.root))
    assert done.returncode == 1
    assert "sts-policy-fetch-error" in done.stdout and "still applies" in done.stdout
    assert "mode enforce" in done.stdout  # the cache kept it
    listed = json.loads((await cli("mta-sts", "list", "-c", str(world.env.hp.root),
                                   "--json")).stdout)
    assert listed[0]["mode"] == "enforce" and "answered 503" in listed[0]["last_error"]


async def test_tls_policy_shows_the_mta_sts_state_and_probes_against_it(sts_world):
    world = await sts_world()
    world.domain("two.test", mx=((10, "mx1.two.test", MX_IP), (20, "mx2.two.test", MX2_IP)),
                 answer=Answer(body=policy("enforce", "mx2.two.test")))
    outside = await world.mx(MX_IP, "mx1.two.test")
    inside = await world.mx(MX2_IP, "mx2.two.test")
    root = str(world.env.hp.root)
    done = await cli("tls-policy", "two.test", "-c", root, "--probe", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["decided_by"] == "mta_sts" and report["level"] == "verify"
    assert report["source"]["type"] == "sts" and report["source"]["mx_patterns"] == [
        "mx2.two.test"]
    state = report["details"]["mta_sts"]
    assert state["id"] == "1" and state["mode"] == "enforce" and state["valid"]
    first, second = report["probes"]
    assert first["verdict"] == "fail" and "matches no mx pattern" in first["reason"]
    assert second["verdict"] == "pass"
    assert outside.connections == 0 and not inside.messages
    text = (await cli("tls-policy", "two.test", "-c", root)).stdout
    assert "MTA-STS:     policy id 1, mode enforce, max_age 86400, valid" in text
    assert "mx=mx2.two.test" in text


async def test_tls_policy_says_when_the_policy_cannot_be_fetched(sts_world):
    world = await sts_world()
    world.domain("gone.test", answer=Answer(404, b"no"))
    await world.mx(MX_IP, tls_context=self_signed_context("mx.gone.test"))
    done = await cli("tls-policy", "gone.test", "-c", str(world.env.hp.root))
    assert done.returncode == 0, done.stderr
    assert "no MTA-STS policy of gone.test could be fetched" in done.stdout
    assert "last error: sts-policy-fetch-error" in done.stdout


async def test_publish_prints_the_records_and_the_policy(sts_world):
    world = await sts_world("[publish ours.test]\nmode = enforce\nmx = mail.ours.test, "
                            "*.mx.ours.test\nmax_age = 1d\n"
                            "rua = mailto:tlsrpt@ours.test\n")
    done = await cli("mta-sts", "publish", "ours.test", "-c", str(world.env.hp.root))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    body = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.ours.test\r\nmx: *.mx.ours.test"
            b"\r\nmax_age: 86400\r\n")
    assert f'_mta-sts.ours.test. 3600 IN TXT "v=STSv1; id={policy_id(body)}"' in text
    assert '_smtp._tls.ours.test. 3600 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@ours.test"' \
        in text
    assert body.decode().replace("\r\n", "\n") in text


async def test_publish_takes_the_mx_hosts_from_dns_when_none_are_configured(sts_world):
    world = await sts_world()
    world.domain("a.test", mx=((20, "mx2.a.test", MX2_IP), (10, "mx1.a.test", MX_IP)))
    done = await cli("mta-sts", "publish", "a.test", "-c", str(world.env.hp.root),
                     "--json")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["mx"] == ["mx1.a.test", "mx2.a.test"] and facts["mx_from_dns"]
    assert facts["mode"] == "testing" and not facts["configured"]
    assert "mx: mx1.a.test\r\nmx: mx2.a.test\r\n" in facts["policy"]


async def test_publish_for_a_domain_without_dns_fails_clearly(sts_world):
    world = await sts_world()
    done = await cli("mta-sts", "publish", "nowhere.test", "-c", str(world.env.hp.root))
    assert done.returncode == 1 and "no such domain" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_bad_mta_sts_ini_is_named_by_file_and_line(sts_world):
    world = await sts_world()
    config = world.env.hp.root / "config" / "mta_sts.ini"
    config.write_text(config.read_text() + "[publish ours.test]\nmode = strict\n")
    done = await cli("mta-sts", "list", "-c", str(world.env.hp.root))
    assert done.returncode == 2
    assert "mta_sts.ini:5:" in done.stderr and "mode" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_listener_certificate_that_does_not_load_stops_the_start(sts_world):
    world = await sts_world()
    config = world.env.hp.root / "config"
    (config / "bad.pem").write_text("not a certificate\n")
    (config / "mta_sts.ini").write_text((config / "mta_sts.ini").read_text() +
                                        "[listen]\naddress = 127.0.0.43:8443\n"
                                        "cert = bad.pem\nkey = bad.pem\n")
    done = await cli("mta-sts", "list", "-c", str(world.env.hp.root))
    assert done.returncode == 2 and "cannot load the certificate" in done.stderr
    assert "mta_sts.ini:6:" in done.stderr


async def test_a_domain_section_that_names_a_pattern_is_refused_with_its_line(sts_world):
    world = await sts_world()
    config = world.env.hp.root / "config" / "mta_sts.ini"
    config.write_text(config.read_text() + "[domain *.partner.test]\napply = enforce\n")
    done = await cli("mta-sts", "list", "-c", str(world.env.hp.root))
    assert done.returncode == 2, done.stderr
    assert "mta_sts.ini:5:" in done.stderr and "is a pattern: name a domain" in done.stderr
    assert done.stderr.count("*.partner.test") == 2  # the section, and the name in it
