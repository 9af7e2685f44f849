"""Report-only policies and MX patterns, as the mta_sts plugin will answer with them
(RFC 8461): a stand-in plugin returns STS-like policies; what is under test is the engine."""

from __future__ import annotations

import pytest

from tests.harness import eventually
from tests.outbound_env import Env, start_mx

STS_STUB = '''
from harakapy import Level, Policy, PolicySource, hookimpl


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


async def sts_env(tls_env, stub: str) -> Env:
    env = await tls_env("", plugins="sts_stub\n", plugin_files={"sts_stub": STS_STUB})
    (env.hp.root / "config" / "sts_stub").write_text(stub)
    assert await env.hp.server.reload()
    return env


async def test_an_mx_outside_the_policy_patterns_is_never_connected(tls_env):
    env = await sts_env(tls_env, "two.test enforce mx2.two.test\n")
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
async def test_a_report_only_policy_reports_and_delivers_encrypted(tls_env, kind,
                                                                   result_type):
    env = await sts_env(tls_env, f"{kind}.test testing mx.{kind}.test\n")
    mx = await start_mx(env, kind)
    await env.send(f"bob@{kind}.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls  # as at "may": encrypted, unauthenticated
    (failure,) = env.captured("tls_result")  # the failure, and no success besides
    assert failure.result_type == result_type and not failure.enforced
    assert failure.policy_type == "sts"


async def test_an_enforced_sts_like_policy_never_falls_back(tls_env):
    env = await sts_env(tls_env, "expired.test enforce mx.expired.test\n")
    mx = await start_mx(env, "expired")
    await env.send("bob@expired.test")
    await eventually(lambda: env.captured("deferred"))
    assert mx.messages == [] and env.failures()[0].enforced


async def test_a_report_only_mx_mismatch_is_reported_once(tls_env):
    env = await sts_env(tls_env, "good.test testing mx.other.test\n")
    mx = await start_mx(env, "good")
    await env.send("bob@good.test")
    await eventually(lambda: mx.messages)
    (report,) = env.captured("tls_result")
    assert report.failure.code == "mtasts-policy-mx-mismatch" and not report.enforced
