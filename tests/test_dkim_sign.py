"""The dkim_sign plugin and ``harakapy dkim keygen``: keys written as the command writes
them, mail relayed through harakapy to a real receiving server, and the signatures
verified by dkimpy against the key records served by the test's DNS server."""

from __future__ import annotations

import asyncio
import os
import re

import dkim
import dns.message
import dns.query
import pytest

from tests.harness import eventually
from tests.processes import harakapy

BODY = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello\r\n"
        b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n"
        b"the merger closes on friday\r\n")


def keygen(root, domain: str, selector: str, *options: str):
    done = harakapy("dkim", "keygen", domain, selector, "-c", str(root), *options)
    assert done.returncode == 0, done.stderr
    (record,) = [line for line in done.stdout.splitlines() if "_domainkey" in line]
    return record


def zone_line(record: str) -> str:
    """The printed record as a zone file line (its strings as they are)."""
    return record.replace(" 3600 IN TXT ", " TXT ")


def txt_lookup(port: int):
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        query = dns.message.make_query(name.decode(), "TXT")
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)
        for rrset in response.answer:
            for record in rrset:
                return b"".join(record.strings)
        return b""
    return lookup


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    head = message.split(b"\r\n\r\n", 1)[0]
    found = []
    for match in re.finditer(rb"^DKIM-Signature:(.*(?:\r?\n[ \t].*)*)", head, re.M | re.I):
        value = re.sub(rb"\s+", b"", match.group(1))
        found.append(dict(part.split(b"=", 1) for part in value.split(b";") if b"=" in part))
    return found


@pytest.fixture
async def signing_env(outbound_env, config_dir):
    async def start(*keys: tuple[str, str, str]):
        probe = config_dir({"me": "x.test\n"})
        records, sections = [], []
        for domain, selector, algorithm in keys:
            records.append(zone_line(await asyncio.to_thread(
                keygen, probe, domain, selector, "--algorithm", algorithm)))
            sections.append(f"[sign {domain} {selector}]\n"
                            f"key = {probe}/config/dkim/{domain}.{selector}.key\n")
        zone = ("@ SOA ns.test. h.test. 1 3600 600 86400 300\n"
                "dest.test. MX 10 mx.dest.test.\nmx.dest.test. A 127.0.0.3\n"
                + "\n".join(records) + "\n")
        env = await outbound_env(zone, plugins="relay\ndkim_sign\n",
                                 files={"dkim_sign.ini": "".join(sections)}, body=BODY)
        return env, await env.mta("127.0.0.3")

    return start


async def test_relayed_mail_is_signed_with_rsa_and_ed25519_and_verifies(signing_env):
    env, mx = await signing_env(("sender.test", "rsa1", "rsa"),
                                ("sender.test", "ed1", "ed25519"))
    await env.send("bob@dest.test")
    await eventually(lambda: mx.messages)
    message = mx.messages[0].data
    found = signatures(message)
    assert [s[b"a"] for s in found] == [b"rsa-sha256", b"ed25519-sha256"]
    assert all(s[b"d"] == b"sender.test" and b"l" not in s for s in found)
    assert all(s[b"c"] == b"relaxed/relaxed" for s in found)
    assert all(s[b"h"].lower().count(b"from") == 2 for s in found)
    verifier = dkim.DKIM(message)
    lookup = txt_lookup(env.dns.port)  # in a thread: the DNS server runs on this loop
    for index in (0, 1):
        assert await asyncio.to_thread(verifier.verify, idx=index, dnsfunc=lookup)


async def test_a_changed_message_no_longer_verifies(signing_env):
    env, mx = await signing_env(("sender.test", "rsa1", "rsa"))
    await env.send("bob@dest.test")
    await eventually(lambda: mx.messages)
    forged = mx.messages[0].data.replace(b"friday", b"monday")
    assert not await asyncio.to_thread(dkim.verify, forged, dnsfunc=txt_lookup(env.dns.port))


async def test_mail_from_a_domain_without_keys_is_not_signed(signing_env):
    env, mx = await signing_env(("other.test", "rsa1", "rsa"))
    await env.send("bob@dest.test")
    await eventually(lambda: mx.messages)
    assert signatures(mx.messages[0].data) == []


def test_keygen_writes_a_private_key_and_never_overwrites_one(config_dir):
    root = config_dir({"me": "x.test\n"})
    record = keygen(root, "example.org", "s2026")
    assert record.startswith('s2026._domainkey.example.org. 3600 IN TXT "v=DKIM1; k=rsa; p=')
    path = root / "config" / "dkim" / "example.org.s2026.key"
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = harakapy("dkim", "keygen", "example.org", "s2026", "-c", str(root))
    assert again.returncode == 2 and "new selector" in again.stderr


def test_a_key_that_does_not_load_is_named_by_file_and_line(config_dir):
    root = config_dir({"me": "x.test\n", "plugins": "relay\ndkim_sign\n",
                       "dkim_sign.ini": "[sign example.org s1]\nkey = missing.key\n"})
    done = harakapy("tls-policy", "example.org", "-c", str(root))
    assert done.returncode == 2
    assert "dkim_sign.ini:2:" in done.stderr and "missing.key" in done.stderr
    assert "Traceback" not in done.stderr


def test_rsa_signatures_by_openssl_are_the_bytes_dkimpy_itself_makes(tmp_path, monkeypatch):
    # PKCS#1 v1.5 is deterministic: the faster signer must give the very same signature.
    # The signed t= tag must be the same too: both signatures are made in one second.
    from harakapy import dkim as signing

    monkeypatch.setattr(dkim.time, "time", lambda: 1_800_000_000.0)

    content, _ = signing.generate("rsa")
    path = tmp_path / "k.key"
    path.write_bytes(content)
    key = signing.load_key(path, "sender.test", "s1")
    message = BODY
    fast = dkim.sign(message, b"s1", b"sender.test", key.private,
                     include_headers=[b"From", b"To"])
    plain = dkim.crypto.RSASSA_PKCS1_v1_5_sign  # dkimpy's own, still in its module
    dkim.RSASSA_PKCS1_v1_5_sign, fast_sign = plain, dkim.RSASSA_PKCS1_v1_5_sign
    try:
        slow = dkim.sign(message, b"s1", b"sender.test", key.private,
                         include_headers=[b"From", b"To"])
    finally:
        dkim.RSASSA_PKCS1_v1_5_sign = fast_sign
    assert fast_sign is not plain
    assert re.sub(rb"t=\d+;", b"", fast) == re.sub(rb"t=\d+;", b"", slow)


async def test_8bit_mail_is_signed_7bit_and_still_verifies_at_a_server_without_8bitmime(
        outbound_env, config_dir):
    probe = config_dir({"me": "x.test\n"})
    record = zone_line(await asyncio.to_thread(keygen, probe, "sender.test", "rsa1"))
    zone = ("@ SOA ns.test. h.test. 1 3600 600 86400 300\n"
            "dest.test. MX 10 mx.dest.test.\nmx.dest.test. A 127.0.0.3\n" + record + "\n")
    key = probe / "config" / "dkim" / "sender.test.rsa1.key"
    env = await outbound_env(zone, plugins="relay\ndkim_sign\n", files={
        "dkim_sign.ini": f"[sign sender.test rsa1]\nkey = {key}\n"})
    mx = await env.mta("127.0.0.3", drop=("8BITMIME",))
    await env.send("bob@dest.test", body=BODY.replace(b"friday", "vendredi à midi".encode()))
    await eventually(lambda: mx.messages)
    message = mx.messages[0].data
    assert message.isascii() and b"vendredi =C3=A0 midi" in message
    assert await asyncio.to_thread(dkim.verify, message, dnsfunc=txt_lookup(env.dns.port))
