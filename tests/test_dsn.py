"""Delivery status notifications as the sender asks for them (RFC 3461): the parameters
accepted and kept in the spool, passed on to servers that offer DSN (a real Postfix among
them), and honoured in our own notices."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib

import pytest

from harakapy.dsn import check_rcpt_param, wants, xtext_decode, xtext_encode
from harakapy.spool.store import Spool
from tests.harness import RawClient, eventually, running_server
from tests.outbound_env import OUTBOUND_INI
from tests.postfix_receiver import PostfixReceiver, require_postfix

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
a.test. MX 10 mx.a.test.
mx.a.test. A 127.0.0.3
sender.test. MX 10 mx.sender.test.
mx.sender.test. A 127.0.0.4
"""
BODY = b"Subject: report\r\nMessage-ID: <m1@sender.test>\r\n\r\nthe quarterly figures\r\n"
DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")  # what the test receivers take


async def send(port: int, recipients: list[str], *, mail: tuple[str, ...] = (),
               rcpt: tuple[str, ...] = (), body: bytes = BODY) -> None:
    def run() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("alice@sender.test", recipients, body, mail_options=list(mail),
                          rcpt_options=list(rcpt))
    await asyncio.to_thread(run)


def report(data: bytes) -> dict[str, list[str]]:
    """The fields of a DSN's delivery-status part, each with its values in order."""
    fields: dict[str, list[str]] = {}
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload():
                for name, value in block.items():
                    fields.setdefault(name, []).append(str(value))
    return fields


def part_types(data: bytes) -> list[str]:
    return [p.get_content_type()
            for p in email.message_from_bytes(data, policy=email.policy.default).walk()]


@pytest.fixture
async def world(outbound_env):
    env = await outbound_env(ZONE, body=BODY)
    # The sender's MX, where notices go; it offers DSN, so it sees what they ask for.
    home = await env.mta("127.0.0.4", extensions=("PIPELINING", "DSN"),
                         mail_params=DSN_PARAMS)
    return env, home


# -- the parameters inbound --------------------------------------------------------------

@pytest.mark.parametrize(("line", "reply"), [
    ("MAIL FROM:<a@b.test> RET=ALL", (501, "5.5.4 RET must be FULL or HDRS")),
    ("MAIL FROM:<a@b.test> ENVID=a+zz", (501, "5.5.4 ENVID must be xtext of 1 to 100 "
                                          "characters")),
    (f"MAIL FROM:<a@b.test> ENVID={'x' * 101}", (501, "5.5.4 ENVID must be xtext of 1 to "
                                                      "100 characters")),
])
async def test_malformed_mail_parameters_get_501(config_dir, line, reply):
    async with running_server(config_dir({"plugins": "relay\n"})) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        code, text = await client.command("EHLO client.test")
        assert code == 250 and "DSN" in text.splitlines()
        assert await client.command(line) == reply
        await client.close()


@pytest.mark.parametrize(("param", "problem"), [
    ("NOTIFY=NEVER", False), ("NOTIFY=success,FAILURE,delay", False),
    ("NOTIFY=NEVER,SUCCESS", True), ("NOTIFY=SOMETIMES", True), ("NOTIFY=FAILURE,FAILURE", True),
    ("ORCPT=rfc822;bob+40a.test", False), ("ORCPT=bob@a.test", True),
    ("ORCPT=rfc822;", True), ("ORCPT=rfc822;a b", True),
])
def test_rcpt_parameters_are_checked(param, problem):
    name, _, value = param.partition("=")
    assert (check_rcpt_param(name, value) is not None) is problem


def test_xtext_round_trips():
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"


@pytest.mark.parametrize(("notify", "event", "told"), [
    ("", "FAILURE", True), ("", "DELAY", True), ("", "SUCCESS", False),
    ("NEVER", "FAILURE", False), ("SUCCESS", "SUCCESS", True), ("SUCCESS", "FAILURE", False),
])
def test_wants(notify, event, told):
    assert wants(notify, event) is told


async def test_the_parameters_are_kept_in_the_spool(world):
    env, _ = world
    # a.test's MX is not listening: the message stays queued.
    await send(env.hp.port, ["bob@a.test", "carol@a.test"], mail=("RET=HDRS", "ENVID=q4+2B1"),
               rcpt=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+40a.test"))
    (message_id,) = env.spooled()
    queued = Spool(env.hp.root / "queue").load(message_id)
    assert (queued.ret, queued.envid) == ("HDRS", "q4+2B1")
    assert [(r.notify, r.orcpt) for r in queued.recipients] == [
        ("SUCCESS,FAILURE", "rfc822;bob+40a.test")] * 2


# -- passed on ----------------------------------------------------------------------------

async def test_the_parameters_go_to_a_server_that_offers_dsn(world):
    env, home = world
    mx = await env.mta("127.0.0.3", extensions=("PIPELINING", "DSN"), mail_params=DSN_PARAMS)
    await send(env.hp.port, ["bob@a.test"], mail=("RET=HDRS", "ENVID=q4"),
               rcpt=("NOTIFY=SUCCESS", "ORCPT=rfc822;bob+40a.test"))
    await eventually(lambda: mx.messages)
    # (aiosmtpd upper-cases what it was given)
    assert set(mx.messages[0].mail_options) >= {"RET=HDRS", "ENVID=Q4"}
    assert "RCPT bob@a.test NOTIFY=SUCCESS ORCPT=RFC822;BOB+40A.TEST" in mx.commands
    # That server answers for the success notice now; we send none (a notice would be in
    # the spool before the message left it).
    await eventually(lambda: env.spooled() == [])
    assert home.messages == []


async def test_a_server_without_dsn_gets_none_and_the_sender_a_relayed_notice(world):
    env, home = world
    mx = await env.mta("127.0.0.3")
    await send(env.hp.port, ["bob@a.test"], mail=("ENVID=q4+2B1",),
               rcpt=("NOTIFY=SUCCESS", "ORCPT=rfc822;bob+40a.test"))
    await eventually(lambda: home.messages)
    assert not any(o.startswith("ENVID") for o in mx.messages[0].mail_options)
    assert "RCPT bob@a.test" in mx.commands  # no NOTIFY, no ORCPT
    notice = home.messages[0]
    fields = report(notice.data)
    assert fields["Action"] == ["relayed"] and fields["Status"] == ["2.0.0"]
    assert fields["Original-Envelope-Id"] == ["q4+1"]
    assert fields["Original-Recipient"] == ["rfc822; bob@a.test"]
    assert "text/rfc822-headers" in part_types(notice.data)
    assert b"quarterly" not in notice.data


async def test_postfix_gets_the_parameters_as_sent(outbound_env, tmp_path):
    require_postfix()
    env = await outbound_env(ZONE, body=BODY)
    async with PostfixReceiver("127.0.0.3", env.port, domains=("a.test",)) as postfix:
        await send(env.hp.port, ["bob@a.test"], mail=("RET=HDRS", "ENVID=q4+2B1"),
                   rcpt=("NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;bob+40a.test"))
        (held,) = await postfix.wait_for_messages(1)
    assert held.attributes.get("envelope_id") == "q4+1"
    attributes = held.recipient_attributes["bob@a.test"]
    assert attributes.get("dsn_orig_rcpt") == "rfc822;bob@a.test"
    assert attributes.get("notify_flags") == str(2 | 8)  # SUCCESS | DELAY


# -- our notices ----------------------------------------------------------------------------

async def test_notify_never_means_no_bounce(world):
    env, home = world
    mx = await env.mta("127.0.0.3", rcpt_reply=lambda a: "550 5.1.1 no such user")
    await send(env.hp.port, ["bob@a.test", "carol@a.test"], rcpt=("NOTIFY=NEVER",))
    await eventually(lambda: env.spooled() == [])
    assert home.messages == [] and mx.messages == []


async def test_ret_hdrs_returns_the_header_only_and_orcpt_and_envid_are_quoted(world):
    env, home = world
    await env.mta("127.0.0.3", rcpt_reply=lambda a: "550 5.1.1 no such user")
    await send(env.hp.port, ["bob@a.test"], mail=("RET=HDRS", "ENVID=q4"),
               rcpt=("ORCPT=rfc822;Bob+40A.test",))
    await eventually(lambda: home.messages)
    notice = home.messages[0]
    assert notice.sender == "<>"
    fields = report(notice.data)
    assert fields["Action"] == ["failed"] and fields["Status"] == ["5.1.1"]
    assert fields["Original-Recipient"] == ["rfc822; Bob@A.test"]
    assert fields["Original-Envelope-Id"] == ["q4"]
    assert "text/rfc822-headers" in part_types(notice.data)
    assert b"quarterly" not in notice.data and b"Subject: report" in notice.data
    # A notice asks for no notice about itself.
    assert "RCPT alice@sender.test NOTIFY=NEVER" in home.commands


async def test_ret_full_returns_the_whole_message(world):
    env, home = world
    await env.mta("127.0.0.3", rcpt_reply=lambda a: "550 5.1.1 no such user")
    await send(env.hp.port, ["bob@a.test"], mail=("RET=FULL",))
    await eventually(lambda: home.messages)
    assert "message/rfc822" in part_types(home.messages[0].data)
    assert b"quarterly" in home.messages[0].data


async def test_only_the_recipients_that_asked_for_failures_are_in_the_notice(world):
    env, home = world
    await env.mta("127.0.0.3", rcpt_reply=lambda a: "550 5.1.1 no such user")

    def run() -> None:
        with smtplib.SMTP("127.0.0.1", env.hp.port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail("alice@sender.test")
            smtp.rcpt("bob@a.test", ["NOTIFY=NEVER"])
            smtp.rcpt("carol@a.test", ["NOTIFY=FAILURE"])
            smtp.data(BODY)
    await asyncio.to_thread(run)
    await eventually(lambda: home.messages)
    assert report(home.messages[0].data)["Final-Recipient"] == ["rfc822; carol@a.test"]


async def test_a_delay_warning_goes_only_to_recipients_that_want_one(outbound_env):
    env = await outbound_env(ZONE, body=BODY,
                             outbound_ini=OUTBOUND_INI + "delay_warning = 10m\n")
    home = await env.mta("127.0.0.4")

    def run() -> None:  # a.test's MX does not answer: the message waits
        with smtplib.SMTP("127.0.0.1", env.hp.port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail("alice@sender.test")
            smtp.rcpt("bob@a.test", ["NOTIFY=FAILURE"])
            smtp.rcpt("carol@a.test", ["NOTIFY=DELAY,FAILURE"])
            smtp.rcpt("dave@a.test")
            smtp.data(BODY)
    await asyncio.to_thread(run)
    await eventually(env.deferral_recorded)
    env.clock.advance(600)
    await env.retry()
    await eventually(lambda: home.messages)
    fields = report(home.messages[0].data)
    assert fields["Action"] == ["delayed", "delayed"]
    assert fields["Final-Recipient"] == ["rfc822; carol@a.test", "rfc822; dave@a.test"]


@pytest.mark.parametrize(("param", "code"), [("AUTH=<>", 250), ("AUTH=alice+40a.test", 250),
                                             ("AUTH=", 501), ("AUTH=a+zz", 501)])
async def test_mail_auth_parameter_is_accepted_and_ignored(config_dir, param, code):
    # RFC 4954 5: a server that offers AUTH takes MAIL FROM's AUTH= (and may ignore it).
    async with running_server(config_dir({"plugins": "relay\n"})) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO client.test")
        assert (await client.command(f"MAIL FROM:<a@b.test> {param}"))[0] == code
        await client.close()
