"""A malformed config/tls_policy, or a policy plugin that fails: harakapy says which file
and line, keeps the table it had, and defers mail rather than send it under a weaker
policy."""

from __future__ import annotations

import pytest

from harakapy.config import ConfigError
from tests.harness import eventually
from tests.outbound_env import start_mx


@pytest.mark.parametrize(("table", "line", "words"), [
    ("example.com verify\nbad.example sekure\n", 2, "unknown level 'sekure'"),
    ("# comment\n\nexample.com\n", 3, "has no policy"),
    ("example.com verify mtach=hostname\n", 1, "unknown attribute 'mtach'"),
    ("example.com fingerprint\n   match=sha256:abcd\n", 1, "64"),
])
async def test_a_malformed_table_stops_the_start_naming_file_and_line(tls_env, table, line,
                                                                      words):
    with pytest.raises(ConfigError) as caught:
        await tls_env(table)
    message = str(caught.value)
    assert f"tls_policy:{line}:" in message and words in message


async def test_a_malformed_table_on_reload_keeps_the_old_one(tls_env):
    env = await tls_env("wrong.test verify\n")
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


async def test_a_failing_policy_plugin_defers_and_never_downgrades(tls_env):
    env = await tls_env("", plugins="broken\n", plugin_files={"broken": BROKEN_POLICY})
    mx = await start_mx(env, "plain")
    await env.send("bob@plain.test")
    await eventually(lambda: env.captured("deferred"))
    (reason,) = env.captured("deferred")
    assert "TLS policy" in reason and "broken" in reason
    assert mx.connections == 0
