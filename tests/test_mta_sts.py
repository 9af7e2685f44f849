"""The mta_sts plugin end to end: real DNS from the test's DNS server, a real HTTPS policy
host with test-CA certificates, real receiving MX servers, a STARTTLS-stripping proxy,
and harakapy delivering between them (RFC 8461, ../shared/specs/mta-sts.md)."""

from __future__ import annotations

import ssl

import pytest

from harakapy.tls.context import self_signed_context
from tests.harness import eventually, running_server
from tests.outbound_env import old_tls_only
from tests.sts_world import (
    EXPIRED_POLICY_IP,
    MX2_IP,
    MX_IP,
    REAL_IP,
    Answer,
    plaintext_seen,
    policy,
)

# -- enforce --------------------------------------------------------------------------------

async def test_enforce_delivers_over_verified_tls_and_reports_the_policy(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_type == "sts" and result.policy_domain == "a.test"
    assert result.mx_host_patterns == ("mx.a.test",) and result.decided_by == "mta_sts"
    assert result.policy_strings == ("version: STSv1", "mode: enforce", "mx: mx.a.test",
                                     "max_age: 86400")
    assert world.fetches("a.test") == 1


async def test_enforce_with_starttls_stripped_waits_and_the_proxy_reads_no_mail(sts_world):
    world = await sts_world()
    world.domain("a.test")
    real = await world.mx(REAL_IP, "mx.a.test")
    attacker = await world.stripper(MX_IP, real)
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    seen = plaintext_seen(attacker)
    assert b"EHLO" in seen
    assert b"MAIL FROM" not in seen and b"RCPT TO" not in seen and b"merger" not in seen
    assert real.messages == []
    (failure,) = world.env.failures()
    assert failure.result_type == "starttls-not-supported" and failure.enforced
    assert failure.policy_type == "sts"
    (reason,) = world.env.captured("deferred")
    assert "STARTTLS" in reason or "TLS is required" in reason


async def test_enforce_refuses_a_certificate_for_another_name(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.elsewhere.example")
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == []
    (failure,) = world.env.failures()
    assert failure.result_type == "certificate-host-mismatch" and failure.enforced


async def test_enforce_refuses_a_certificate_no_trusted_ca_signed(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.a.test"))
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == []
    assert world.env.failures()[0].result_type == "certificate-not-trusted"


async def test_an_mx_outside_the_patterns_is_never_connected(sts_world):
    world = await sts_world()
    world.domain("a.test", answer=Answer(body=policy("enforce", "mx.other.test")))
    mx = await world.mx(MX_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.connections == 0
    (failure,) = world.env.failures()
    assert failure.failure.code == "mtasts-policy-mx-mismatch" and failure.enforced


async def test_a_wildcard_pattern_matches_one_label_only(sts_world):
    world = await sts_world()
    world.domain("a.test", mx=((10, "deep.mx.a.test", MX_IP), (20, "mx.a.test", MX2_IP)),
                 answer=Answer(body=policy("enforce", "*.a.test")))
    deep = await world.mx(MX_IP, "deep.mx.a.test")
    good = await world.mx(MX2_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: good.messages)
    assert deep.connections == 0  # *.a.test does not match deep.mx.a.test (RFC 8461 4.1)


async def test_mx_10_stripped_and_mx_20_good_delivers_at_mx_20_only(sts_world):
    world = await sts_world()
    world.domain("two.test", mx=((10, "mx1.two.test", MX_IP), (20, "mx2.two.test", MX2_IP)),
                 answer=Answer(body=policy("enforce", "mx1.two.test", "mx2.two.test")))
    hidden = await world.mx(REAL_IP, "mx1.two.test")
    attacker = await world.stripper(MX_IP, hidden)
    good = await world.mx(MX2_IP, "mx2.two.test")
    await world.env.send("bob@two.test")
    await eventually(lambda: good.messages)
    assert good.messages[0].tls and hidden.messages == []
    assert b"MAIL FROM" not in plaintext_seen(attacker)
    failure, success = world.env.captured("tls_result")
    assert failure.mx_hostname == "mx1.two.test" and not failure.success
    assert success.mx_hostname == "mx2.two.test" and success.success


async def test_an_enforce_failure_finally_bounces(sts_world):
    world = await sts_world()
    world.domain("a.test", answer=Answer(body=policy("enforce", "mx.a.test",
                                                     max_age=31_000_000)))
    await world.mx(MX_IP, "mx.elsewhere.example")
    sender_mx = await world.env.mta("127.0.0.29")
    world.records["sender.test"] = ["sender.test. MX 10 mx.sender.test.",
                                    "mx.sender.test. A 127.0.0.29"]
    world.publish_zone()
    await world.env.send("bob@a.test")
    await eventually(world.env.deferral_recorded)
    for _ in range(20):  # each retry moves the clock to the next; the last one expires
        if world.env.deferrals() == 0 or sender_mx.messages:
            break
        await world.env.retry()
    await eventually(lambda: sender_mx.messages)
    assert b"certificate names" in sender_mx.messages[0].data


# -- testing ----------------------------------------------------------------------------------

async def test_testing_mode_delivers_to_a_self_signed_mx_and_reports_it(sts_world):
    world = await sts_world()
    world.domain("t.test", answer=Answer(body=policy("testing", "mx.t.test")))
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.t.test"))
    await world.env.send("bob@t.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls
    (failure,) = world.env.captured("tls_result")
    assert failure.result_type == "certificate-not-trusted" and not failure.enforced
    assert failure.policy_type == "sts" and "mode: testing" in failure.policy_strings


async def test_testing_mode_delivers_through_a_stripper_and_reports_it(sts_world):
    world = await sts_world()
    world.domain("t.test", answer=Answer(body=policy("testing", "mx.t.test")))
    real = await world.mx(REAL_IP, "mx.t.test")
    await world.stripper(MX_IP, real)
    await world.env.send("bob@t.test")
    await eventually(lambda: real.messages)
    (failure,) = world.env.captured("tls_result")
    assert failure.result_type == "starttls-not-supported" and not failure.enforced


async def test_a_domain_override_enforces_a_testing_policy(sts_world):
    world = await sts_world("[domain t.test]\napply = enforce\n")
    world.domain("t.test", answer=Answer(body=policy("testing", "mx.t.test")))
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.t.test"))
    await world.env.send("bob@t.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == [] and world.env.failures()[0].enforced


async def test_an_ignored_domain_is_not_looked_up(sts_world):
    world = await sts_world("[domain a.test]\napply = ignore\n")
    world.domain("a.test")
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.a.test"))
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert world.fetches("a.test") == 0
    assert not any(name.startswith("_mta-sts.a.test") for name, _ in world.env.dns.queries)


# -- the policy's life ------------------------------------------------------------------------

async def test_a_new_id_brings_the_new_policy_after_the_check_interval(sts_world):
    world = await sts_world()
    world.domain("a.test")
    first = await world.mx(MX_IP, "mx.a.test")
    second = await world.mx(MX2_IP, "mx2.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: first.messages)
    world.records["a.test"] += ["a.test. MX 20 mx2.a.test.", "mx2.a.test. A 127.0.0.22"]
    world.answers["a.test"] = Answer(body=policy("enforce", "mx2.a.test"))
    world.txt("a.test", "v=STSv1; id=2")
    await world.env.advance(301)
    await world.env.send("carol@a.test")
    await eventually(lambda: second.messages)
    assert len(first.messages) == 1 and world.fetches("a.test") == 2


async def test_the_same_id_fetches_nothing(sts_world):
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    for count, who in enumerate(("bob", "carol", "dave"), 1):
        await world.env.send(f"{who}@a.test")
        await eventually(lambda count=count: len(mx.messages) == count)
        await world.env.advance(301)
    assert world.fetches("a.test") == 1


async def test_a_cached_policy_survives_a_failing_refresh_and_a_restart(sts_world):
    world = await sts_world()
    world.domain("a.test")
    real = await world.mx(REAL_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    world.records["a.test"] = [line.replace(MX_IP, REAL_IP) for line in
                               world.records["a.test"]]
    world.publish_zone()
    await eventually(lambda: real.messages)
    # The policy host goes away and the TXT id changes: the fetch fails, the cached
    # enforce policy stays, and a stripper in front of the MX gets nothing.
    world.answers["a.test"] = Answer(500, b"down")
    world.txt("a.test", "v=STSv1; id=2")
    world.records["a.test"] = [line.replace(REAL_IP, MX_IP) for line in
                               world.records["a.test"]]
    world.publish_zone()
    attacker = await world.stripper(MX_IP, real)
    await world.env.advance(301)
    await world.env.send("carol@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert b"MAIL FROM" not in plaintext_seen(attacker)
    reported = [r.result_type for r in world.env.failures()]
    assert "sts-policy-fetch-error" in reported or "starttls-not-supported" in reported
    # Restarted, with the policy host still down and TXT failing too: still enforced.
    root = world.env.hp.root
    await world.env.hp.server.stop(grace=1.0)
    world.env.dns.servfail.add("_mta-sts.a.test")
    attacker.from_client.clear()
    async with running_server(root, clock=world.env.clock) as again:
        await world.env.advance(120)  # past the retry, well within the hour's lifetime
        await eventually(lambda: any(kind == "deferred" for kind, _ in again.captured))
    assert attacker.connections >= 2  # it was tried again, through the stripper
    assert b"MAIL FROM" not in plaintext_seen(attacker) and len(real.messages) == 1


async def test_mode_none_removes_the_policy(sts_world):
    world = await sts_world()
    world.domain("none.test", mx=((10, "mx.none.test", MX_IP),))
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.none.test"))
    world.answers["none.test"] = Answer(body=policy("none", max_age=86400))
    await world.env.send("bob@none.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls and world.env.failures() == []  # as if no policy


# -- discovery and fetch failures -------------------------------------------------------------

@pytest.mark.parametrize(("name", "answer", "result_type"), [
    ("moved.test", Answer(301, b"", headers={"Location": "https://mta-sts.a.test/"}),
     "sts-policy-fetch-error"),
    ("big.test", Answer(body=policy("enforce", "mx.big.test") + b"x: " + b"y" * 70_000),
     "sts-policy-invalid"),
    ("html.test", Answer(body=policy("enforce", "mx.html.test"), content_type="text/html"),
     "sts-policy-invalid"),
    ("gone.test", Answer(404, b"not found"), "sts-policy-fetch-error"),
])
async def test_a_policy_that_cannot_be_had_is_no_policy_and_is_reported(
        sts_world, name, answer, result_type):
    world = await sts_world()
    world.domain(name, answer=answer)
    mx = await world.mx(MX_IP, f"mx.{name}")
    await world.env.send(f"bob@{name}")
    await eventually(lambda: mx.messages)  # RFC 8461 3.3: as if the domain had none
    (report,) = world.env.captured("tls_result")
    assert report.result_type == result_type and not report.enforced
    assert report.policy_type == "sts" and report.policy_domain == name


async def test_an_expired_policy_host_certificate_is_sts_webpki_invalid(sts_world):
    world = await sts_world()
    world.domain("expired.test", policy_ip=EXPIRED_POLICY_IP)
    mx = await world.mx(MX_IP, "mx.expired.test")
    await world.env.send("bob@expired.test")
    await eventually(lambda: mx.messages)
    (report,) = world.env.captured("tls_result")
    assert report.result_type == "sts-webpki-invalid"


async def test_a_txt_record_with_control_characters_is_no_policy_and_reported(sts_world,
                                                                              caplog):
    world = await sts_world()
    world.domain("a.test", txt="v=STSv1; id=\\0071")
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.a.test"))
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert world.fetches("a.test") == 0
    (report,) = world.env.failures()
    assert report.result_type == "sts-policy-invalid" and not report.enforced
    (line,) = [r.getMessage() for r in caplog.records if "_mta-sts.a.test" in r.getMessage()]
    assert "a.test" in line and "\\x07" in line and "\x07" not in line  # escaped


async def test_a_txt_lookup_that_fails_with_nothing_cached_makes_the_mail_wait(sts_world):
    world = await sts_world()
    world.domain("a.test")
    world.env.dns.servfail.add("_mta-sts.a.test")
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.a.test"))
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    (reason,) = world.env.captured("deferred")
    assert "MTA-STS policy of a.test is not known" in reason
    assert mx.connections == 0


# -- routed mail ------------------------------------------------------------------------------

ROUTER = '''
from harakapy import MxHost, hookimpl


@hookimpl
def get_mx(domain, server):
    port = server.config.ini("outbound.ini").get_int("main", "port")
    return MxHost("mx.b.test", port=port) if domain == "routed.test" else None
'''


async def test_routed_mail_uses_the_routes_policy_never_the_recipient_domains(sts_world):
    world = await sts_world(plugins="relay\nrouter\nmta_sts\nrecorder\n",
                            plugin_files={"router": ROUTER})
    world.domain("b.test", txt=None)  # the route's host has no policy ...
    world.domain("routed.test", answer=Answer(body=policy("enforce", "mx.nowhere.test")))
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.b.test"))
    await world.env.send("bob@routed.test")  # ... and the recipient domain's is not asked
    await eventually(lambda: mx.messages)
    assert world.fetches("routed.test") == 0


# -- what it costs ----------------------------------------------------------------------------

async def test_mail_to_a_domain_without_mta_sts_asks_dns_once_per_check_interval(sts_world):
    world = await sts_world()
    world.domain("a.test", txt=None)
    mx = await world.mx(MX_IP, tls_context=self_signed_context("mx.a.test"))

    def txt_queries() -> int:
        return sum(1 for name, kind in world.env.dns.queries
                   if name == "_mta-sts.a.test" and kind == "TXT")

    for count in (1, 2, 3):
        await world.env.send(f"user{count}@a.test")
        await eventually(lambda count=count: len(mx.messages) == count)
    assert txt_queries() == 1
    await world.env.advance(301)
    await world.env.send("later@a.test")
    await eventually(lambda: len(mx.messages) == 4)
    assert txt_queries() == 2


async def test_waiting_mail_rereads_the_txt_record_before_the_check_interval(sts_world):
    # RFC 8461 5.1: before mail that an enforce policy holds back bounces, the policy is
    # checked for a change. A retry a minute later reads the TXT record again.
    world = await sts_world()
    world.domain("a.test")
    await world.mx(MX_IP, "mx.elsewhere.example")  # fails the policy
    await world.env.send("bob@a.test")
    await eventually(world.env.deferral_recorded)
    good = await world.mx(MX2_IP, "mx2.a.test")
    world.records["a.test"] = [line for line in world.records["a.test"]
                               if " MX " not in line and "mx.a.test" not in line]
    world.records["a.test"] += ["a.test. MX 10 mx2.a.test.", "mx2.a.test. A 127.0.0.22"]
    world.answers["a.test"] = Answer(body=policy("enforce", "mx2.a.test"))
    world.txt("a.test", "v=STSv1; id=2")
    await world.env.retry()  # 60 s later: within the 5-minute check interval
    await eventually(lambda: good.messages)
    assert world.fetches("a.test") == 2


async def test_an_enforce_policy_asks_for_tls_1_2_even_below_the_servers_minimum(
        sts_world):
    world = await sts_world()
    tls_ini = world.env.hp.root / "config" / "tls.ini"
    # An operator who lets old servers in: TLS 1.0 and ciphers OpenSSL would refuse.
    tls_ini.write_text(tls_ini.read_text() + "min_version = TLSv1\n"
                       "ciphers = DEFAULT:@SECLEVEL=0\n")
    assert await world.env.hp.server.reload()
    world.domain("a.test")
    context = old_tls_only(world.env.certs.files("old", "mx.a.test"), ssl.TLSVersion.TLSv1_1)
    mx = await world.mx(MX_IP, tls_context=context)
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == [] and world.env.failures()[0].enforced
