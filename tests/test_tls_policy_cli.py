"""``harakapy tls-policy``: the policy for a domain, where it came from, and a probe of each
MX that never starts a transaction."""

from __future__ import annotations

import asyncio
import json

from tests.outbound_env import start_mx
from tests.processes import harakapy


async def run_cli(*args: str):
    # In a thread: the receiving servers and the DNS server live on this test's loop.
    return await asyncio.to_thread(harakapy, "tls-policy", *args)


async def test_tls_policy_command_shows_the_policy_and_probes_each_mx(tls_env):
    env = await tls_env("# the partner's MXes\ntwo.test verify\n")
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


async def test_tls_policy_command_text_says_what_each_check_found(tls_env):
    env = await tls_env("", tls_outbound="default_level = encrypt\n")
    await start_mx(env, "selfsigned")
    done = await run_cli("selfsigned.test", "-c", str(env.hp.root), "--probe")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "policy:      encrypt" in text and "(no plugin: the default)" in text
    assert "STARTTLS:    offered" in text and "  policy:      PASS" in text
    assert "would pass verify (CA store): no: certificate-not-trusted" in text


async def test_tls_policy_command_names_the_bad_line_of_a_table(tls_env):
    env = await tls_env("good.test verify\n")
    (env.hp.root / "config" / "tls_policy").write_text("good.test verify\nbad.test sekure\n")
    done = await run_cli("good.test", "-c", str(env.hp.root))
    assert done.returncode == 2
    assert "tls_policy:2:" in done.stderr and "sekure" in done.stderr
    assert "Traceback" not in done.stderr
