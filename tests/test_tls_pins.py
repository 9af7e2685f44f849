"""The fingerprint level and the tls_pin plugin: a server is known by its certificate or
public key, whatever CA signed it and whatever names it bears."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from harakapy.tls import verify
from tests.harness import eventually
from tests.outbound_env import Certs, Env, start_mx


def pin_of(cert_path: str, *, key: bool = False) -> str:
    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    certificate, public_key = verify.fingerprints(der)
    return "sha256:" + (public_key if key else certificate)


def untrusted_cert(env: Env, name: str) -> tuple[str, str]:
    """A certificate for another name, from a CA nobody trusts."""
    return Certs(trustme.CA(), env.certs.dir).files(name, "somewhere.else")


async def test_fingerprint_checks_neither_chain_nor_names(tls_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("pinned", "somewhere.else")
    env = await tls_env(f"selfsigned.test fingerprint match={pin_of(cert[0])}\n")
    mx = await env.mta("127.0.0.15", cert=cert)
    await env.send("bob@selfsigned.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls
    assert env.captured("tls_result")[0].level == "fingerprint"


async def test_fingerprint_accepts_a_public_key_pin_and_refuses_other_keys(tls_env, tmp_path):
    cert = Certs(trustme.CA(), tmp_path).files("pinned", "somewhere.else")
    other = Certs(trustme.CA(), tmp_path).files("other", "somewhere.else")
    env = await tls_env(f"selfsigned.test fingerprint match={pin_of(other[0], key=True)}|"
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


async def test_tls_pin_rotation_accepts_either_pin(tls_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    new = Certs(trustme.CA(), tmp_path).files("new", "mx.good.test")
    env = await tls_env(tls_pin=f"[good.test]\npins = {pin_of(old[0])}, "
                                 f"{pin_of(new[0], key=True)}\n")
    mx = await env.mta("127.0.0.12", cert=new)
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert result.success and result.decided_by == "tls_pin"


async def test_tls_pin_enforce_keeps_mail_from_an_unpinned_server(tls_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await tls_env(tls_pin=f"[.test]\npins = {pin_of(old[0])}\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and not mx.commands
    assert env.failures()[0].enforced


async def test_tls_pin_report_mode_delivers_and_reports(tls_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await tls_env(tls_pin=f"[good.test]\npins = {pin_of(old[0])}\nmode = report\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls  # delivered over the TLS session whose pin failed
    (failure,) = env.captured("tls_result")
    assert failure.result_type == "validation-failure" and not failure.enforced


async def test_tls_require_comes_before_tls_pin(tls_env, tmp_path):
    old = Certs(trustme.CA(), tmp_path).files("old", "mx.good.test")
    env = await tls_env("good.test verify\n", tls_pin=f"[good.test]\npins = {pin_of(old[0])}\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert env.captured("tls_result")[0].decided_by == "tls_require"
