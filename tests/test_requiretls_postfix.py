"""REQUIRETLS against a real receiver: Debian's Postfix 3.7, which offers no REQUIRETLS,
as the MTA-STS-enforced MX of a destination (tests/postfix_receiver.py)."""

from __future__ import annotations

import pytest

from tests.harness import eventually
from tests.postfix_receiver import PostfixReceiver, require_postfix
from tests.sts_world import MX2_IP, MX_IP
from tests.test_requiretls import OFFERS, dsn_status, start


@pytest.fixture
async def postfix_world(sts_world):
    require_postfix()
    world = await start(sts_world)
    world.domain("a.test")
    cert = world.env.certs.files("postfix", "mx.a.test")
    async with PostfixReceiver(MX_IP, world.env.port, cert=cert, domains=("a.test",)) as mx:
        yield world, mx


async def test_postfix_gets_ordinary_mail_over_verified_tls(postfix_world):
    world, postfix = postfix_world
    await world.env.send("bob@a.test")
    (held,) = await postfix.wait_for_messages(1)
    assert held.sender == "alice@sender.test" and held.recipients == ("bob@a.test",)
    assert "using TLSv1." in held.received and b"merger" in held.body
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_type == "sts" and result.level == "verify"


async def test_postfix_without_requiretls_gets_no_flagged_mail_and_the_sender_a_5_7_30(
        postfix_world):
    world, postfix = postfix_world
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert dsn_status(home.messages[0].data) == ["5.7.30"]
    assert "REQUIRETLS" in home.messages[0].mail_options
    await postfix.wait_for_log(r"disconnect from ")
    said = [line for line in postfix.transcript() if line.startswith("< ")]
    # EHLO, STARTTLS, EHLO again on TLS, then QUIT: no MAIL FROM, no message.
    assert [line.split()[1].upper() for line in said] == ["EHLO", "STARTTLS", "EHLO",
                                                          "QUIT"], said
    assert await postfix.messages() == []
