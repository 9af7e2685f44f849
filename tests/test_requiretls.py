"""REQUIRETLS (RFC 8689) end to end: the inbound side, the flag in the spool, and delivery
through MTA-STS-matched MX hosts to real receiving servers with certificates from the
test CA, a STARTTLS stripper, and the notices (../shared/specs/requiretls.md section 8).
DNSSEC-validated MX hosts and DANE are in tests/test_requiretls_dane.py."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import signal

import pytest

from harakapy.outbound.requiretls import opts_out
from harakapy.spool.store import Spool
from tests.harness import RawClient, eventually, insecure_client_context, running_server
from tests.processes import ServerProcess, free_port, harakapy
from tests.sts_world import MX2_IP, MX_IP, REAL_IP, Answer, plaintext_seen, policy

# A plugin that asks for REQUIRETLS for mail from senders whose name starts with "rt":
# what an operator writes to require it for a sender (docs/requiretls.md).
FLAG = '''
from harakapy import hookimpl


@hookimpl
def mail(transaction, sender):
    if sender.local.startswith("rt"):
        transaction.requiretls = True
'''

PLUGINS = "flag\nrelay\nmta_sts\nrecorder\n"
OFFERS = {"extensions": ("PIPELINING", "REQUIRETLS"), "mail_params": ("REQUIRETLS",)}


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def dsn_status(data: bytes) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in data.decode().splitlines()
            if line.startswith("Status:")]


# -- inbound ------------------------------------------------------------------------------

INBOUND = {"host_list": "example.test\n", "plugins": "tls\nrcpt_to.in_host_list\n"}


async def _ehlo_lines(client: RawClient) -> list[str]:
    code, text = await client.command("EHLO client.test")
    assert code == 250
    return text.splitlines()


async def _starttls(client: RawClient) -> None:
    assert (await client.command("STARTTLS"))[0] == 220
    await client.starttls(insecure_client_context())


async def test_requiretls_is_offered_only_after_starttls(config_dir):
    async with running_server(config_dir(dict(INBOUND))) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        assert "REQUIRETLS" not in await _ehlo_lines(client)
        await _starttls(client)
        assert "REQUIRETLS" in await _ehlo_lines(client)
        await client.close()


async def test_requiretls_on_a_plaintext_session_is_refused_and_nothing_is_queued(config_dir):
    root = config_dir(dict(INBOUND))
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await _ehlo_lines(client)
        code, text = await client.command("MAIL FROM:<a@client.test> REQUIRETLS")
        assert (code, text) == (530, "5.7.10 REQUIRETLS needs a TLS session: STARTTLS first")
        # The session goes on; only that MAIL was refused.
        assert (await client.command("MAIL FROM:<a@client.test>"))[0] == 250
        await client.close()
    assert list((root / "queue" / "msg").iterdir()) == []


@pytest.mark.parametrize(("line", "reply"), [
    ("MAIL FROM:<a@client.test> REQUIRETLS=YES", (501, "5.5.4 REQUIRETLS takes no value")),
    ("MAIL FROM:<a@client.test> REQUIRETLS REQUIRETLS",
     (501, "5.5.4 parameter REQUIRETLS given twice")),
])
async def test_a_malformed_requiretls_parameter_gets_501(config_dir, line, reply):
    async with running_server(config_dir(dict(INBOUND))) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await _ehlo_lines(client)
        await _starttls(client)
        await _ehlo_lines(client)
        assert await client.command(line) == reply
        await client.close()


async def test_offer_no_hides_it_and_refuses_the_parameter(config_dir):
    root = config_dir({**INBOUND, "requiretls.ini": "[main]\noffer = no\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await _ehlo_lines(client)
        await _starttls(client)
        assert "REQUIRETLS" not in await _ehlo_lines(client)
        assert await client.command("MAIL FROM:<a@client.test> REQUIRETLS") == (
            555, "5.5.4 MAIL parameter REQUIRETLS not supported")
        await client.close()


# A relay whose outbound queue cannot deliver (no DNS answers): the message stays queued.
HOLDING = {"relay_acl_allow": "127.0.0.0/8\n", "plugins": "tls\nrelay\n",
           "dns.ini": "[main]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.2\n"}


async def _send_over_tls(port: int, sender: str, *, requiretls: bool) -> str:
    client = await RawClient.connect(port)
    await client.reply()
    await _ehlo_lines(client)
    await _starttls(client)
    await _ehlo_lines(client)
    flag = " REQUIRETLS" if requiretls else ""
    assert (await client.command(f"MAIL FROM:<{sender}>{flag}"))[0] == 250
    assert (await client.command("RCPT TO:<bob@far.test>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    code, text = await client.command(b"Subject: s\r\nTLS-Required: No\r\n\r\nhi\r\n.")
    assert code == 250
    await client.close()
    return text.rsplit(" ", 1)[1]


async def test_the_flag_is_in_the_spool_survives_a_restart_and_queue_show_says_so(
        config_dir):
    root = config_dir(dict(HOLDING))
    async with running_server(root) as hp:
        flagged = await _send_over_tls(hp.port, "a@client.test", requiretls=True)
        plain = await _send_over_tls(hp.port, "b@client.test", requiretls=False)
    spool = Spool(root / "queue")
    assert spool.load(flagged).requiretls and not spool.load(flagged).tls_optional
    # TLS-Required: No counts only without REQUIRETLS.
    assert not spool.load(plain).requiretls and spool.load(plain).tls_optional
    async with running_server(root):
        shown = await asyncio.to_thread(harakapy, "queue", "show", flagged, "-c", str(root))
        assert "REQUIRETLS: yes" in shown.stdout
        listed = await asyncio.to_thread(harakapy, "queue", "show", plain, "-c", str(root),
                                         "--json")
        assert '"requiretls": false' in listed.stdout
    assert Spool(root / "queue").load(flagged).requiretls


async def test_the_flag_survives_kill_9(config_dir):
    port = free_port()
    root = config_dir({**HOLDING, "smtp.ini": f"[main]\nlisten = 127.0.0.1:{port}\n"})
    first = ServerProcess("-c", str(root))
    try:
        await asyncio.to_thread(first.wait_for, "harakapy ready")
        flagged = await _send_over_tls(port, "a@client.test", requiretls=True)
        first.process.kill()  # no handler, no flush, no goodbye
        assert await asyncio.to_thread(first.wait) == -signal.SIGKILL
    finally:
        first.stop()
    second = ServerProcess("-c", str(root))
    try:
        await asyncio.to_thread(second.wait_for, "1 message(s) queued")
        shown = await asyncio.to_thread(harakapy, "queue", "show", flagged, "-c", str(root))
        assert "REQUIRETLS: yes" in shown.stdout
    finally:
        second.stop()


@pytest.mark.parametrize(("header", "optional"), [
    (b"TLS-Required: No\r\n", True),
    (b"tls-required:   no  \r\n", True),
    (b"TLS-Required:\r\n no\r\n", True),
    (b"TLS-Required: No\r\nTLS-Required: No\r\n", True),
    (b"TLS-Required: No\r\nTLS-Required: Yes\r\n", False),
    (b"TLS-Required: Nope\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
    (b"", False),
])
def test_tls_required_no_counts_only_when_every_field_says_no(header, optional):
    message = b"Subject: s\r\n" + header + b"\r\nTLS-Required: No in the body\r\n"
    assert opts_out(message) is optional


# -- outbound through MTA-STS ----------------------------------------------------------------

async def start(sts_world, extra: str = "", **options):
    world = await sts_world(extra, plugins=options.pop("plugins", PLUGINS),
                            plugin_files={"flag": FLAG, **options.pop("plugin_files", {})})
    # The sender's own domain, for the notices: its MX offers REQUIRETLS.
    world.domain("b.test", mx=((10, "mx.b.test", MX2_IP),))
    return world


async def test_an_mta_sts_matched_mx_that_offers_requiretls_gets_it_on_mail_from(
        sts_world, caplog):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test", **OFFERS)
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", sender="rt@b.test")
        await eventually(lambda: mx.messages)
    assert mx.messages[0].tls and "REQUIRETLS" in mx.messages[0].mail_options
    (result,) = world.env.captured("tls_result")
    assert result.success and result.policy_type == "sts" and result.level == "verify"
    assert any("delivered to <bob@a.test> via mx.a.test requiretls" in r.getMessage()
               for r in caplog.records)


async def test_a_server_without_requiretls_gets_no_mail_and_the_sender_a_5_7_30_notice(
        sts_world, caplog):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", sender="rt@b.test")
        await eventually(lambda: home.messages)
    assert mx.messages == [] and not any(c.startswith("MAIL") for c in mx.commands)
    # RFC 8689 4.2.1: QUIT, not a MAIL without REQUIRETLS.
    assert mx.commands == [] and mx.quits == mx.connections == 1
    (notice,) = home.messages
    # RFC 8689 5: from the null sender, with REQUIRETLS, the original's header only.
    assert notice.sender == "<>" and "REQUIRETLS" in notice.mail_options and notice.tls
    assert dsn_status(notice.data) == ["5.7.30"]
    types = [part.get_content_type() for part in parsed(notice.data).walk()]
    assert "text/rfc822-headers" in types and "message/rfc822" not in types
    assert b"Subject: secret" in notice.data and b"merger" not in notice.data
    # No retry: waiting cannot make this server offer REQUIRETLS.
    assert world.env.deferrals() == 0
    assert any("bounced <bob@a.test> !requiretls:requiretls-not-offered" in r.getMessage()
               for r in caplog.records)
    # The TLS session itself met a.test's policy: it is reported as the success it was.
    assert [r.success for r in world.env.captured("tls_result")
            if r.domain == "a.test"] == [True]


async def test_a_destination_with_neither_dnssec_nor_mta_sts_is_never_contacted(sts_world):
    world = await start(sts_world)
    world.domain("a.test", txt=None)  # no MTA-STS; the test's DNS does not sign
    mx = await world.mx(MX_IP, "mx.a.test", **OFFERS)
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.connections == 0 and mx.messages == []
    assert dsn_status(home.messages[0].data) == ["5.7.30"]
    assert b"cannot be trusted" in home.messages[0].data
    # Mail that did not ask for REQUIRETLS goes on as before.
    await world.env.send("carol@a.test")
    await eventually(lambda: mx.messages)


async def test_a_testing_policy_is_enforced_for_a_requiretls_message(sts_world):
    world = await start(sts_world)
    world.domain("a.test", answer=Answer(body=policy("testing", "mx.a.test")))
    mx = await world.mx(MX_IP, "mx.elsewhere.example", **OFFERS)  # the wrong name
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.messages == [] and not any(c.startswith("MAIL") for c in mx.commands)
    assert dsn_status(home.messages[0].data) == ["5.7.10"]
    (failure,) = world.env.failures()
    assert failure.result_type == "certificate-host-mismatch" and failure.enforced
    # The same policy lets other mail through: testing only reports.
    await world.env.send("carol@a.test")
    await eventually(lambda: mx.messages)


async def test_a_wrong_certificate_on_the_first_mx_sends_it_to_the_second(sts_world):
    world = await start(sts_world)
    world.domain("two.test", mx=((10, "mx1.two.test", MX_IP), (20, "mx2.two.test", REAL_IP)),
                 answer=Answer(body=policy("enforce", "*.two.test")))
    first = await world.mx(MX_IP, "mx.elsewhere.example", **OFFERS)
    second = await world.mx(REAL_IP, "mx2.two.test", **OFFERS)
    await world.env.send("bob@two.test", sender="rt@b.test")
    await eventually(lambda: second.messages)
    assert first.messages == [] and "REQUIRETLS" in second.messages[0].mail_options


async def test_starttls_stripped_leaks_nothing_and_the_notice_says_5_7_10(sts_world, caplog):
    world = await start(sts_world)
    world.domain("a.test")
    real = await world.mx(REAL_IP, "mx.a.test", **OFFERS)
    attacker = await world.stripper(MX_IP, real)
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", sender="rt@b.test")
        await eventually(lambda: home.messages)
    seen = plaintext_seen(attacker)
    assert b"EHLO" in seen and b"MAIL FROM" not in seen and b"merger" not in seen
    assert real.messages == []
    # Final, as Postfix and mox have it: the sender who asked for REQUIRETLS hears now.
    assert dsn_status(home.messages[0].data) == ["5.7.10"]
    assert world.env.deferrals() == 0
    assert any("!requiretls:starttls-not-supported" in r.getMessage()
               for r in caplog.records)


async def test_an_unreachable_mx_is_retried_as_for_any_mail(sts_world):
    world = await start(sts_world)
    world.domain("two.test", mx=((10, "mx1.two.test", MX_IP), (20, "mx2.two.test", REAL_IP)),
                 answer=Answer(body=policy("enforce", "*.two.test")))
    first = await world.mx(MX_IP, "mx1.two.test")  # no REQUIRETLS: final for this MX
    await world.env.send("bob@two.test", sender="rt@b.test")  # mx2 is not listening
    await eventually(world.env.deferral_recorded)
    assert first.messages == []
    second = await world.mx(REAL_IP, "mx2.two.test", **OFFERS)
    await world.env.retry()
    await eventually(lambda: second.messages)
    assert "REQUIRETLS" in second.messages[0].mail_options


async def test_a_notice_that_cannot_go_back_with_requiretls_goes_redacted(sts_world, caplog):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")  # no REQUIRETLS: the message bounces
    home = await world.mx(MX2_IP, "mx.b.test")  # nor here: the notice cannot go back so
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", sender="rt@b.test")
        await eventually(lambda: home.messages)
    assert mx.messages == []
    (notice,) = home.messages
    assert notice.sender == "<>" and "REQUIRETLS" not in notice.mail_options
    assert dsn_status(notice.data) == ["5.7.30"]
    assert b"Subject: secret" not in notice.data and b"merger" not in notice.data
    assert b"has been left out" in notice.data
    assert any("sent again without it" in r.getMessage() for r in caplog.records)


async def test_fallback_drop_discards_such_a_notice(sts_world, tmp_path):
    world = await start(sts_world)
    (world.env.hp.root / "config" / "requiretls.ini").write_text(
        "[notices]\nfallback = drop\n")
    assert await world.env.hp.server.reload()
    world.domain("a.test")
    await world.mx(MX_IP, "mx.a.test")
    home = await world.mx(MX2_IP, "mx.b.test")
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: world.env.spooled() == [])
    assert home.messages == [] and home.connections >= 1


REORIGINATE = '''
from harakapy import hookimpl


@hookimpl
async def queue_outbound(transaction, server):
    """A tiny list: a copy of each message for its recipients plus the list's archive,
    re-sent from the list's address and carrying the original's REQUIRETLS (RFC 8689 6)."""
    if not transaction.recipients[0].address.startswith("list@"):
        return None
    await server.submit("list-owner@b.test", ["bob@a.test"], transaction.message,
                        requiretls=transaction.requiretls)
    from harakapy import ok
    return ok()
'''


async def test_a_plugin_that_re_originates_carries_the_flag(sts_world):
    world = await start(sts_world, plugins="flag\nrelay\nlist\nmta_sts\nrecorder\n",
                        plugin_files={"list": REORIGINATE})
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test", **OFFERS)
    await world.env.send("list@c.test", sender="rt@b.test")
    await eventually(lambda: mx.messages)
    assert mx.messages[0].sender == "list-owner@b.test"
    assert "REQUIRETLS" in mx.messages[0].mail_options


ROUTE_HERE = '''
from harakapy import MxHost, hookimpl


@hookimpl
def get_mx(domain):
    if domain == "local.test":
        return MxHost("127.0.0.21", 0, PORT)
'''


@pytest.mark.parametrize("loopback", ["exempt", "enforce"])
async def test_a_route_to_this_machine_is_exempt_unless_told(sts_world, loopback, caplog):
    world = await start(sts_world, plugins="flag\nrelay\nroute\nmta_sts\nrecorder\n",
                        plugin_files={"route": ROUTE_HERE})
    (world.env.hp.root / "plugins" / "route.py").write_text(
        ROUTE_HERE.replace("PORT", str(world.env.port)))
    (world.env.hp.root / "config" / "requiretls.ini").write_text(
        f"[main]\nloopback = {loopback}\n")
    assert await world.env.hp.server.reload()
    backend = await world.mx(MX_IP)  # plaintext, no REQUIRETLS: a local mail store
    # Listening before the send: the delivery may be logged before send() returns.
    caplog.set_level(logging.INFO, logger="harakapy.outbound")
    await world.env.send("bob@local.test", sender="rt@b.test")
    if loopback == "exempt":
        await eventually(lambda: backend.messages)
        await eventually(lambda: world.env.spooled() == [])
        assert "REQUIRETLS" not in backend.messages[0].mail_options
        assert any("via 127.0.0.21 requiretls:exempt" in r.getMessage()
                   for r in caplog.records)
    else:
        home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
        await eventually(lambda: home.messages)
        assert backend.messages == [] and dsn_status(home.messages[0].data) == ["5.7.10"]


# -- TLS-Required: No -----------------------------------------------------------------------

OPT_OUT = b"Subject: report\r\nTLS-Required: No\r\n\r\nthe tls report\r\n"


async def test_tls_required_no_gets_through_a_failing_mta_sts_mx_and_is_logged(
        sts_world, caplog):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.elsewhere.example")
    with caplog.at_level(logging.INFO, logger="harakapy.outbound"):
        await world.env.send("bob@a.test", OPT_OUT)
        await eventually(lambda: mx.messages)
    assert mx.messages[0].tls and b"TLS-Required: No" in mx.messages[0].data
    (failure,) = world.env.failures()
    assert failure.result_type == "certificate-host-mismatch" and not failure.enforced
    assert any("TLS-Required: No" in r.getMessage() and "delivered anyway" in r.getMessage()
               for r in caplog.records)


async def test_tls_required_no_with_the_switch_off_waits_as_usual(sts_world):
    world = await start(sts_world)
    (world.env.hp.root / "config" / "requiretls.ini").write_text(
        "[tls_required]\nhonour = no\n")
    assert await world.env.hp.server.reload()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.elsewhere.example")
    await world.env.send("bob@a.test", OPT_OUT)
    await eventually(lambda: world.env.captured("deferred"))
    assert mx.messages == []


async def test_requiretls_wins_over_tls_required_no(sts_world):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.elsewhere.example", **OFFERS)
    home = await world.mx(MX2_IP, "mx.b.test", **OFFERS)
    await world.env.send("bob@a.test", OPT_OUT, sender="rt@b.test")
    await eventually(lambda: home.messages)
    assert mx.messages == [] and dsn_status(home.messages[0].data) == ["5.7.10"]


@pytest.mark.parametrize(("operator_policy", "delivered"), [("keep", False), ("relax", True)])
async def test_the_operators_own_entries_stand_unless_relaxed(sts_world, operator_policy,
                                                              delivered):
    world = await start(sts_world, plugins="flag\nrelay\ntls_require\nmta_sts\nrecorder\n")
    root = world.env.hp.root / "config"
    (root / "tls_policy").write_text("a.test secure match=nexthop\n")
    (root / "requiretls.ini").write_text(f"[tls_required]\noperator_policy = {operator_policy}\n")
    assert await world.env.hp.server.reload()
    world.domain("a.test", txt=None)
    mx = await world.mx(MX_IP, "mx.a.test")  # names the MX, not a.test: secure fails
    await world.env.send("bob@a.test", OPT_OUT)
    if delivered:
        await eventually(lambda: mx.messages)
    else:
        await eventually(lambda: world.env.captured("deferred"))
        assert mx.messages == []


async def test_a_notice_about_tls_required_no_mail_says_it_too(sts_world):
    world = await start(sts_world)
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test", rcpt_reply=lambda a: "550 5.1.1 no such user")
    home = await world.mx(MX2_IP, "mx.b.test")
    await world.env.send("bob@a.test", OPT_OUT, sender="alice@b.test")
    await eventually(lambda: home.messages)
    assert mx.messages == []
    head = home.messages[0].data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nTLS-Required: No\r\n" in head + b"\r\n"


async def test_no_plugin_answer_lowers_what_requiretls_demands(sts_world):
    world = await start(sts_world, plugins="flag\nrelay\ntls_require\nmta_sts\nrecorder\n")
    (world.env.hp.root / "config" / "tls_policy").write_text("a.test none\n")
    assert await world.env.hp.server.reload()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test", **OFFERS)
    await world.env.send("carol@a.test")
    await eventually(lambda: mx.messages)
    assert not mx.messages[0].tls  # the table's "none", for mail that did not ask
    # The table answered first, and MTA-STS still vouches for the MX; the level is verify.
    await world.env.send("bob@a.test", sender="rt@b.test")
    await eventually(lambda: len(mx.messages) == 2)
    assert mx.messages[1].tls and "REQUIRETLS" in mx.messages[1].mail_options
    (result,) = world.env.captured("tls_result")
    assert result.level == "verify" and result.decided_by == "tls_require"
