"""An active attacker between harakapy and the receiving server strips STARTTLS (RFC 7672
1.3): at every level above "may" it never reads MAIL FROM, RCPT TO or the message."""

from __future__ import annotations

import pytest

from tests.harness import eventually
from tests.outbound_env import start_mx
from tests.servers import StartTlsStripper


@pytest.mark.parametrize("level", ["encrypt", "verify", "secure"])
@pytest.mark.parametrize("mode", ["strip", "refuse"])
async def test_an_attacker_stripping_starttls_never_gets_the_mail(tls_env, level, mode):
    env = await tls_env(f"strip.test {level}\n")
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


async def test_may_is_what_the_attacker_can_downgrade(tls_env):
    # The reason for every level above "may": at "may" a stripping attacker reads the mail.
    env = await tls_env("strip.test may\n")
    real = await start_mx(env, "good")
    attacker = await env.stack.enter_async_context(
        StartTlsStripper("127.0.0.17", env.port, upstream=(real.host, env.port)))
    await env.send("bob@strip.test")
    await eventually(lambda: real.messages)
    assert b"merger" in bytes(attacker.from_client)
