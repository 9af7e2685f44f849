"""Mail a get_mx plugin routes through a smarthost takes the policy of that next hop, and
each next hop its own (as Postfix looks each up on its own)."""

from __future__ import annotations

import pytest

from tests.harness import eventually
from tests.outbound_env import start_mx

ROUTER = '''
from harakapy import MxHost, hookimpl


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
async def test_routed_mail_takes_the_policy_of_the_next_hop(tls_env, table, delivered):
    env = await tls_env("", plugins="router\ntls_require\n", plugin_files={"router": ROUTER})
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


ROUTER_TWO = '''
from harakapy import MxHost, hookimpl


@hookimpl
def get_mx(domain, server):
    port = int(server.config.value("smarthost_port"))
    return [MxHost("mx.elsewhere.example", port=port), MxHost("mx.good.test", port=port)]
'''


async def test_each_routed_next_hop_has_its_own_policy(tls_env):
    # Postfix looks each next hop up on its own: [mx.elsewhere.example] (a host with no
    # address here) has no entry and must not lend mx.good.test's entry to itself, nor
    # its name to mx.good.test's secure check.
    env = await tls_env("", plugins="router\ntls_require\n",
                         plugin_files={"router": ROUTER_TWO})
    (env.hp.root / "config" / "smarthost_port").write_text(f"{env.port}\n")
    (env.hp.root / "config" / "tls_policy").write_text("[mx.good.test] secure\n")
    assert await env.hp.server.reload()
    smarthost = await start_mx(env, "good")
    await env.send("bob@wrong.test")
    await eventually(lambda: smarthost.messages)
    (result,) = env.captured("tls_result")
    assert result.level == "secure" and result.domain == "mx.good.test"
