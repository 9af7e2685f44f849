"""Outbound BDAT (RFC 3030) to servers that offer CHUNKING: a second harakapy and
Debian's Postfix as the receivers, message text arriving byte for byte."""

from __future__ import annotations

import pytest

from tests.harness import CAPTURE_PLUGIN, eventually, running_server
from tests.outbound_env import OUTBOUND_INI
from tests.postfix_receiver import PostfixReceiver, require_postfix

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
dest.test. MX 10 mx.dest.test.
mx.dest.test. A 127.0.0.3
"""
# Lines a dot starts, which DATA would have to stuff.
BODY = b"Subject: dots\r\n\r\n.\r\n..two\r\n. three\r\nend\r\n"
REFUSE = '''
from harakapy import deny, hookimpl


@hookimpl
def rcpt(recipient):
    if recipient.local == "nobody":
        return deny("no such user", enhanced="5.1.1")
'''


@pytest.fixture
async def receiver(outbound_env, config_dir):
    """harakapy sending (``env``) to a harakapy receiving on mx.dest.test."""

    async def start(outbound_ini: str = ""):
        env = await outbound_env(ZONE, body=BODY, outbound_ini=OUTBOUND_INI + outbound_ini)
        root = config_dir({"host_list": "dest.test\n", "me": "mx.dest.test\n",
                           "plugins": "refuse\nrcpt_to.in_host_list\ncapture\n",
                           "smtp.ini": f"[main]\nlisten = 127.0.0.3:{env.port}\n"},
                          {"capture": CAPTURE_PLUGIN, "refuse": REFUSE})
        hp = await env.stack.enter_async_context(running_server(root))
        return env, hp

    return start


def received(hp) -> list[bytes]:
    # Without the receiver's own Received: header.
    return [t.message.split(b"\r\n", 1)[1] for _, t in hp.captured]


async def test_bdat_carries_the_message_byte_for_byte(receiver):
    env, hp = await receiver()
    await env.send(["bob@dest.test", "nobody@dest.test"])
    await eventually(lambda: hp.captured)
    assert received(hp)[0].endswith(BODY)
    (_, transaction), = hp.captured
    assert [r.address for r in transaction.recipients] == ["bob@dest.test"]


async def test_a_large_message_waits_for_the_recipients_before_its_chunk(receiver):
    env, hp = await receiver()
    big = b"Subject: big\r\n\r\n" + (b"." + b"x" * 77 + b"\r\n") * 2000  # 160 KB
    await env.send(["bob@dest.test"], body=big)
    await eventually(lambda: hp.captured)
    assert received(hp)[0].endswith(big)


async def test_no_accepted_recipient_sends_no_message(receiver):
    env, hp = await receiver()
    big = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n" * 1500
    await env.send(["nobody@dest.test"], body=big)
    await eventually(lambda: env.spooled() == [])  # bounced (no notice: sender.test absent)
    await env.send(["nobody@dest.test"])
    await eventually(lambda: env.spooled() == [])
    assert hp.captured == []


async def test_postfix_gets_bdat_and_with_chunking_off_data(outbound_env):
    require_postfix()
    for chunking, verb in (("true", "BDAT"), ("false", "DATA")):
        env = await outbound_env(ZONE, body=BODY,
                                 outbound_ini=OUTBOUND_INI + f"chunking = {chunking}\n")
        async with PostfixReceiver("127.0.0.3", env.port, domains=("dest.test",)) as mx:
            await env.send(["bob@dest.test"])
            (held,) = await mx.wait_for_messages(1)
            # The session stays open for reuse: the command itself is what is waited for.
            await mx.wait_for_log(r"< \S+: (BDAT|DATA)\b")
            said = [line.split()[1].upper() for line in mx.transcript()
                    if line.startswith("< ")]
        assert verb in said and ({"BDAT", "DATA"} - {verb}).isdisjoint(said)
        assert held.raw.endswith(BODY.replace(b"\r\n", b"\n"))
