"""The outbound queue end to end: client -> harakapy -> receiving servers on 127.0.0.x, with
MX records from a real DNS server on loopback and time moved by the test."""

from __future__ import annotations

import email
import email.policy

import pytest

from tests.harness import eventually
from tests.outbound_env import Env
from tests.servers import ReceivingMTA

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
dest.test. MX 10 mx1.dest.test.
dest.test. MX 20 mx2.dest.test.
mx1.dest.test. A 127.0.0.2
mx2.dest.test. A 127.0.0.3
sender.test. MX 10 mx.sender.test.
mx.sender.test. A 127.0.0.4
other.test. MX 10 mx.other.test.
mx.other.test. A 127.0.0.5
implicit.test. A 127.0.0.5
nullmx.test. MX 0 .
flaky.test. MX 10 mx1.dest.test.
noaddr.test. MX 10 ghost.noaddr.test.
ghost.noaddr.test. TXT "no address here"
"""


@pytest.fixture
async def env(outbound_env):
    return await outbound_env(ZONE, servfail={"flaky.test"})


async def all_due_attempted(env: Env, probe: ReceivingMTA) -> None:
    """Send a message to other.test (``probe`` on 127.0.0.5 takes it) and wait until it is
    delivered and nothing else is in flight.

    One pass of the queue runner starts every job that is due, so a job that was due when
    this message was queued has by then been attempted to the end: what it would have done
    shows on the receiving servers and in the spool.
    """
    await env.send(["probe@other.test"])
    await eventually(lambda: any(m.recipients == ["probe@other.test"] for m in probe.messages)
                     and env.hp.server.outbound.stats()["active"] == 0)


def dsn_of(received) -> email.message.Message:
    return email.message_from_bytes(received.data)


async def test_relay_delivers_to_the_best_mx(env):
    mx1 = await env.mta("127.0.0.2")
    await env.send(["bob@dest.test"])
    await eventually(lambda: mx1.messages)
    (got,) = mx1.messages
    assert got.sender == "alice@sender.test" and got.recipients == ["bob@dest.test"]
    assert got.data.startswith(b"Received: from ")
    assert got.data.endswith(b"Subject: t\r\n\r\nhello\r\n")
    await eventually(lambda: env.spooled() == [])  # done: gone from the spool


async def test_unreachable_first_mx_falls_back_to_the_second(env):
    mx2 = await env.mta("127.0.0.3")  # nothing listens on 127.0.0.2
    await env.send(["bob@dest.test"])
    await eventually(lambda: mx2.messages)


async def test_implicit_mx_uses_the_domains_address(env):
    mta = await env.mta("127.0.0.5")
    await env.send(["x@implicit.test"])
    await eventually(lambda: mta.messages)


async def test_partial_recipient_failure(env):
    rules = {"perm@dest.test": "550 5.1.1 no such user", "temp@dest.test": "451 4.2.0 busy"}
    mx1 = await env.mta("127.0.0.2", rcpt_reply=rules.get)
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["ok@dest.test", "perm@dest.test", "temp@dest.test"])
    await eventually(lambda: mx1.messages and sender_mx.messages)
    assert mx1.messages[0].recipients == ["ok@dest.test"]
    (bounce,) = sender_mx.messages
    assert bounce.sender == "<>" and bounce.recipients == ["alice@sender.test"]
    report = dsn_of(bounce)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    text = "\n".join(str(part) for part in status)
    assert "Final-Recipient: rfc822; perm@dest.test" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "temp@dest.test" not in text
    await eventually(lambda: len(env.spooled()) == 1)  # temp@ still queued; the DSN went
    await eventually(env.deferral_recorded)  # its retry is scheduled: the clock may move
    # The deferred recipient succeeds on the retry: delivered once, nothing else re-sent.
    rules.pop("temp@dest.test")
    await env.advance(61)
    await eventually(lambda: len(mx1.messages) == 2)
    assert mx1.messages[1].recipients == ["temp@dest.test"]
    await eventually(lambda: env.spooled() == [])
    assert len(sender_mx.messages) == 1


async def test_temporary_failure_then_success_on_retry_delivers_once(env):
    replies = ["451 4.3.0 try later"]
    mx1 = await env.mta("127.0.0.2", data_reply=lambda: replies.pop() if replies else None)
    await env.send(["bob@dest.test"])
    await eventually(lambda: mx1.connections >= 1 and not replies)
    await eventually(env.deferral_recorded)  # its retry is scheduled: the clock may move
    queued = env.spooled()
    assert len(queued) == 1
    assert mx1.messages == []
    await env.advance(30)  # not yet due
    await all_due_attempted(env, await env.mta("127.0.0.5"))
    assert mx1.messages == [] and env.deferrals() == 1
    await env.advance(31)
    await eventually(lambda: len(mx1.messages) == 1)
    await eventually(lambda: env.spooled() == [])


async def test_null_mx_bounces_at_once_without_connecting(env):
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["x@nullmx.test"])
    await eventually(lambda: sender_mx.messages)
    text = sender_mx.messages[0].data.decode()
    assert "Status: 5.1.10" in text and "null MX" in text


async def test_nxdomain_bounces_and_servfail_defers(env):
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["x@nowhere.test"])
    await eventually(lambda: sender_mx.messages)
    assert "Status: 5.1.2" in sender_mx.messages[0].data.decode()
    await env.send(["x@flaky.test"])
    await eventually(env.deferral_recorded)  # the attempt's outcome: deferred, not bounced
    assert any(q[0] == "flaky.test" for q in env.dns.queries)
    await eventually(lambda: len(env.spooled()) == 1)  # the first DSN has gone
    assert len(sender_mx.messages) == 1


async def test_expiry_bounces_with_the_last_error(env):
    sender_mx = await env.mta("127.0.0.4")
    arrival = env.clock.now
    await env.send(["bob@dest.test"])  # no MX listens: deferred
    await eventually(env.deferral_recorded)
    while env.clock.now - arrival < 3600:  # retry after retry, past the 1h lifetime
        await env.retry()
    await eventually(lambda: sender_mx.messages)  # the attempt past it bounced
    text = sender_mx.messages[0].data.decode()
    assert "Status: 5.4.7" in text and "delivery time expired" in text
    await eventually(lambda: env.spooled() == [])


async def test_no_bounce_to_the_null_sender(env):
    await env.mta("127.0.0.2", rcpt_reply=lambda a: "550 5.1.1 nope")
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["bob@dest.test"], sender="")
    await eventually(lambda: env.spooled() == [])
    assert sender_mx.messages == []


async def test_connection_reuse_for_several_messages(env):
    mx1 = await env.mta("127.0.0.2")
    for n in range(5):
        await env.send(["bob@dest.test"], body=f"Subject: {n}\r\n\r\nx\r\n".encode())
    await eventually(lambda: len(mx1.messages) == 5)
    assert mx1.connections < 5


async def test_8bit_text_to_a_server_without_8bitmime_goes_as_quoted_printable(env):
    mx1 = await env.mta("127.0.0.5", drop=("8BITMIME",))  # other.test's only MX
    await env.send(["bob@other.test"], body="Subject: x\r\n\r\nGrüße\r\n".encode())
    await eventually(lambda: mx1.messages)
    received = mx1.messages[0]
    assert received.data.isascii() and "BODY=8BITMIME" not in received.mail_options
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße\n"


async def test_8bit_in_a_header_to_a_server_without_8bitmime_bounces(env):
    mx1 = await env.mta("127.0.0.5", drop=("8BITMIME",))
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["bob@other.test"], body="Subject: Grüße\r\n\r\nx\r\n".encode())
    await eventually(lambda: sender_mx.messages)
    assert "Status: 5.6.3" in sender_mx.messages[0].data.decode()
    assert mx1.messages == []


async def test_pipelining_and_8bitmime_are_used_when_offered(env):
    mx1 = await env.mta("127.0.0.2")
    await env.send(["bob@dest.test", "carol@dest.test"], body="Subject: ü\r\n\r\nü\r\n".encode())
    await eventually(lambda: mx1.messages)
    assert "BODY=8BITMIME" in mx1.messages[0].mail_options
    assert mx1.messages[0].recipients == ["bob@dest.test", "carol@dest.test"]


async def test_one_message_to_two_domains_is_split(env):
    mx1 = await env.mta("127.0.0.2")
    other = await env.mta("127.0.0.5")
    await env.send(["bob@dest.test", "eve@other.test"])
    await eventually(lambda: mx1.messages and other.messages)
    assert mx1.messages[0].recipients == ["bob@dest.test"]
    assert other.messages[0].recipients == ["eve@other.test"]
    await eventually(lambda: env.spooled() == [])


@pytest.mark.parametrize(("text", "host", "port"), [
    ("smarthost.test", "smarthost.test", 25), ("relay.test:587", "relay.test", 587),
    ("[2001:db8::1]:2525", "2001:db8::1", 2525), ("[2001:db8::1]", "2001:db8::1", 25),
    ("2001:db8::1", "2001:db8::1", 25), ("192.0.2.1:26", "192.0.2.1", 26),
])
def test_get_mx_route_strings(text, host, port):
    from harakapy.outbound.mx import _parse_route

    route = _parse_route(text, 25)
    assert (route.hostname, route.port) == (host, port)


async def test_utf8_message_to_a_server_without_smtputf8_bounces(env):
    mx1 = await env.mta("127.0.0.5", smtputf8=False)
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["jörg@other.test"], utf8=True)
    await eventually(lambda: sender_mx.messages)
    assert "Status: 5.6.7" in sender_mx.messages[0].data.decode()
    assert mx1.messages == []


HOOK_RECORDER = '''
from harakapy import hookimpl, ok


@hookimpl
def init_outbound(message, server):
    server.notes.setdefault("events", []).append(("init", message.id))


@hookimpl
def delivered(message, recipients, mx, reply, server):
    server.notes.setdefault("events", []).append(
        ("delivered", [r.address for r in recipients], reply[:3]))


@hookimpl
def deferred(message, recipients, reason, next_attempt, server):
    server.notes.setdefault("events", []).append(
        ("deferred", [r.address for r in recipients], reason[:3]))


@hookimpl
def bounce(message, recipients, dsn, server):
    mode = server.config.value("bounce_mode")
    server.notes.setdefault("events", []).append(("bounce", [r.address for r in recipients]))
    if mode == "suppress":
        return ok()
    if mode == "rewrite":
        return b"Subject: rewritten bounce\\r\\n\\r\\n" + dsn[:0] + b"see the log\\r\\n"
    return None


@hookimpl
def get_mx(domain):
    if domain == "routed.test":
        return "127.0.0.3"
    return None
'''


@pytest.fixture
def hooked(outbound_env):
    """``await hooked(mode)``: harakapy with the recorder plugin; ``mode`` is its
    ``config/bounce_mode``. Retries back off to an hour; warn after 30 minutes."""

    async def make(mode: str = "") -> Env:
        return await outbound_env(
            ZONE, plugins="relay\nrecorder\n", files={"bounce_mode": mode},
            plugin_files={"recorder": HOOK_RECORDER},
            outbound_ini="min_backoff = 60\nconnect_timeout = 2\ndelay_warning = 30m\n")

    return make


async def test_outbound_hooks_see_each_outcome(hooked):
    env = await hooked()
    rules = {"temp@dest.test": "451 4.2.0 busy", "perm@dest.test": "550 5.1.1 no"}
    await env.mta("127.0.0.2", rcpt_reply=rules.get)
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["ok@dest.test", "temp@dest.test", "perm@dest.test"])
    await eventually(lambda: sender_mx.messages)
    events = env.hp.server.notes["events"]
    assert events[0][0] == "init"
    assert ("delivered", ["ok@dest.test"], "250") in events
    assert ("deferred", ["temp@dest.test"], "451") in events
    assert ("bounce", ["perm@dest.test"]) in events


async def test_get_mx_plugin_routes_a_domain(hooked):
    env = await hooked()
    routed = await env.mta("127.0.0.3")
    await env.send(["x@routed.test"])  # routed.test has no DNS at all
    await eventually(lambda: routed.messages)


@pytest.mark.parametrize("mode", ["suppress", "rewrite"])
async def test_bounce_hook_can_suppress_or_rewrite(hooked, mode):
    env = await hooked(mode)
    await env.mta("127.0.0.2", rcpt_reply=lambda a: "550 5.1.1 no")
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["perm@dest.test"])
    await eventually(lambda: env.spooled() == [])
    if mode == "suppress":
        assert sender_mx.messages == []
    else:
        await eventually(lambda: sender_mx.messages)
        assert b"Subject: rewritten bounce" in sender_mx.messages[0].data


async def test_delay_warning_is_sent_once(hooked):
    env = await hooked()
    sender_mx = await env.mta("127.0.0.4")
    arrival = env.clock.now
    await env.send(["bob@dest.test"])  # no MX listens: deferred again and again
    await eventually(env.deferral_recorded)
    while env.clock.now - arrival < 30 * 60:
        await env.retry()
    await eventually(lambda: sender_mx.messages)  # warned at the first attempt past 30 min
    # Two more deferrals. The second attempt starts only once the first's outcome is dealt
    # with, so a second warning from the first would be queued by now, and then delivered.
    await env.retry()
    await env.retry()
    await eventually(lambda: len(env.spooled()) == 1)
    assert len(sender_mx.messages) == 1
    text = sender_mx.messages[0].data.decode()
    assert "Action: delayed" in text and "Will-Retry-Until:" in text


async def test_a_backup_mx_that_cannot_carry_8bit_defers_while_the_primary_is_down(env):
    backup = await env.mta("127.0.0.3", drop=("8BITMIME",))  # mx1 (127.0.0.2) is down
    sender_mx = await env.mta("127.0.0.4")
    # 8-bit in the header: no 7-bit form of the message
    await env.send(["bob@dest.test"], body="Subject: Grüße\r\n\r\nx\r\n".encode())
    await eventually(lambda: backup.connections >= 1)
    await eventually(env.deferral_recorded)  # moving the clock earlier would race the runner
    assert sender_mx.messages == [] and backup.messages == []
    primary = await env.mta("127.0.0.2")
    await env.advance(61)
    await eventually(lambda: primary.messages)


async def test_ascii_message_declared_smtputf8_goes_to_a_server_without_it(env):
    mx = await env.mta("127.0.0.5", smtputf8=False)
    await env.send(["plain@other.test"], utf8=True)
    await eventually(lambda: mx.messages)
    assert "SMTPUTF8" not in mx.messages[0].mail_options


async def test_may_encrypts_even_when_the_certificate_proves_nothing(env, tls_ca, tmp_path):
    # The "may" level (RFC 7435) authenticates no one: a certificate for another name,
    # from a CA we do not trust, still gets the message encrypted rather than plaintext.
    cert = tls_ca.issue_cert("mx.other.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    mx = await env.mta("127.0.0.5", cert=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))
    await env.send(["tls@other.test"])
    await eventually(lambda: mx.messages)
    assert mx.messages[0].tls  # offered and working: used


async def test_hosts_without_addresses_bounce(env):
    # noaddr.test's MX host exists in DNS but has no A or AAAA record.
    sender_mx = await env.mta("127.0.0.4")
    await env.send(["x@noaddr.test"])
    await eventually(lambda: sender_mx.messages)
    assert "Status: 5.4.4" in sender_mx.messages[0].data.decode()


async def test_a_destination_no_host_answers_is_suspended_until_its_retry(env):
    # As Postfix's "delivery temporarily suspended": once neither MX of dest.test
    # answers, later mail for it waits for that retry instead of knocking again.
    await env.send(["a@dest.test"])
    await eventually(env.deferral_recorded)
    assert env.hp.server.outbound.stats()["suspended"] == ["dest.test"]
    await env.send(["b@dest.test"])
    await env.send(["c@dest.test"])
    await all_due_attempted(env, await env.mta("127.0.0.5"))  # an attempt would show...
    assert len(env.journals()) == 1 and len(env.spooled()) == 3  # ...as a journal
    mx1 = await env.mta("127.0.0.2")
    await env.advance(61)
    await eventually(lambda: len(mx1.messages) == 3)
    assert env.hp.server.outbound.stats()["suspended"] == []


async def test_flush_lifts_a_suspension(env):
    await env.send(["a@dest.test"])
    await eventually(env.deferral_recorded)
    await env.send(["b@dest.test"])
    mx1 = await env.mta("127.0.0.2")
    env.hp.server.outbound.flush()
    await eventually(lambda: len(mx1.messages) == 2)


async def test_a_destination_that_answers_is_not_suspended(env):
    mx1 = await env.mta("127.0.0.2", rcpt_reply=lambda address: "451 4.3.0 try later")
    await env.send(["a@dest.test"])
    await eventually(env.deferral_recorded)
    await env.send(["b@dest.test"])
    await eventually(lambda: "RCPT b@dest.test" in mx1.commands)  # b@ was tried at once
    assert env.hp.server.outbound.stats()["suspended"] == []


SPOOL_WATCHER = '''
from harakapy import hookimpl


@hookimpl
def delivered(message, recipients, server):
    queue = server.config.root / "queue"
    server.notes.setdefault("seen", []).append((
        [r.address for r in recipients], (queue / "msg" / message.id).exists(),
        (queue / "log" / message.id).exists()))
'''


async def test_a_delivery_that_settles_the_message_removes_it_before_hooks_hear_of_it(
        outbound_env):
    # Rule 4 of outbound/queue.py: the removal is the record, and it comes before the
    # hooks (rule 2); no journal is written for the last recipients' outcome. A delivery
    # that leaves a recipient to retry journals as before.
    env = await outbound_env(ZONE, plugins="relay\nwatcher\n",
                             plugin_files={"watcher": SPOOL_WATCHER})
    await env.mta("127.0.0.2", rcpt_reply={"later@dest.test": "451 4.2.0 busy"}.get)
    seen = env.hp.server.notes.setdefault("seen", [])
    await env.send("one@dest.test")
    await eventually(lambda: len(seen) == 1)
    assert seen[0] == (["one@dest.test"], False, False)
    await env.send(["two@dest.test", "later@dest.test"])
    await eventually(lambda: len(seen) == 2)
    assert seen[1] == (["two@dest.test"], True, True)  # later@ waits: the journal says so
