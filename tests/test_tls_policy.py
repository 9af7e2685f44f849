"""The outbound TLS policy engine end to end (invariants 2 and 5): harakapy delivers to
real receiving servers on 127.0.0.x, found through a real DNS server, each offering a
different kind of TLS, under each policy level; an attacker in the middle strips STARTTLS.

A receiving server that must not get the mail is checked for never having seen MAIL FROM;
one behind the attacker, for the attacker never having read MAIL FROM or the message.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import json
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from harakapy.config import ConfigError
from harakapy.tls import verify
from harakapy.tls.context import self_signed_context
from tests.dns_server import DnsServer
from tests.harness import ManualClock, Running, eventually, running_server, sendmail
from tests.processes import harakapy
from tests.servers import ReceivingMTA, StartTlsStripper
from tests.test_outbound import free_port_on_all

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
sender.test. MX 10 mx.sender.test.
mx.sender.test. A 127.0.0.4
plain.test. MX 10 mx.plain.test.
mx.plain.test. A 127.0.0.11
good.test. MX 10 mx.good.test.
mx.good.test. A 127.0.0.12
sub.good.test. MX 10 mx.good.test.
wrong.test. MX 10 mx.wrong.test.
mx.wrong.test. A 127.0.0.13
expired.test. MX 10 mx.expired.test.
mx.expired.test. A 127.0.0.14
selfsigned.test. MX 10 mx.selfsigned.test.
mx.selfsigned.test. A 127.0.0.15
old.test. MX 10 mx.old.test.
mx.old.test. A 127.0.0.16
old11.test. MX 10 mx.old11.test.
mx.old11.test. A 127.0.0.18
strip.test. MX 10 mx.strip.test.
mx.strip.test. A 127.0.0.17
two.test. MX 10 mx1.two.test.
two.test. MX 20 mx2.two.test.
mx1.two.test. A 127.0.0.13
mx2.two.test. A 127.0.0.12
"""

RECORDER = '''
from harakapy import hookimpl


@hookimpl
def tls_result(result, server):
    server.notes.setdefault("captured", []).append(("tls_result", result))


@hookimpl
def deferred(recipients, reason, server):
    server.notes.setdefault("captured", []).append(("deferred", reason))
'''

BODY = b"Subject: secret\r\n\r\nthe merger closes on friday\r\n"


@dataclass
class Certs:
    ca: trustme.CA
    dir: Path

    def files(self, name: str, *identities: str, **options) -> tuple[str, str]:
        issued = self.ca.issue_cert(*identities, **options)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)


@dataclass
class Env:
    hp: Running
    clock: ManualClock
    port: int
    stack: AsyncExitStack
    certs: Certs

    async def mta(self, host: str, **options) -> ReceivingMTA:
        return await self.stack.enter_async_context(ReceivingMTA(host, self.port, **options))

    async def send(self, recipient: str) -> None:
        await sendmail(self.hp.port, "alice@sender.test", [recipient], BODY)

    def captured(self, kind: str) -> list:
        return [item for k, item in self.hp.captured if k == kind]

    def failures(self) -> list:
        return [r for r in self.captured("tls_result") if not r.success]

    def spooled(self) -> list[str]:
        return sorted(p.name for p in (self.hp.root / "queue" / "msg").iterdir())


@pytest.fixture
async def make_env(config_dir, tmp_path):
    dns = await DnsServer(ZONE).start()
    port = free_port_on_all((4, *range(11, 19)))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    certs = Certs(ca, tmp_path)
    stack = AsyncExitStack()

    async def make(tls_policy: str = "", *, tls_pin: str = "",
                   outbound: str = "", plugins: str = "tls_require\ntls_pin\n",
                   plugin_files: dict[str, str] | None = None) -> Env:
        files = {
            "me": "harakapy.test\n",
            "plugins": f"relay\n{plugins}recorder\n",
            "dns.ini": f"[main]\nnameservers = 127.0.0.1\nport = {dns.port}\ntimeout = 1\n",
            "outbound.ini": f"[main]\nport = {port}\nmin_backoff = 60\nmax_backoff = 600\n"
                            "max_queue_lifetime = 1h\nconnect_timeout = 2\n"
                            "command_timeout = 5\n",
            "tls.ini": f"[outbound]\nca_file = {tmp_path / 'ca.pem'}\n{outbound}",
            "tls_policy": tls_policy,
        }
        if tls_pin:
            files["tls_pin.ini"] = tls_pin
        root = config_dir(files, {"recorder": RECORDER, **(plugin_files or {})})
        clock = ManualClock()
        hp = await stack.enter_async_context(running_server(root, clock=clock))
        return Env(hp, clock, port, stack, certs)

    async with stack:
        yield make
    dns.close()


def old_tls_only(cert: tuple[str, str], version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        context.minimum_version = version
        context.maximum_version = version
    return context


async def start_mx(env: Env, kind: str) -> ReceivingMTA:
    """The receiving server of each kind, on the address its test domain's MX has."""
    certs = env.certs
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    if kind == "plain":
        return await env.mta("127.0.0.11")
    if kind == "good":
        cert = certs.files("good", "mx.good.test", "good.test", "mx2.two.test")
        return await env.mta("127.0.0.12", cert=cert)
    if kind == "wrong":
        return await env.mta("127.0.0.13", cert=certs.files("wrong", "mx.elsewhere.example"))
    if kind == "expired":
        cert = certs.files("expired", "mx.expired.test", not_before=past,
                           not_after=past + datetime.timedelta(days=30))
        return await env.mta("127.0.0.14", cert=cert)
    if kind == "selfsigned":
        return await env.mta("127.0.0.15", tls_context=self_signed_context("mx.selfsigned.test"))
    if kind == "old":
        context = old_tls_only(certs.files("old", "mx.old.test"), ssl.TLSVersion.TLSv1)
        return await env.mta("127.0.0.16", tls_context=context)
    if kind == "old11":
        context = old_tls_only(certs.files("old11", "mx.old11.test"), ssl.TLSVersion.TLSv1_1)
        return await env.mta("127.0.0.18", tls_context=context)
    raise AssertionError(kind)


# What each level does with each kind of receiving server: "tls" delivered encrypted,
# "plain" delivered in plaintext, else the RFC 8460 result type of the failure that keeps
# the mail from the MX (the message waits in the queue).
OUTCOMES = {
    ("none", "good"): "plain",
    ("may", "plain"): "plain",
    ("may", "good"): "tls",
    ("may", "wrong"): "tls",
    ("may", "expired"): "tls",
    ("may", "selfsigned"): "tls",
    ("may", "old"): "tls",
    ("may", "old11"): "tls",
    ("encrypt", "plain"): "starttls-not-supported",
    ("encrypt", "good"): "tls",
    ("encrypt", "selfsigned"): "tls",
    ("encrypt", "old"): "validation-failure",
    ("encrypt", "old11"): "validation-failure",
    ("encrypt", "wrong"): "tls",
    ("encrypt", "expired"): "tls",
    ("verify", "plain"): "starttls-not-supported",
    ("verify", "good"): "tls",
    ("verify", "wrong"): "certificate-host-mismatch",
    ("verify", "expired"): "certificate-expired",
    ("verify", "selfsigned"): "certificate-not-trusted",
    ("verify", "old"): "validation-failure",
    ("verify", "old11"): "validation-failure",
    ("secure", "plain"): "starttls-not-supported",
    ("secure", "good"): "tls",
    ("secure", "wrong"): "certificate-host-mismatch",
    ("secure", "expired"): "certificate-expired",
    ("secure", "selfsigned"): "certificate-not-trusted",
    ("secure", "old11"): "validation-failure",
    ("none", "plain"): "plain",
}


@pytest.mark.parametrize(("level", "kind"), list(OUTCOMES), ids=[f"{lv}-{k}" for lv, k in OUTCOMES])
async def test_each_level_against_each_kind_of_server(make_env, level, kind):
    domain = f"{kind}.test"
    env = await make_env(f"{domain} {level}\n")
    mx = await start_mx(env, kind)
    await env.send(f"bob@{domain}")
    expected = OUTCOMES[(level, kind)]
    if expected in ("tls", "plain"):
        await eventually(lambda: mx.messages)
        assert mx.messages[0].tls is (expected == "tls")
        assert mx.messages[0].data.endswith(BODY)
        if expected == "tls":
            (result,) = env.captured("tls_result")
            assert result.success and result.level == level
            assert result.mx_hostname == f"mx.{domain}" and result.receiving_ip == mx.host
            assert result.tls_version.startswith("TLS")
        return
    await eventually(lambda: env.captured("deferred"))
    (failure,) = env.failures()
    assert failure.result_type == expected and failure.enforced
    assert failure.mx_hostname == f"mx.{domain}" and failure.receiving_ip == mx.host
    assert failure.policy_type == "no-policy-found" and failure.decided_by == "tls_require"
    # Nothing of the message reached the server: not even the envelope.
    assert mx.messages == [] and not any(c.startswith(("MAIL", "RCPT")) for c in mx.commands)
    assert len(env.spooled()) == 1
    (reason,) = env.captured("deferred")
    assert f"mx.{domain}" in reason


async def test_may_takes_tls_1_0_rather_than_plaintext(make_env):
    env = await make_env("old.test may\n")
    mx = await start_mx(env, "old")
    await env.send("bob@old.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert mx.messages[0].tls and result.tls_version == "TLSv1"


async def test_may_falls_back_to_plaintext_after_a_failed_handshake(make_env):
    # A server whose TLS cannot work with any client (it demands, within a TLS 1.2
    # handshake, a client certificate nobody has): at "may" the same MX gets the mail in
    # plaintext, and the failure is still reported.
    env = await make_env("good.test may\n")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*env.certs.files("demanding", "mx.good.test"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
    mx = await env.mta("127.0.0.12", tls_context=context)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert not mx.messages[0].tls
    (failure,) = env.failures()
    assert failure.result_type == "validation-failure" and not failure.enforced


@pytest.mark.parametrize("level", ["encrypt", "verify", "secure"])
@pytest.mark.parametrize("mode", ["strip", "refuse"])
async def test_an_attacker_stripping_starttls_never_gets_the_mail(make_env, level, mode):
    env = await make_env(f"strip.test {level}\n")
    real = await start_mx(env, "good")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=(real.host, env.port), mode=mode))
    await env.send("bob@strip.test")
    await eventually(lambda: env.captured("deferred"))
    assert attacker.connections >= 1
    seen = bytes(attacker.from_client)
    assert b"EHLO" in seen
    assert b"MAIL FROM" not in seen and b"RCPT TO" not in seen and b"merger" not in seen
    assert real.messages == []
    (failure,) = env.failures()
    assert failure.result_type == "starttls-not-supported"


async def test_may_is_what_the_attacker_can_downgrade(make_env):
    # The reason for every level above "may": at "may" a stripping attacker reads the mail.
    env = await make_env("strip.test may\n")
    real = await start_mx(env, "good")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=(real.host, env.port)))
    await env.send("bob@strip.test")
    await eventually(lambda: real.messages)
    assert b"merger" in bytes(attacker.from_client)


async def test_a_failing_mx_is_skipped_for_the_next_one(make_env):
    env = await make_env("two.test verify\n")
    wrong = await start_mx(env, "wrong")  # mx1.two.test: the certificate is for another name
    good = await start_mx(env, "good")  # mx2.two.test
    await env.send("bob@two.test")
    await eventually(lambda: good.messages)
    assert good.messages[0].tls and wrong.messages == []
    kinds = [(r.mx_hostname, r.result_type) for r in env.captured("tls_result")]
    assert kinds == [("mx1.two.test", "certificate-host-mismatch"), ("mx2.two.test", "")]


async def test_secure_matches_the_destination_not_the_mx_name(make_env):
    # secure's default match= is nexthop:dot-nexthop; mx.good.test is below good.test.
    env = await make_env("sub.good.test secure\n")
    mx = await start_mx(env, "good")
    await env.send("bob@sub.good.test")
    await eventually(lambda: env.captured("deferred"))
    (failure,) = env.failures()
    assert failure.result_type == "certificate-host-mismatch"
    assert "sub.good.test" in failure.failure.reason
    assert mx.messages == []


async def test_secure_with_match_names_the_accepted_certificates(make_env):
    env = await make_env("sub.good.test secure match=.good.test\n")
    mx = await start_mx(env, "good")
    await env.send("bob@sub.good.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls


async def test_verify_uses_the_system_store_without_ca_file(make_env):
    # The test CA is in no system store: without ca_file the good server is untrusted.
    env = await make_env("good.test verify\n", outbound="ca_file =\n")
    await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert env.failures()[0].result_type == "certificate-not-trusted"


async def test_protocols_attribute_raises_the_floor(make_env):
    env = await make_env("good.test encrypt protocols=>=TLSv1.3\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert env.captured("tls_result")[0].tls_version == "TLSv1.3"


async def test_default_level_applies_where_no_plugin_answers(make_env):
    env = await make_env("", outbound="default_level = verify\n")
    mx = await start_mx(env, "wrong")
    await env.send("bob@wrong.test")
    await eventually(lambda: env.captured("deferred"))
    (failure,) = env.failures()
    assert failure.result_type == "certificate-host-mismatch" and failure.decided_by == ""
    assert mx.messages == []


async def test_a_tls_failure_bounces_at_expiry_with_the_reason(make_env):
    env = await make_env("wrong.test verify\n")
    sender_mx = await env.mta("127.0.0.4")
    await start_mx(env, "wrong")
    await env.send("bob@wrong.test")
    await eventually(lambda: env.captured("deferred"))
    for _ in range(10):
        env.clock.advance(600)
        await eventually(lambda: sender_mx.messages or len(env.captured("deferred")) > 1)
        if sender_mx.messages:
            break
    await eventually(lambda: sender_mx.messages)
    dsn = email.message_from_bytes(sender_mx.messages[0].data)
    text = dsn.as_string()
    assert "Status: 5.7.5" in text
    assert "match none of mx.wrong.test" in text.replace("\n ", " ").replace("\r", "")


# -- fingerprint and tls_pin ----------------------------------------------------------------


def pin_of(cert_path: str, *, key: bool = False) -> str:
    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    certificate, public_key = verify.fingerprints(der)
    return "sha256:" + (public_key if key else certificate)


def untrusted_cert(env: Env, name: str) -> tuple[str, str]:
    """A certificate for another name, from a CA nobody trusts."""
    return Certs(trustme.CA(), env.certs.dir).files(name, "somewhere.else")


async def test_fingerprint_checks_neither_chain_nor_names(make_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("pinned", "somewhere.else")
    env = await make_env(f"selfsigned.test fingerprint match={pin_of(cert[0])}\n")
    mx = await env.mta("127.0.0.15", cert=cert)
    await env.send("bob@selfsigned.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls
    assert env.captured("tls_result")[0].level == "fingerprint"


async def test_fingerprint_accepts_a_public_key_pin_and_refuses_other_keys(make_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("pinned", "somewhere.else")
    other = Certs(trustme.CA(), tmp_path).files("other", "somewhere.else")
    env = await make_env(f"selfsigned.test fingerprint match={pin_of(other[0], key=True)}|"
                         f"{pin_of(other[0])}\n"
                         f"wrong.test fingerprint match={pin_of(cert[0], key=True)}\n")
    refused = await env.mta("127.0.0.15", cert=cert)
    taken = await env.mta("127.0.0.13", cert=cert)
    await env.send("bob@selfsigned.test")
    await env.send("bob@wrong.test")
    await eventually(lambda: taken.messages and env.captured("deferred"))
    assert refused.messages == [] and not refused.commands
    (failure,) = env.failures()
    assert failure.result_type == "validation-failure" and failure.failure.code == \
        "fingerprint-mismatch"


async def test_tls_pin_rotation_accepts_either_pin(make_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    new = Certs(trustme.CA(), tmp_path).files("new", "mx.good.test")
    env = await make_env(tls_pin=f"[good.test]\npins = {pin_of(old[0])}, "
                                 f"{pin_of(new[0], key=True)}\n")
    mx = await env.mta("127.0.0.12", cert=new)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.decided_by == "tls_pin"


async def test_tls_pin_enforce_keeps_mail_from_an_unpinned_server(make_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await make_env(tls_pin=f"[.test]\npins = {pin_of(old[0])}\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and not mx.commands
    assert env.failures()[0].enforced


async def test_tls_pin_report_mode_delivers_and_reports(make_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await make_env(tls_pin=f"[good.test]\npins = {pin_of(old[0])}\nmode = report\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls  # delivered over the TLS session whose pin failed
    (failure,) = env.captured("tls_result")
    assert failure.result_type == "validation-failure" and not failure.enforced


async def test_tls_require_comes_before_tls_pin(make_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await make_env("good.test verify\n", tls_pin=f"[good.test]\npins = {pin_of(old[0])}\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert env.captured("tls_result")[0].decided_by == "tls_require"


# -- malformed policy files -----------------------------------------------------------------


@pytest.mark.parametrize(("table", "line", "words"), [
    ("example.com verify\nbad.example sekure\n", 2, "unknown level 'sekure'"),
    ("# comment\n\nexample.com\n", 3, "has no policy"),
    ("example.com verify mtach=hostname\n", 1, "unknown attribute 'mtach'"),
    ("example.com fingerprint\n   match=sha256:abcd\n", 1, "64"),
])
async def test_a_malformed_table_stops_the_start_naming_file_and_line(make_env, table, line,
                                                                      words):
    with pytest.raises(ConfigError) as caught:
        await make_env(table)
    message = str(caught.value)
    assert f"tls_policy:{line}:" in message and words in message


async def test_a_malformed_table_on_reload_keeps_the_old_one(make_env):
    env = await make_env("wrong.test verify\n")
    (env.hp.root / "config" / "tls_policy").write_text("wrong.test sekure\n")
    assert not await env.hp.server.reload()
    mx = await start_mx(env, "wrong")
    await env.send("bob@wrong.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and env.failures()[0].result_type == "certificate-host-mismatch"


BROKEN_POLICY = '''
from harakapy import hookimpl


@hookimpl
def tls_policy(domain):
    raise RuntimeError("policy source unavailable")
'''


async def test_a_failing_policy_plugin_defers_and_never_downgrades(make_env):
    env = await make_env("", plugins="broken\n", plugin_files={"broken": BROKEN_POLICY})
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: env.captured("deferred"))
    (reason,) = env.captured("deferred")
    assert "TLS policy" in reason and "broken" in reason
    assert mx.connections == 0


# -- the DANE interface ---------------------------------------------------------------------

# A stand-in for the dane plugin (its own issue): TLSA "3 1 1" records from a file, checked
# against the leaf's public key. What is under test is the engine's side of the interface.
DANE_STUB = '''
import hashlib

from harakapy import hookimpl
from harakapy.tls import verify
from harakapy.tls.policy import Level, Policy, TlsaLookup, TlsaRecord
from harakapy.tls.results import Failure, ResultType


class Authority:
    def __init__(self, records):
        self.records = records

    async def lookup(self, host):
        found = self.records.get(host.hostname)
        if found == "bogus":
            return TlsaLookup(base_domain=host.hostname, failure=Failure(
                ResultType.DNSSEC_INVALID, "TLSA answer failed DNSSEC validation"))
        if found == "unusable":
            return TlsaLookup(base_domain=host.hostname, unusable=True)
        return TlsaLookup(tuple(found or ()), base_domain=host.hostname)

    def verify(self, lookup, chain, host, nexthop):
        digest = hashlib.sha256(verify.spki_der(chain[0])).digest()
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


async def dane_env(make_env, tlsa: str) -> Env:
    env = await make_env("", plugins="dane_stub\n", plugin_files={"dane_stub": DANE_STUB})
    (env.hp.root / "config" / "tlsa_stub").write_text(tlsa)
    assert await env.hp.server.reload()
    return env


async def test_dane_authenticates_by_tlsa_not_by_ca_or_name(make_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "somewhere.else")
    env = await dane_env(make_env, f"mx.good.test {spki_sha256(cert[0])}\n")
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.policy_type == "tlsa"
    assert result.policy_domain == "mx.good.test"
    assert result.policy_strings == (f"3 1 1 {spki_sha256(cert[0]).upper()}",)


async def test_dane_refuses_a_certificate_no_tlsa_record_matches(make_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "mx.good.test")
    env = await dane_env(make_env, f"mx.good.test {'00' * 32}\n")
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and not mx.commands
    assert env.failures()[0].failure.code == "tlsa-mismatch"


async def test_dane_without_tlsa_records_is_may(make_env):
    env = await dane_env(make_env, "")
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: mx.messages)


async def test_a_bogus_tlsa_answer_keeps_mail_from_the_mx_even_at_dane(make_env):
    env = await dane_env(make_env, "mx.plain.test bogus\n")
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.connections == 0
    assert env.failures()[0].result_type == "dnssec-invalid"


@pytest.mark.parametrize("mode", ["strip", "refuse"])
async def test_dane_with_records_is_not_downgraded_by_a_stripping_attacker(make_env, mode):
    env = await dane_env(make_env, f"mx.strip.test {'00' * 32}\n")
    real = await start_mx(env, "good")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=(real.host, env.port), mode=mode))
    await env.send("bob@strip.test")
    await eventually(lambda: env.captured("deferred"))
    assert b"MAIL FROM" not in bytes(attacker.from_client) and real.messages == []
    assert env.failures()[0].result_type == "starttls-not-supported"


async def test_dane_only_without_records_never_connects(make_env):
    env = await dane_env(make_env, "")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=("127.0.0.12", env.port)))
    await env.send("bob@strip.test")
    await eventually(lambda: env.captured("deferred"))
    assert attacker.connections == 0
    assert env.failures()[0].result_type == "dane-required"


# -- harakapy tls-policy --------------------------------------------------------------------


async def run_cli(*args: str):
    # In a thread: the receiving servers and the DNS server live on this test's loop.
    return await asyncio.to_thread(harakapy, "tls-policy", *args)


async def test_tls_policy_command_shows_the_policy_and_probes_each_mx(make_env):
    env = await make_env("# the partner's MXes\ntwo.test verify\n")
    wrong = await start_mx(env, "wrong")
    good = await start_mx(env, "good")
    done = await run_cli("two.test", "-c", str(env.hp.root), "--probe", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["level"] == "verify" and report["decided_by"] == "tls_require"
    assert "tls_policy:2" in report["why"]
    assert report["hosts"] == [f"mx1.two.test:{env.port} (MX 10)",
                               f"mx2.two.test:{env.port} (MX 20)"]
    first, second = report["probes"]
    assert first["verdict"] == "fail" and first["result_type"] == "certificate-host-mismatch"
    assert first["certificate"]["names"] == ["mx.elsewhere.example"]
    assert second["verdict"] == "pass" and second["tls_version"].startswith("TLS")
    assert "mx2.two.test" in second["certificate"]["names"]
    # A probe never starts a transaction.
    assert not wrong.commands and not good.commands and not good.messages


async def test_tls_policy_command_text_says_what_each_check_found(make_env):
    env = await make_env("", outbound="default_level = encrypt\n")
    await start_mx(env, "selfsigned")
    done = await run_cli("selfsigned.test", "-c", str(env.hp.root), "--probe")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "policy:      encrypt" in text and "(no plugin: the default)" in text
    assert "STARTTLS:    offered" in text and "  policy:      PASS" in text
    assert "would pass verify (CA store): no: certificate-not-trusted" in text


async def test_tls_policy_command_names_the_bad_line_of_a_table(make_env):
    env = await make_env("good.test verify\n")
    (env.hp.root / "config" / "tls_policy").write_text("good.test verify\nbad.test sekure\n")
    done = await run_cli("good.test", "-c", str(env.hp.root))
    assert done.returncode == 2
    assert "tls_policy:2:" in done.stderr and "sekure" in done.stderr
    assert "Traceback" not in done.stderr


# -- connection reuse -----------------------------------------------------------------------


async def test_a_session_is_reused_only_under_the_same_policy(make_env):
    # good.test and sub.good.test share mx.good.test. A session opened for "may" is never
    # handed to the "verify" destination; one opened under verify serves verify again,
    # without a new negotiation to report (RFC 8460 4.1).
    env = await make_env("good.test may\nsub.good.test verify\n")
    mx = await start_mx(env, "good")
    await env.send("a@good.test")
    await eventually(lambda: len(mx.messages) == 1)
    await env.send("b@sub.good.test")
    await eventually(lambda: len(mx.messages) == 2)
    assert mx.connections == 2
    await env.send("c@sub.good.test")
    await eventually(lambda: len(mx.messages) == 3)
    assert mx.connections == 2
    levels = [r.level for r in env.captured("tls_result")]
    assert levels == ["may", "verify"]


# -- report-only policies and mx patterns (what the mta_sts plugin will answer with) --------

STS_STUB = '''
from harakapy import hookimpl
from harakapy.tls.policy import Level, Policy, PolicySource


@hookimpl
def tls_policy(domain, server):
    for line in server.config.list("sts_stub"):
        name, mode, patterns = line.value.split()
        if name == domain:
            mx = tuple(patterns.split(","))
            lines = ("version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in mx))
            return Policy(Level.VERIFY, mx_patterns=mx, enforce=mode == "enforce",
                          source=PolicySource("sts", domain, lines, mx))
    return None
'''


async def sts_env(make_env, stub: str) -> Env:
    env = await make_env("", plugins="sts_stub\n", plugin_files={"sts_stub": STS_STUB})
    (env.hp.root / "config" / "sts_stub").write_text(stub)
    assert await env.hp.server.reload()
    return env


async def test_an_mx_outside_the_policy_patterns_is_never_connected(make_env):
    env = await sts_env(make_env, "two.test enforce mx2.two.test\n")
    outside = await start_mx(env, "wrong")  # mx1.two.test, listed first
    inside = await start_mx(env, "good")  # mx2.two.test
    await env.send("bob@two.test")
    await eventually(lambda: inside.messages)
    assert outside.connections == 0
    first, second = env.captured("tls_result")
    assert first.mx_hostname == "mx1.two.test" and first.failure.code == \
        "mtasts-policy-mx-mismatch"
    assert second.success and second.policy_type == "sts"
    assert second.mx_host_patterns == ("mx2.two.test",)
    assert "mode: enforce" in second.policy_strings


@pytest.mark.parametrize(("kind", "result_type"), [
    ("wrong", "certificate-host-mismatch"),  # the handshake completes; names fail
    ("expired", "certificate-expired"),  # the handshake itself fails
])
async def test_a_report_only_policy_reports_and_delivers_encrypted(make_env, kind,
                                                                   result_type):
    env = await sts_env(make_env, f"{kind}.test testing mx.{kind}.test\n")
    mx = await start_mx(env, kind)
    await env.send(f"bob@{kind}.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls  # as at "may": encrypted, unauthenticated
    (failure,) = env.captured("tls_result")  # the failure, and no success besides
    assert failure.result_type == result_type and not failure.enforced
    assert failure.policy_type == "sts"


async def test_an_enforced_sts_like_policy_never_falls_back(make_env):
    env = await sts_env(make_env, "expired.test enforce mx.expired.test\n")
    mx = await start_mx(env, "expired")
    await env.send("bob@expired.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and env.failures()[0].enforced


ROUTER = '''
from harakapy import hookimpl
from harakapy.outbound.mx import MxHost


@hookimpl
def get_mx(domain, server):
    port = int(server.config.value("smarthost_port"))
    return MxHost("mx.good.test", port=port)  # every domain through one smarthost
'''


@pytest.mark.parametrize(("table", "delivered"), [
    ("[mx.good.test]:{port} secure\n", True),  # secure's nexthop is the smarthost
    ("[mx.good.test] verify match=mx.elsewhere.example\n", False),
    ("wrong.test encrypt\n[mx.good.test] secure match=nexthop\n", True),
])
async def test_routed_mail_takes_the_policy_of_the_next_hop(make_env, table, delivered):
    env = await make_env("", plugins="router\ntls_require\n", plugin_files={"router": ROUTER})
    (env.hp.root / "config" / "smarthost_port").write_text(f"{env.port}\n")
    (env.hp.root / "config" / "tls_policy").write_text(table.format(port=env.port))
    assert await env.hp.server.reload()
    smarthost = await start_mx(env, "good")
    await env.send("bob@wrong.test")
    if delivered:
        await eventually(lambda: smarthost.messages)
        (result,) = env.captured("tls_result")
        assert result.domain == "mx.good.test" and result.decided_by == "tls_require"
    else:
        await eventually(lambda: env.captured("deferred"))
        assert smarthost.messages == []
        assert env.failures()[0].result_type == "certificate-host-mismatch"


DANE_PROVIDER = DANE_STUB.replace("@hookimpl\ndef tls_policy(domain, server):", """@hookimpl
def dane_authority(server):
    records = {}
    for line in server.config.list("tlsa_stub"):
        host, digest = line.value.split()
        records[host] = [TlsaRecord(3, 1, 1, bytes.fromhex(digest))]
    return Authority(records)


def unused(domain, server):""")


async def test_a_table_entry_at_dane_only_gets_its_verifier_from_dane_authority(make_env,
                                                                               tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("dane", "somewhere.else")
    env = await make_env("good.test dane-only\n", plugins="tls_require\ndane_stub\n",
                         plugin_files={"dane_stub": DANE_PROVIDER})
    (env.hp.root / "config" / "tlsa_stub").write_text(f"mx.good.test {spki_sha256(cert[0])}\n")
    assert await env.hp.server.reload()
    mx = await env.mta("127.0.0.12", cert=cert)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.level == "dane-only" and result.policy_type == "tlsa"
    assert result.decided_by == "tls_require"


async def test_dane_only_without_a_dane_plugin_never_delivers(make_env):
    env = await make_env("good.test dane-only\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.connections == 0
    assert "no plugin supplies DANE" in env.failures()[0].failure.reason


@pytest.mark.parametrize(("kind", "delivered"), [("good", True), ("plain", False)])
async def test_unusable_tlsa_records_still_demand_tls(make_env, kind, delivered):
    # RFC 7672 2.2: TLSA records that exist but none usable: TLS without authentication.
    env = await dane_env(make_env, f"mx.{kind}.test unusable\n")
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


async def test_a_report_only_mx_mismatch_is_reported_once(make_env):
    env = await sts_env(make_env, "good.test testing mx.other.test\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (report,) = env.captured("tls_result")
    assert report.failure.code == "mtasts-policy-mx-mismatch" and not report.enforced


ROUTER_TWO = '''
from harakapy import hookimpl
from harakapy.outbound.mx import MxHost


@hookimpl
def get_mx(domain, server):
    port = int(server.config.value("smarthost_port"))
    return [MxHost("mx.elsewhere.example", port=port), MxHost("mx.good.test", port=port)]
'''


async def test_each_routed_next_hop_has_its_own_policy(make_env):
    # Postfix looks each next hop up on its own: [mx.elsewhere.example] (a host with no
    # address here) has no entry and must not lend mx.good.test's entry to itself, nor
    # its name to mx.good.test's secure check.
    env = await make_env("", plugins="router\ntls_require\n",
                         plugin_files={"router": ROUTER_TWO})
    (env.hp.root / "config" / "smarthost_port").write_text(f"{env.port}\n")
    (env.hp.root / "config" / "tls_policy").write_text("[mx.good.test] secure\n")
    assert await env.hp.server.reload()
    smarthost = await start_mx(env, "good")
    await env.send("bob@wrong.test")
    await eventually(lambda: smarthost.messages)
    (result,) = env.captured("tls_result")
    assert result.level == "secure" and result.domain == "mx.good.test"



# -- a policy that strengthens the others' answer (what the REQUIRETLS plugin will do) ----

REQUIRETLS_STUB = '''
from dataclasses import replace

from harakapy import hookimpl
from harakapy.outbound.tls_policy import find_policy
from harakapy.tls.policy import Level


@hookimpl
async def tls_policy(domain, hosts, routed, message, server):
    if message is None or not message.sender.startswith("secret"):
        return None
    base = await find_policy(server, domain, hosts, routed=routed, message=message,
                             after="requiretls_stub")
    level = base.level if base.level in (Level.VERIFY, Level.SECURE) else Level.VERIFY
    return replace(base, level=level, required_extensions=("REQUIRETLS",),
                   mail_parameters=("REQUIRETLS",), reason="REQUIRETLS over " + base.reason)
'''


@pytest.mark.parametrize(("offers", "delivered"), [(True, True), (False, False)])
async def test_a_strengthening_plugin_adds_a_required_extension_and_mail_parameter(
        make_env, offers, delivered):
    env = await make_env("good.test may\n", plugins="requiretls_stub\ntls_require\n",
                         plugin_files={"requiretls_stub": REQUIRETLS_STUB})
    cert = env.certs.files("good", "mx.good.test")
    mx = await env.mta("127.0.0.12", cert=cert, mail_params=("REQUIRETLS",),
                       extensions=("PIPELINING", "REQUIRETLS") if offers else ("PIPELINING",))
    await sendmail(env.hp.port, "secret@sender.test", ["bob@good.test"], BODY)
    if delivered:
        await eventually(lambda: mx.messages)
        assert "REQUIRETLS" in mx.messages[0].mail_options and mx.messages[0].tls
        (result,) = env.captured("tls_result")
        assert result.level == "verify" and result.decided_by == "requiretls_stub"
    else:
        await eventually(lambda: env.captured("deferred"))
        assert mx.messages == [] and not any(c.startswith("MAIL") for c in mx.commands)
        assert env.failures()[0].failure.code == "requiretls-not-offered"
    # Other mail to the same domain keeps the table's policy.
    await env.send("carol@good.test")
    await eventually(lambda: any(m.recipients == ["carol@good.test"] for m in mx.messages))
