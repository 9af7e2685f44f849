"""A policy plugin that strengthens the others' answer, as the REQUIRETLS plugin will
(RFC 8689): a required EHLO extension and a MAIL FROM parameter on top of the table's
policy."""

from __future__ import annotations

import pytest

from tests.harness import eventually

REQUIRETLS_STUB = '''
from dataclasses import replace

from harakapy import Level, hookimpl


@hookimpl
async def tls_policy(domain, hosts, routed, message, server):
    if message is None or not message.sender.startswith("secret"):
        return None
    base = await server.next_policy(domain, hosts, routed=routed, message=message)
    level = base.level if base.level in (Level.VERIFY, Level.SECURE) else Level.VERIFY
    return replace(base, level=level, required_extensions=("REQUIRETLS",),
                   mail_parameters=("REQUIRETLS",), reason="REQUIRETLS over " + base.reason)
'''


@pytest.mark.parametrize(("offers", "delivered"), [(True, True), (False, False)])
async def test_a_strengthening_plugin_adds_a_required_extension_and_mail_parameter(
        tls_env, offers, delivered):
    env = await tls_env("good.test may\n", plugins="requiretls_stub\ntls_require\n",
                         plugin_files={"requiretls_stub": REQUIRETLS_STUB})
    cert = env.certs.files("good", "mx.good.test")
    mx = await env.mta("127.0.0.12", cert=cert, mail_params=("REQUIRETLS",),
                       extensions=("PIPELINING", "REQUIRETLS") if offers else ("PIPELINING",))
    await env.send("bob@good.test", sender="secret@sender.test")
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
