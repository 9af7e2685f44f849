"""The DANE tests' DNSSEC world (tests/dnssec_world.py) tells the truth: each DNSSEC state a
DANE client must tell apart (secure, insecure, secure denial, bogus) comes out of the real
unbound as RFC 4035 §4.3 says, asked as harakapy asks (EDNS0, DO, AD).

Asked with dnspython directly, not through harakapy.dns: these tests prove the world, so
that a DANE test that fails points at harakapy, not at the zone's signatures.
"""

from __future__ import annotations

import subprocess

import dns.asyncquery
import dns.asyncresolver
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.dnssec_world import (
    DnssecWorld,
    missing_binary,
    require_binary,
    tampered,
    tlsa_name,
    tlsa_text,
)

TLSA = "3 1 1 " + "0123456789ABCDEF" * 4
OTHER_TLSA = "3 1 1 " + "FEDCBA9876543210" * 4

ZONE = f"""
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
ns A 127.0.0.1
good MX 10 mx.good
mx.good A 127.0.0.12
_25._tcp.mx.good TLSA {TLSA}
alias.good CNAME mx.good.test.
"""

PLAIN = """
mx A 127.0.0.11
"""

SIGNED = """
mx A 127.0.0.13
"""


@pytest.fixture
async def world(tmp_path):
    # tmp_path keeps the zone files, configs and both logs of a failed test for a reader.
    async with DnssecWorld(ZONE, insecure={"plain.test": PLAIN}, signed={"signed.test": SIGNED},
                           directory=tmp_path / "dns") as world:
        yield world


async def ask(world: DnssecWorld, name: str, rdtype: str) -> dns.message.Message:
    """One query to unbound as harakapy sends it: EDNS0 with DO and a 1232-byte buffer,
    RD and AD set."""
    query = dns.message.make_query(name, rdtype, use_edns=0, want_dnssec=True, payload=1232)
    query.flags |= dns.flags.AD
    return await dns.asyncquery.udp(query, "127.0.0.1", port=world.resolver_port, timeout=5)


def secure(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def records(response: dns.message.Message, rdtype: str) -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return [rdata.to_text().upper() for rrset in response.answer if rrset.rdtype == kind
            for rdata in rrset]


def explain(world: DnssecWorld, response: dns.message.Message) -> str:
    return f"{response}\n{world.unbound_log()}"


async def test_a_signed_name_answers_secure(world):
    response = await ask(world, "mx.good.test.", "A")
    assert response.rcode() == dns.rcode.NOERROR, explain(world, response)
    assert records(response, "A") == ["127.0.0.12"]
    assert secure(response), explain(world, response)


async def test_a_name_in_an_insecure_child_answers_without_ad(world):
    # plain.test. is delegated with no DS: provably unsigned, so insecure, not bogus.
    response = await ask(world, "mx.plain.test.", "A")
    assert response.rcode() == dns.rcode.NOERROR, explain(world, response)
    assert records(response, "A") == ["127.0.0.11"]
    assert not secure(response)
    missing = await ask(world, "nothing.plain.test.", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN and not secure(missing)


async def test_a_name_in_a_signed_child_answers_secure_through_its_ds(world):
    response = await ask(world, "mx.signed.test.", "A")
    assert records(response, "A") == ["127.0.0.13"]
    assert secure(response), explain(world, response)


async def test_a_missing_name_is_a_secure_nxdomain(world):
    # Secure denial: the NSEC chain proves the name and the covering wildcard absent.
    for name in ("nothing.test.", "zzz.test.", "a.test.", "nothing.mx.good.test."):
        response = await ask(world, name, "A")
        assert response.rcode() == dns.rcode.NXDOMAIN, explain(world, response)
        assert secure(response), explain(world, response)


async def test_no_tlsa_at_a_name_with_an_a_is_a_secure_nodata(world):
    # What a DANE client sees for an MX host without TLSA records: DANE does not apply,
    # and that must be proven, not assumed (RFC 7672 §2.2).
    for name, rdtype in (("mx.good.test.", "TLSA"), (tlsa_name("mx.good.test"), "A"),
                         ("_tcp.mx.good.test.", "TLSA")):  # the last: an empty non-terminal
        response = await ask(world, name, rdtype)
        assert response.rcode() == dns.rcode.NOERROR, explain(world, response)
        assert response.answer == []
        assert secure(response), explain(world, response)


async def test_a_cname_inside_the_signed_zone_answers_secure(world):
    response = await ask(world, "alias.good.test.", "A")
    assert records(response, "CNAME") == ["MX.GOOD.TEST."]
    assert records(response, "A") == ["127.0.0.12"]
    assert secure(response), explain(world, response)


async def test_a_tlsa_rrset_changed_after_signing_is_bogus(world):
    await world.update(tamper=tampered(tlsa_name("mx.good.test"), "TLSA", OTHER_TLSA))
    response = await ask(world, tlsa_name("mx.good.test"), "TLSA")
    # Bogus answers as SERVFAIL, never as an insecure answer; RFC 8914 says why.
    assert response.rcode() == dns.rcode.SERVFAIL, explain(world, response)
    codes = [option.code for option in response.options if isinstance(option, dns.edns.EDEOption)]
    assert codes == [dns.edns.EDECode.DNSSEC_BOGUS], explain(world, response)
    assert "validation failure <_25._tcp.mx.good.test. TLSA IN>" in world.unbound_log()
    # Only that RRset: the rest of the zone still validates.
    assert secure(await ask(world, "mx.good.test.", "A"))


async def test_a_record_in_a_signed_child_changed_after_signing_is_bogus(world):
    await world.update(tamper=tampered("mx.signed.test.", "A", "127.0.0.66"))
    response = await ask(world, "mx.signed.test.", "A")
    assert response.rcode() == dns.rcode.SERVFAIL, explain(world, response)


async def test_tlsa_records_stripped_after_signing_are_bogus_not_absent(world):
    # The NSEC at the name still lists TLSA: the "no such records" answer is a forgery.
    await world.update(tamper=tampered(tlsa_name("mx.good.test"), "TLSA"))
    response = await ask(world, tlsa_name("mx.good.test"), "TLSA")
    assert response.rcode() == dns.rcode.SERVFAIL, explain(world, response)


async def test_an_update_is_seen_by_the_next_query(world):
    before = await ask(world, "_25._tcp.mx2.good.test.", "TLSA")
    assert before.rcode() == dns.rcode.NXDOMAIN and secure(before)
    await world.update(ZONE + f"mx2.good A 127.0.0.14\n_25._tcp.mx2.good TLSA {OTHER_TLSA}\n")
    after = await ask(world, "_25._tcp.mx2.good.test.", "TLSA")
    assert records(after, "TLSA") == [OTHER_TLSA], explain(world, after)
    assert secure(after), explain(world, after)
    # And back: the tampered answer of one generation is not served in the next.
    await world.update(tamper=tampered("_25._tcp.mx2.good", "TLSA", TLSA))
    assert (await ask(world, "_25._tcp.mx2.good.test.", "TLSA")).rcode() == dns.rcode.SERVFAIL
    await world.update()
    assert secure(await ask(world, "_25._tcp.mx2.good.test.", "TLSA"))


async def test_a_stub_resolver_set_up_as_harakapys_reads_the_ad_bit(world):
    # dnspython's resolver, configured as harakapy.dns.Resolver configures it.
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], world.resolver_port
    resolver.use_edns(0, dns.flags.DO, 1232)
    resolver.flags = dns.flags.RD | dns.flags.AD
    answer = await resolver.resolve(tlsa_name("mx.good.test"), "TLSA", lifetime=5)
    assert [rdata.to_text().upper() for rdata in answer] == [TLSA]
    assert answer.response.flags & dns.flags.AD
    insecure = await resolver.resolve("mx.plain.test.", "A", lifetime=5)
    assert not insecure.response.flags & dns.flags.AD
    assert world.dns_ini().startswith(f"[main]\nnameservers = 127.0.0.1\nport = "
                                      f"{world.resolver_port}\n")


async def test_the_signed_zones_verify_with_ldns(world):
    # A second, independent validator of what dnspython's signer wrote (NSEC chain complete,
    # every authoritative RRset signed, glue and delegation NS unsigned).
    verify = require_binary("ldns-verify-zone", "ldnsutils")
    for name in ("test", "signed.test"):
        done = subprocess.run([verify, str(world.directory / f"{name}.zone")],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Zone is verified and complete" in done.stdout + done.stderr


def test_tlsa_text_agrees_with_ldns_dane(tmp_path, tls_ca: trustme.CA):
    dane = require_binary("ldns-dane", "ldnsutils")
    issued = tls_ca.issue_cert("mx.good.test")
    pem = issued.cert_chain_pems[0].bytes()
    (tmp_path / "cert.pem").write_bytes(pem)
    for selector in (0, 1):
        for mtype in (0, 1, 2):
            done = subprocess.run([dane, "-n", "-c", str(tmp_path / "cert.pem"), "create",
                                   "mx.good.test", "25", "3", str(selector), str(mtype)],
                                  capture_output=True, text=True, timeout=10, check=True)
            expected = done.stdout.split("TLSA", 1)[1].split()
            assert tlsa_text(3, selector, mtype, pem).split() == [
                expected[0], expected[1], expected[2], "".join(expected[3:]).upper()]


def test_tlsa_text_takes_der_pem_or_a_certificate(tls_ca: trustme.CA):
    pem = tls_ca.issue_cert("mx.good.test").cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert tlsa_text(2, 0, 1, pem) == tlsa_text(2, 0, 1, der) == tlsa_text(2, 0, 1, cert)
    assert tlsa_text(3, 0, 0, der) == f"3 0 0 {der.hex().upper()}"
    with pytest.raises(ValueError, match="selector 2"):
        tlsa_text(3, 2, 1, der)


def test_a_missing_binary_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nsd"):
        require_binary("nsd-that-is-not-installed", "nsd")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing_binary("nsd not found: apt-get install nsd")
