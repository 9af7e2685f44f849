"""Each outbound TLS policy level end to end (invariants 2 and 5): harakapy delivers to real
receiving servers on 127.0.0.x, found through a real DNS server, each offering a different
kind of TLS, under each level; which MX, which names and which protocol versions a level
accepts; what a session opened under one policy may carry.

A receiving server that must not get the mail is checked for never having seen MAIL FROM.
"""

from __future__ import annotations

import email
import ssl

import pytest
import trustme

from tests.harness import eventually
from tests.outbound_env import BODY, start_mx

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
async def test_each_level_against_each_kind_of_server(tls_env, level, kind):
    domain = f"{kind}.test"
    env = await tls_env(f"{domain} {level}\n")
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


async def test_may_takes_tls_1_0_rather_than_plaintext(tls_env):
    env = await tls_env("old.test may\n")
    mx = await start_mx(env, "old")
    await env.send("bob@old.test")
    await eventually(lambda: mx.messages)
    (result,) = env.captured("tls_result")
    assert mx.messages[0].tls and result.tls_version == "TLSv1"


async def test_may_falls_back_to_plaintext_after_a_failed_handshake(tls_env):
    # A server whose TLS cannot work with any client (it demands, within a TLS 1.2
    # handshake, a client certificate nobody has): at "may" the same MX gets the mail in
    # plaintext, and the failure is still reported.
    env = await tls_env("good.test may\n")
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


async def test_a_failing_mx_is_skipped_for_the_next_one(tls_env):
    env = await tls_env("two.test verify\n")
    wrong = await start_mx(env, "wrong")  # mx1.two.test: the certificate is for another name
    good = await start_mx(env, "good")  # mx2.two.test
    await env.send("bob@two.test")
    await eventually(lambda: good.messages)
    assert good.messages[0].tls and wrong.messages == []
    kinds = [(r.mx_hostname, r.result_type) for r in env.captured("tls_result")]
    assert kinds == [("mx1.two.test", "certificate-host-mismatch"), ("mx2.two.test", "")]


async def test_secure_matches_the_destination_not_the_mx_name(tls_env):
    # secure's default match= is nexthop:dot-nexthop; mx.good.test is below good.test.
    env = await tls_env("sub.good.test secure\n")
    mx = await start_mx(env, "good")
    await env.send("bob@sub.good.test")
    await eventually(lambda: env.captured("deferred"))
    (failure,) = env.failures()
    assert failure.result_type == "certificate-host-mismatch"
    assert "sub.good.test" in failure.failure.reason
    assert mx.messages == []


async def test_secure_with_match_names_the_accepted_certificates(tls_env):
    env = await tls_env("sub.good.test secure match=.good.test\n")
    mx = await start_mx(env, "good")
    await env.send("bob@sub.good.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls


async def test_verify_uses_the_system_store_without_ca_file(tls_env):
    # The test CA is in no system store: without ca_file the good server is untrusted.
    env = await tls_env("good.test verify\n", tls_outbound="ca_file =\n")
    await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: env.captured("deferred"))
    assert env.failures()[0].result_type == "certificate-not-trusted"


async def test_protocols_attribute_raises_the_floor(tls_env):
    env = await tls_env("good.test encrypt protocols=>=TLSv1.3\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    assert env.captured("tls_result")[0].tls_version == "TLSv1.3"


async def test_default_level_applies_where_no_plugin_answers(tls_env):
    env = await tls_env("", tls_outbound="default_level = verify\n")
    mx = await start_mx(env, "wrong")
    await env.send("bob@wrong.test")
    await eventually(lambda: env.captured("deferred"))
    (failure,) = env.failures()
    assert failure.result_type == "certificate-host-mismatch" and failure.decided_by == ""
    assert mx.messages == []


async def test_a_tls_failure_bounces_at_expiry_with_the_reason(tls_env):
    env = await tls_env("wrong.test verify\n")
    sender_mx = await env.mta("127.0.0.4")
    await start_mx(env, "wrong")
    arrival = env.clock.now
    await env.send("bob@wrong.test")
    await eventually(env.deferral_recorded)
    while env.clock.now - arrival < 3600:  # retry after retry, past the 1h lifetime
        await env.retry()
    await eventually(lambda: sender_mx.messages)  # the attempt past it bounced
    dsn = email.message_from_bytes(sender_mx.messages[0].data)
    text = dsn.as_string()
    assert "Status: 5.7.5" in text
    assert "match none of mx.wrong.test" in text.replace("\n ", " ").replace("\r", "")


# -- connection reuse -----------------------------------------------------------------------


async def test_a_session_is_reused_only_under_the_same_policy(tls_env):
    # good.test and sub.good.test share mx.good.test. A session opened for "may" is never
    # handed to the "verify" destination; one opened under verify serves verify again,
    # without a new negotiation to report (RFC 8460 4.1).
    env = await tls_env("good.test may\nsub.good.test verify\n")
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
