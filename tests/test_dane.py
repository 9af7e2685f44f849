"""The dane plugin end to end: zones the test signs, served by NSD and validated by a real
unbound (tests/dnssec_world.py), real receiving MX servers with certificates the test
makes, a STARTTLS stripper, and harakapy delivering between them (RFC 7672, RFC 7671,
../shared/specs/dane-smtp.md)."""

from __future__ import annotations

import pytest
import trustme

from tests.dane_world import (
    MX2_IP,
    MX_IP,
    POLICY_IP,
    REAL_IP,
    dane_ee_zone,
    issued,
    self_signed,
    sent_in_plaintext,
    zone,
)
from tests.dnssec_world import tampered, tlsa_name, tlsa_text
from tests.harness import eventually
from tests.policy_host import PolicyHost, plain, server_context

# -- DANE-EE ----------------------------------------------------------------------------------

async def test_dane_ee_delivers_to_a_self_signed_server_the_tlsa_record_names(
        dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await dane_world(dane_ee_zone("a.test", cert))
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_type == "tlsa"
    assert result.policy_domain == "mx.a.test" and result.decided_by == "dane"
    assert result.policy_strings == (tlsa_text(3, 1, 1, cert.der),)


async def test_the_wrong_key_is_never_sent_the_mail(dane_world, tmp_path):
    published = self_signed(tmp_path, "mx.a.test")
    presented = self_signed(tmp_path / "..", "mx.a.test")
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(3, 1, 1, published.der)}\n")))
    mx = await world.mx(MX_IP, presented)
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == [] and not any("MAIL" in c for c in mx.commands)
    (failure,) = world.env.failures()
    assert failure.result_type == "certificate-not-trusted" and failure.enforced
    assert failure.policy_type == "tlsa"


async def test_starttls_stripped_in_front_of_a_dane_mx_leaks_nothing(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await dane_world(dane_ee_zone("a.test", cert))
    real = await world.mx(REAL_IP, cert)
    attacker = await world.stripper(MX_IP, real)
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    seen = sent_in_plaintext(attacker)
    assert b"EHLO" in seen and b"MAIL FROM" not in seen and b"merger" not in seen
    assert real.messages == []
    assert world.env.failures()[0].result_type == "starttls-not-supported"


@pytest.mark.parametrize(("usage", "selector", "mtype"), [
    (3, 0, 0), (3, 0, 1), (3, 0, 2), (3, 1, 0), (3, 1, 2),
    (2, 0, 0), (2, 0, 2), (2, 1, 0), (2, 1, 1), (2, 1, 2),
])
async def test_every_usage_selector_and_matching_type_delivers(dane_world, tmp_path, usage,
                                                               selector, mtype):
    ca = trustme.CA()
    cert = issued(tmp_path, ca, "mx.a.test")
    target = cert.der if usage == 3 else cert.issuer_der
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(usage, selector, mtype, target)}\n")))
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages or world.env.captured("deferred"))
    assert mx.messages, world.env.failures()


async def test_a_key_rollover_pair_delivers_with_the_current_key(dane_world, tmp_path):
    current = self_signed(tmp_path, "mx.a.test")
    next_key = self_signed(tmp_path / "..", "mx.a.test")
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(3, 1, 1, next_key.der)}\n"
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(3, 1, 1, current.der)}\n")))
    mx = await world.mx(MX_IP, current)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)


# -- DANE-TA ----------------------------------------------------------------------------------

async def test_dane_ta_delivers_when_the_name_matches_and_not_otherwise(dane_world, tmp_path):
    ca = trustme.CA()
    right = issued(tmp_path, ca, "mx.a.test")
    wrong = issued(tmp_path, ca, "mx.elsewhere.example")
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(2, 0, 1, right.issuer_der)}\n"))
        + zone("b.test", ip=MX2_IP, extra=(
            f"{tlsa_name('mx.b.test', port)} TLSA {tlsa_text(2, 0, 1, wrong.issuer_der)}\n")))
    good = await world.mx(MX_IP, right)
    bad = await world.mx(MX2_IP, wrong)
    await world.env.send(["bob@a.test", "carol@b.test"])
    await eventually(lambda: good.messages and world.env.captured("deferred"))
    assert bad.messages == []
    (failure,) = world.env.failures()
    assert failure.result_type == "certificate-host-mismatch"


# -- what DNS says --------------------------------------------------------------------------------

async def test_a_tlsa_rrset_changed_after_signing_is_bogus_and_rules_the_mx_out(
        dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    honest = tlsa_text(3, 1, 1, self_signed(tmp_path / "..", "mx.a.test").der)
    forged = tlsa_text(3, 1, 1, cert.der)  # the attacker's key, without a signature
    world = await dane_world(
        lambda port: zone("a.test", extra=f"{tlsa_name('mx.a.test', port)} TLSA {honest}\n"),
        tamper=None)
    await world.dns.update(tamper=tampered(tlsa_name("mx.a.test", world.port), "TLSA",
                                           forged))
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.connections == 0 and mx.messages == []
    (failure,) = world.env.failures()
    assert failure.result_type == "dnssec-invalid" and failure.enforced


async def test_only_pkix_usages_mean_tls_without_authentication(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {tlsa_text(1, 1, 1, cert.der)}\n"))
        + zone("b.test", ip=MX2_IP, extra=(
            f"{tlsa_name('mx.b.test', port)} TLSA {tlsa_text(1, 1, 1, cert.der)}\n")))
    mx = await world.mx(MX_IP, self_signed(tmp_path / "..", "mx.a.test"))
    real = await world.mx(REAL_IP, cert)
    attacker = await world.stripper(MX2_IP, real)
    await world.env.send(["bob@a.test", "carol@b.test"])
    await eventually(lambda: mx.messages and world.env.captured("deferred"))
    assert mx.messages[0].tls  # any certificate, but TLS
    assert b"MAIL FROM" not in sent_in_plaintext(attacker)  # and TLS is mandatory
    reported = {r.result_type for r in world.env.captured("tls_result")}
    assert "tlsa-invalid" in reported and "starttls-not-supported" in reported


async def test_an_mx_that_is_a_cname_uses_the_expanded_name(dane_world, tmp_path):
    cert = self_signed(tmp_path, "real.a.test")
    world = await dane_world(lambda port: (
        "a.test. MX 10 mx.a.test.\nmx.a.test. CNAME real.a.test.\n"
        f"real.a.test. A {MX_IP}\n"
        f"{tlsa_name('real.a.test', port)} TLSA {tlsa_text(3, 1, 1, cert.der)}\n"))
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_domain == "real.a.test"


async def test_an_insecure_mx_rrset_gets_no_dane(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.plain.test")
    other = self_signed(tmp_path / "..", "mx.plain.test")
    world = await dane_world(lambda port: "", insecure=lambda port: {"plain.test": (
        f"plain.test. MX 10 mx.plain.test.\nmx.plain.test. A {MX_IP}\n"
        f"{tlsa_name('mx.plain.test', port)} TLSA {tlsa_text(3, 1, 1, other.der)}\n")})
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@plain.test")
    await eventually(lambda: mx.messages)  # as at may: the records are not trusted
    assert all(r.policy_type != "tlsa" for r in world.env.captured("tls_result"))


async def test_a_signed_mx_with_insecure_addresses_gets_no_dane(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.plain.test")
    other = self_signed(tmp_path / "..", "mx.plain.test")
    world = await dane_world(
        lambda port: ("a.test. MX 10 mx.plain.test.\n"
                      f"{tlsa_name('mx.plain.test', port)} TLSA "
                      f"{tlsa_text(3, 1, 1, other.der)}\n"),
        insecure={"plain.test": f"mx.plain.test. A {MX_IP}\n"})
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert all(r.policy_type != "tlsa" for r in world.env.captured("tls_result"))


async def test_dane_decides_for_an_mx_with_tlsa_even_under_an_mta_sts_policy(
        dane_world, outbound_env, tmp_path):
    # Only DANE trusts the certificate; the MTA-STS policy (enforce) would refuse it.
    cert = self_signed(tmp_path, "mx.both.test")
    policy = b"version: STSv1\nmode: enforce\nmx: mx.both.test\nmax_age: 86400\n"
    host = await outbound_env.stack.enter_async_context(PolicyHost(
        POLICY_IP, server_context(outbound_env.certs.ca, "mta-sts.both.test"), plain(policy)))
    world = await dane_world(lambda port: zone("both.test", extra=(
        f"{tlsa_name('mx.both.test', port)} TLSA {tlsa_text(3, 1, 1, cert.der)}\n"
        f'_mta-sts.both.test. TXT "v=STSv1; id=1"\nmta-sts.both.test. A {POLICY_IP}\n')),
        mta_sts_ini=f"[main]\nport = {host.port}\n")
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@both.test")
    await eventually(lambda: mx.messages or world.env.captured("deferred"))
    assert mx.messages
    (result,) = world.env.captured("tls_result")
    assert result.policy_type == "tlsa" and result.success


async def test_without_tlsa_records_the_mta_sts_policy_applies(dane_world, outbound_env,
                                                              tmp_path):
    cert = self_signed(tmp_path, "mx.both.test")  # no CA: MTA-STS refuses it
    policy = b"version: STSv1\nmode: enforce\nmx: mx.both.test\nmax_age: 86400\n"
    host = await outbound_env.stack.enter_async_context(PolicyHost(
        POLICY_IP, server_context(outbound_env.certs.ca, "mta-sts.both.test"), plain(policy)))
    world = await dane_world(lambda port: zone("both.test", extra=(
        f'_mta-sts.both.test. TXT "v=STSv1; id=1"\nmta-sts.both.test. A {POLICY_IP}\n')),
        mta_sts_ini=f"[main]\nport = {host.port}\n")
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@both.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == []
    (failure,) = world.env.failures()
    assert failure.policy_type == "sts" and failure.result_type == "certificate-not-trusted"


async def test_a_resolver_that_does_not_validate_is_named_at_start(outbound_env, caplog):
    env = await outbound_env("@ SOA ns.test. h.test. 1 3600 600 86400 300\n",
                             plugins="relay\ndane\n")
    await eventually(lambda: any("does not validate DNSSEC" in r.getMessage()
                                 for r in caplog.records))
    assert env.hp.server is not None


async def test_tls_policy_shows_the_dnssec_state_and_which_record_matched(dane_world,
                                                                        tmp_path):
    import asyncio
    import json

    from tests.processes import harakapy

    cert = self_signed(tmp_path, "mx.a.test")
    record = tlsa_text(3, 1, 1, cert.der)
    world = await dane_world(lambda port: zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', port)} TLSA {record}\n")))
    mx = await world.mx(MX_IP, cert)
    root = str(world.env.hp.root)
    done = await asyncio.to_thread(harakapy, "tls-policy", "a.test", "-c", root, "--probe",
                                   "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["level"] == "dane" and report["decided_by"] == "dane"
    facts = report["details"]["dane"]
    assert facts["mx_records"] == "secure"
    (host,) = facts["hosts"]
    assert host["addresses"] == "secure" and host["base_domain"] == "mx.a.test"
    assert host["records"] == [record] and host["matched"].startswith(record)
    (probe,) = report["probes"]
    assert probe["verdict"] == "pass" and not mx.messages
    text = (await asyncio.to_thread(harakapy, "tls-policy", "a.test", "-c", root)).stdout
    assert "DNSSEC:      MX records secure" in text
    assert "DANE:        mx.a.test: TLSA at mx.a.test" in text and record in text


async def test_a_session_pooled_without_tlsa_never_carries_mail_once_records_appear(
        dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    published = self_signed(tmp_path / "..", "mx.a.test")  # not the server's key
    world = await dane_world(lambda port: zone("a.test"))
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert mx.connections == 1  # pooled, idle, still open
    await world.dns.update(zone("a.test", extra=(
        f"{tlsa_name('mx.a.test', world.port)} TLSA {tlsa_text(3, 1, 1, published.der)}\n")))
    await world.env.send("carol@a.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert len(mx.messages) == 1 and mx.connections == 2
    assert world.env.failures()[-1].result_type == "certificate-not-trusted"


async def test_insecure_mx_dane_honours_secure_tlsa_of_the_mx_hosts(dane_world, tmp_path):
    cert = self_signed(tmp_path, "mx.a.test")
    published = self_signed(tmp_path / "..", "mx.a.test")
    world = await dane_world(
        lambda port: (f"mx.a.test. A {MX_IP}\n{tlsa_name('mx.a.test', port)} TLSA "
                      f"{tlsa_text(3, 1, 1, published.der)}\n"),
        insecure={"plain.test": "plain.test. MX 10 mx.a.test.\n"})
    mx = await world.mx(MX_IP, cert)
    dane_ini = world.env.hp.root / "config" / "dane.ini"
    dane_ini.write_text("[main]\ninsecure_mx = dane\n")
    assert await world.env.hp.server.reload()
    await world.env.send("bob@plain.test")
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == []
    assert world.env.failures()[0].result_type == "certificate-not-trusted"


async def test_dane_only_refuses_mx_records_dnssec_does_not_sign(dane_world, tmp_path):
    # A forged (unsigned) MX names a host in a signed zone whose TLSA records are the
    # forger's own: at dane-only that must not pass.
    cert = self_signed(tmp_path, "mx.a.test")
    world = await dane_world(
        lambda port: (f"mx.a.test. A {MX_IP}\n{tlsa_name('mx.a.test', port)} TLSA "
                      f"{tlsa_text(3, 1, 1, cert.der)}\n"),
        insecure={"plain.test": "plain.test. MX 10 mx.a.test.\n"},
        plugins="relay\ntls_require\ndane\nrecorder\n")
    (world.env.hp.root / "config" / "tls_policy").write_text("plain.test dane-only\n")
    assert await world.env.hp.server.reload()
    mx = await world.mx(MX_IP, cert)
    await world.env.send("bob@plain.test")
    await eventually(lambda: world.env.captured("deferred"))
    (reason,) = world.env.captured("deferred")
    assert "not DNSSEC-signed" in reason and mx.connections == 0
