"""The engine's side of the DANE interface (RFC 7672): a policy that carries a DANE
authority, TLSA records that authenticate or refuse a server, no records, unusable or
bogus ones, an attacker stripping STARTTLS, and a table entry at dane-only that gets its
authority from the dane_authority hook."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from harakapy.tls import verify
from tests.harness import eventually
from tests.outbound_env import Certs, Env, start_mx
from tests.servers import StartTlsStripper

# A stand-in for the dane plugin (its own issue): TLSA "3 1 1" records from a file, checked
# against the leaf's public key. What is under test is the engine's side of the interface.
DANE_STUB = '''
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harakapy import Failure, Level, Policy, ResultType, TlsaLookup, TlsaRecord, hookimpl


def spki(der):
    public_key = x509.load_der_x509_certificate(der).public_key()
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class Authority:
    def __init__(self, records):
        self.records = records

    async def lookup(self, hostname, port):
        found = self.records.get(hostname)
        if found == "bogus":
            return TlsaLookup(base_domain=hostname, failure=Failure(
                ResultType.DNSSEC_INVALID, "TLSA answer failed DNSSEC validation"))
        if found == "unusable":
            return TlsaLookup(base_domain=hostname, unusable=True)
        return TlsaLookup(tuple(found or ()), base_domain=hostname)

    def verify(self, lookup, chain, hostname, nexthop):
        digest = hashlib.sha256(spki(chain[0])).digest()
        if any(r.data == digest for r in lookup.records):
            return None
        return Failure(ResultType.VALIDATION_FAILURE, "no TLSA record matches", "tlsa-mismatch")


@hookimpl
def tls_policy(domain, server):
    records = {}
    for line in server.config.list("tlsa_stub"):
        host, digest = line.value.split()
        records[host] = digest if digest in ("bogus", "unusable") else [
            TlsaRecord(3, 1, 1, bytes.fromhex(digest))]
    level = Level.DANE_ONLY if domain.startswith(("strip", "two")) else Level.DANE
    return Policy(level, dane=Authority(records))
'''


def spki_sha256(cert_path: str) -> str:
    return verify.fingerprints(ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text()))[1]


async def dane_env(tls_env, tlsa: str) -> Env:
    env = await tls_env("", plugins="dane_stub\n", plugin_files={"dane_stub": DANE_STUB})
    (env.hp.root / "config" / "tlsa_stub").write_text(tlsa)
    assert await env.hp.server.reload()
    return env


async def test_dane_authenticates_by_tlsa_not_by_ca_or_name(tls_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "somewhere.else")
    env = await dane_env(tls_env, f"mx.good.test {spki_sha256(cert[0])}\n")
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.policy_type == "tlsa"
    assert result.policy_domain == "mx.good.test"
    assert result.policy_strings == (f"3 1 1 {spki_sha256(cert[0]).upper()}",)


async def test_dane_refuses_a_certificate_no_tlsa_record_matches(tls_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "mx.good.test")
    env = await dane_env(tls_env, f"mx.good.test {'00' * 32}\n")
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and not mx.commands
    assert env.failures()[0].failure.code == "tlsa-mismatch"


async def test_dane_without_tlsa_records_is_may(tls_env):
    env = await dane_env(tls_env, "")
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: mx.messages)


async def test_a_bogus_tlsa_answer_keeps_mail_from_the_mx_even_at_dane(tls_env):
    env = await dane_env(tls_env, "mx.plain.test bogus\n")
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.connections == 0
    assert env.failures()[0].result_type == "dnssec-invalid"


@pytest.mark.parametrize("mode", ["strip", "refuse"])
async def test_dane_with_records_is_not_downgraded_by_a_stripping_attacker(tls_env, mode):
    env = await dane_env(tls_env, f"mx.strip.test {'00' * 32}\n")
    real = await start_mx(env, "good")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=(real.host, env.port), mode=mode))
    await env.send("bob@strip.test")
    await eventually(lambda: env.captured("deferred"))
    assert b"MAIL FROM" not in bytes(attacker.from_client) and real.messages == []
    assert env.failures()[0].result_type == "starttls-not-supported"


async def test_dane_only_without_records_never_connects(tls_env):
    env = await dane_env(tls_env, "")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=("127.0.0.12", env.port)))
    await env.send("bob@strip.test")
    await eventually(lambda: env.captured("deferred"))
    assert attacker.connections == 0
    assert env.failures()[0].result_type == "dane-required"


@pytest.mark.parametrize(("kind", "delivered"), [("good", True), ("plain", False)])
async def test_unusable_tlsa_records_still_demand_tls(tls_env, kind, delivered):
    # RFC 7672 2.2: TLSA records that exist but none usable: TLS without authentication.
    env = await dane_env(tls_env, f"mx.{kind}.test unusable\n")
    mx = await start_mx(env, kind)
    await env.send(f"bob@{kind}.test")
    if delivered:
        await eventually(lambda: mx.messages)
        assert mx.messages[0].tls
        (report,) = env.captured("tls_result")  # the session counted once, as a failure
        assert report.result_type == "tlsa-invalid" and not report.enforced
    else:
        await eventually(lambda: env.captured("deferred"))
        assert mx.messages == [] and not mx.commands
        assert [r.result_type for r in env.captured("tls_result")] == [
            "tlsa-invalid", "starttls-not-supported"]


# -- a table entry at dane-only, and the dane_authority hook --------------------------------


DANE_PROVIDER = DANE_STUB.replace("@hookimpl\ndef tls_policy(domain, server):", """@hookimpl
def dane_authority(server):
    records = {}
    for line in server.config.list("tlsa_stub"):
        host, digest = line.value.split()
        records[host] = [TlsaRecord(3, 1, 1, bytes.fromhex(digest))]
    return Authority(records)


def unused(domain, server):""")


async def test_a_table_entry_at_dane_only_gets_its_verifier_from_dane_authority(tls_env,
                                                                               tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "somewhere.else")
    env = await tls_env("good.test dane-only\n", plugins="tls_require\ndane_stub\n",
                         plugin_files={"dane_stub": DANE_PROVIDER})
    (env.hp.root / "config" / "tlsa_stub").write_text(f"mx.good.test {spki_sha256(cert[0])}\n")
    assert await env.hp.server.reload()
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.level == "dane-only" and result.policy_type == "tlsa"
    assert result.decided_by == "tls_require"


async def test_dane_only_without_a_dane_plugin_never_delivers(tls_env):
    env = await tls_env("good.test dane-only\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.connections == 0
    assert "no plugin supplies DANE" in env.failures()[0].failure.reason
