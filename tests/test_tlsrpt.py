"""The tlsrpt plugin end to end: sessions to MTA-STS and no-policy domains are counted, and
after the UTC day the report reaches the domain's rua: a real receiving SMTP server
(the mail decoded, its DKIM signature verified against the key the test DNS server
serves) and a real HTTPS endpoint on loopback (RFC 8460, ../shared/specs/tlsrpt.md)."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import gzip
import json
import ssl

import dkim
import dns.message
import dns.query
from aiohttp import web

from harakapy import dkim as harakapy_dkim
from harakapy.tls.context import self_signed_context
from tests.harness import eventually
from tests.policy_host import PolicyHost, server_context
from tests.sts_world import MX2_IP, MX_IP, REAL_IP, Answer, policy
from tests.test_tlsrpt_report import SCHEMA

DAY = 86400.0


async def reporting_world(sts_world, tmp_path, rua: str, extra_ini: str = "",
                          clock_start: float | None = None):
    seed, key_part = harakapy_dkim.generate("ed25519")
    key = tmp_path / "tlsrpt.key"
    key.write_bytes(seed)
    world = await sts_world(plugins="relay\ntlsrpt\nmta_sts\nrecorder\n",
                            clock_start=clock_start)
    config = world.env.hp.root / "config"
    (config / "dkim_sign.ini").write_text(f"[sign harakapy.test s1]\nkey = {key}\n")
    (config / "tlsrpt.ini").write_text(
        "[main]\norganization = Example Sender\ncontact = tlsrpt@harakapy.test\n"
        f"max_delay = 1h\nflush_interval = 1s\n{extra_ini}")
    assert await world.env.hp.server.reload()
    world.records["dkim"] = [f's1._domainkey.harakapy.test. TXT "v=DKIM1; {key_part}"']
    world.records["reports"] = ["reports.test. MX 10 mx.reports.test.",
                                f"mx.reports.test. A {REAL_IP}"]
    world.domain("a.test")
    world.txt("a.test", "v=STSv1; id=1")
    world.records["a.test"].append(f'_smtp._tls.a.test. TXT "v=TLSRPTv1; rua={rua}"')
    world.publish_zone()
    return world


async def traffic(world) -> None:
    """Two sessions under a.test's enforce policy: one good, one to an MX whose
    certificate names another host."""
    world.records["a.test"] += ["a.test. MX 20 mx2.a.test.", f"mx2.a.test. A {MX2_IP}"]
    world.answers["a.test"] = Answer(body=policy("enforce", "mx.a.test", "mx2.a.test"))
    world.publish_zone()
    bad = await world.mx(MX_IP, "mx.elsewhere.example")
    good = await world.mx(MX2_IP, "mx2.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: good.messages)
    assert bad.messages == []


def txt_lookup(port: int):
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        response = dns.query.udp(dns.message.make_query(name.decode(), "TXT"), "127.0.0.1",
                                 port=port, timeout=timeout)
        return b"".join(b"".join(r.strings) for rrset in response.answer for r in rrset)
    return lookup


async def counted(world) -> tuple[datetime.date, str]:
    """Write what harakapy counted (as its flush task would), for a command to read:
    the day of the sessions, and the config directory."""
    await world.env.hp.server.config.derive("tlsrpt.service", None).flush()
    day = datetime.datetime.fromtimestamp(world.env.clock.now, datetime.UTC).date()
    return day, str(world.env.hp.root)


async def https_rua_world(sts_world, tmp_path, endpoint):
    """The reporting world with a.test's rua an HTTPS endpoint of the test's
    (``endpoint(request)``), on 127.0.0.44 as reports.test."""
    world = await reporting_world(sts_world, tmp_path, "https://reports.test:{port}/tlsrpt")
    host = await world.env.stack.enter_async_context(PolicyHost(
        "127.0.0.44", server_context(world.env.certs.ca, "reports.test"), endpoint,
        method="POST"))
    world.records["a.test"] = [line.replace("{port}", str(host.port))
                               for line in world.records["a.test"]]
    world.records["reports"].append("reports.test. A 127.0.0.44")
    world.publish_zone()
    return world, host


async def sender_asleep(world) -> None:
    """The report round (every check_interval, 5 minutes) is done and asleep: moving the
    clock now wakes it, rather than landing in the middle of a round that would then
    sleep past the test."""
    clock = world.env.clock
    await eventually(lambda: clock.now + 300 in clock.pending())


async def next_day(world) -> None:
    """Past the UTC midnight after now and the whole max_delay: the report is due."""
    await sender_asleep(world)
    now = world.env.clock.now
    midnight = (now // DAY + 1) * DAY
    await world.env.advance(midnight - now + 3601)


async def test_the_days_report_is_mailed_dkim_signed_and_matches_the_sessions(
        sts_world, tmp_path):
    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test")
    inbox = await world.mx(REAL_IP, tls_context=self_signed_context("mx.reports.test"))
    await traffic(world)
    day = datetime.datetime.fromtimestamp(world.env.clock.now, datetime.UTC).date()
    await next_day(world)
    await eventually(lambda: inbox.messages, timeout=15)
    received = inbox.messages[0]
    assert received.sender in ("", "<>") and received.recipients == ["tlsrpt@reports.test"]
    assert await asyncio.to_thread(dkim.verify, received.data,
                                   dnsfunc=txt_lookup(world.env.dns.port))
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message.get_boundary().startswith("tlsrpt-")
    assert message["TLS-Report-Domain"] == "a.test"
    assert message["TLS-Report-Submitter"] == "harakapy.test"
    assert message["TLS-Required"] == "No"
    assert message["Subject"].startswith("Report Domain: a.test Submitter: harakapy.test "
                                         "Report-ID: <")
    (part,) = [p for p in message.iter_attachments()
               if p.get_content_type() == "application/tlsrpt+gzip"]
    begin = int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp())
    assert part.get_filename() == f"harakapy.test!a.test!{begin}!{begin + 86399}.json.gz"
    report = json.loads(gzip.decompress(part.get_content()))
    import jsonschema

    jsonschema.validate(report, SCHEMA)
    assert report["organization-name"] == "Example Sender"
    assert report["contact-info"] == "tlsrpt@harakapy.test"
    assert report["date-range"]["start-datetime"] == f"{day.isoformat()}T00:00:00Z"
    (entry,) = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["mx-host"] == ["mx.a.test", "mx2.a.test"]
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 1}
    (failure,) = entry["failure-details"]
    assert failure["result-type"] == "certificate-host-mismatch"
    assert failure["receiving-mx-hostname"] == "mx.a.test"
    assert failure["receiving-ip"] == MX_IP and failure["failed-session-count"] == 1


async def test_the_report_is_posted_and_a_failing_endpoint_is_tried_again_once_more(
        sts_world, tmp_path):
    posts: list[tuple[str, bytes]] = []
    answers = [500, 201]

    async def endpoint(request: web.Request) -> web.Response:
        posts.append((request.content_type, await request.read()))
        return web.Response(status=answers.pop(0) if answers else 201)

    world, _host = await https_rua_world(sts_world, tmp_path, endpoint)
    await traffic(world)
    await next_day(world)
    await eventually(lambda: posts, timeout=15)
    await sender_asleep(world)
    await world.env.advance(600)  # past the 5-minute back-off
    await eventually(lambda: len(posts) == 2, timeout=15)
    service = world.env.hp.server.config.derive("tlsrpt.service", None)
    assert not await service.send_due()  # accepted once: nothing is due again
    assert len(posts) == 2
    # What `harakapy tlsrpt send` does: the same log, so not again either.
    day = datetime.datetime.fromtimestamp(world.env.clock.now - DAY, datetime.UTC).date()
    assert await service.send(day, "a.test", schemes=("https",)) == []
    assert len(posts) == 2
    content_type, body = posts[1]
    assert content_type == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(body))["policies"][0]["policy"]["policy-type"] == "sts"


async def test_report_mail_goes_at_may_and_its_session_is_not_counted(sts_world, tmp_path):
    # The rua domain enforces MTA-STS and its MX has a certificate for another name: the
    # report is delivered anyway, and that session is in no report.
    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@r.test")
    world.domain("r.test", mx=((10, "mx.r.test", REAL_IP),))
    inbox = await world.mx(REAL_IP, "mx.elsewhere.example")
    await traffic(world)
    await next_day(world)
    await eventually(lambda: inbox.messages, timeout=15)
    service = world.env.hp.server.config.derive("tlsrpt.service", None)
    await service.flush()
    days = service.sessions.days()
    assert days and all("r.test" not in service.sessions.domains(day) for day in days)



async def test_the_cli_shows_the_report_and_prints_it_as_it_would_go_out(sts_world,
                                                                       tmp_path):
    from tests.processes import harakapy

    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test")
    await traffic(world)
    day, root = await counted(world)
    shown = await asyncio.to_thread(harakapy, "tlsrpt", "show", "--date", day.isoformat(),
                                    "-c", root)
    assert shown.returncode == 0, shown.stderr
    assert "sts a.test: 1 succeeded, 1 failed" in shown.stdout
    assert "1 x certificate-host-mismatch at mx.a.test [127.0.0.21]" in shown.stdout
    as_json = await asyncio.to_thread(harakapy, "tlsrpt", "show", "--date", day.isoformat(),
                                      "-c", root, "--json")
    (report,) = json.loads(as_json.stdout)
    import jsonschema

    jsonschema.validate(report, SCHEMA)
    dry = await asyncio.to_thread(harakapy, "tlsrpt", "send", "--dry-run", "--date",
                                  day.isoformat(), "-c", root)
    assert dry.returncode == 0, dry.stderr
    assert "TLS-Report-Domain: a.test" in dry.stdout and "DKIM-Signature:" in dry.stdout
    assert 'report-type="tlsrpt"' in dry.stdout


async def test_a_signed_report_to_our_mailbox_is_stored_and_an_unsigned_one_ignored(
        sts_world, tmp_path):
    from harakapy.tls.tlsrpt_received import ReceivedStore
    from harakapy.tls.tlsrpt_report import compressed
    from harakapy.tlsrpt import Tlsrpt, received_path
    from tests.harness import sendmail

    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test",
                                  extra_ini="[receive]\nmailbox = tlsrpt@ours.test\n")
    config = world.env.hp.root / "config"
    (config / "host_list").write_text("ours.test\n")
    plugins = (config / "plugins").read_text()
    (config / "plugins").write_text("rcpt_to.in_host_list\n" + plugins)
    assert await world.env.hp.server.reload()
    # A sender's report about ours.test, signed with the key the test DNS serves.
    from harakapy.dns import Resolver

    current = world.env.hp.server.config
    service = Tlsrpt.from_config(current, Resolver.from_config(current), world.env.clock,
                                 None)
    report = {"organization-name": "Big Mail", "report-id": "big-1",
              "date-range": {"start-datetime": "2026-12-02T00:00:00Z",
                             "end-datetime": "2026-12-02T23:59:59Z"},
              "contact-info": "tlsrpt@harakapy.test",
              "policies": [{"policy": {"policy-type": "sts", "policy-domain": "ours.test",
                                       "mx-host": "mx.ours.test"},
                            "summary": {"total-successful-session-count": 7,
                                        "total-failure-session-count": 0}}]}
    signed = service.mime(report, compressed(report), "ours.test", "tlsrpt@ours.test")
    unsigned = signed.split(b"\r\n\r\n", 1)
    unsigned = b"\r\n".join(line for line in unsigned[0].split(b"\r\n")
                            if not line.startswith((b"DKIM-Signature", b" ", b"\t"))
                            ) + b"\r\n\r\n" + unsigned[1]
    # Signed, but by a domain that is not the submitter it names: ignored too.
    from dataclasses import replace as change

    pretender = Tlsrpt.from_config(current, Resolver.from_config(current), world.env.clock,
                                   None)
    pretender.settings = change(pretender.settings, contact="tlsrpt@other.example")
    pretender.signer = None
    claimed = service.signer.sign(pretender.mime(
        {**report, "report-id": "claimed"}, compressed(report), "ours.test",
        "tlsrpt@ours.test"), domain="harakapy.test")
    await sendmail(world.env.hp.port, "tlsrpt@harakapy.test", ["tlsrpt@ours.test"], signed)
    await sendmail(world.env.hp.port, "x@harakapy.test", ["tlsrpt@ours.test"],
                   unsigned.replace(b"big-1", b"forged"))
    await sendmail(world.env.hp.port, "x@harakapy.test", ["tlsrpt@ours.test"], claimed)
    store = ReceivedStore(received_path(world.env.hp.server.config))
    await eventually(lambda: store.summary())
    (summary,) = store.summary()
    assert (summary.organization, summary.mx, summary.succeeded) == (
        "Big Mail", "mx.ours.test", 7)


async def test_a_report_posted_to_our_endpoint_is_stored_once(sts_world, tmp_path):
    import aiohttp

    from harakapy.tls.tlsrpt_received import ReceivedStore
    from harakapy.tlsrpt import received_path
    from tests.processes import free_port

    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test")
    cert, key = world.env.certs.files("endpoint", "tlsrpt.ours.test")
    port = free_port()
    ini = world.env.hp.root / "config" / "tlsrpt.ini"
    ini.write_text(ini.read_text() + f"[receive]\nlisten = 127.0.0.45:{port}\n"
                   f"cert = {cert}\nkey = {key}\n")
    assert await world.env.hp.server.reload()
    body = gzip.compress(json.dumps({
        "organization-name": "Big Mail", "report-id": "post-1",
        "policies": [{"policy": {"policy-type": "no-policy-found",
                                 "policy-domain": "ours.test"},
                      "summary": {"total-successful-session-count": 3,
                                  "total-failure-session-count": 0}}]}).encode())
    context = ssl.create_default_context(
        cafile=str(world.env.hp.root.parent / "ca.pem"))
    # A sender posting to our endpoint by address: the endpoint is under test, not the
    # sender's name check (the chain is still checked against the test CA).
    context.check_hostname = False

    async def post(data: bytes):
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    f"https://127.0.0.45:{port}/tlsrpt", data=data, ssl=context,
                    headers={"Content-Type": "application/tlsrpt+gzip"}) as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return None

    async with asyncio.timeout(10):
        while (status := await post(body)) is None:
            await asyncio.sleep(0.05)
    assert status == 201
    assert await post(body) == 200  # the same report again: a duplicate
    assert await post(b"{") == 400
    (summary,) = ReceivedStore(received_path(world.env.hp.server.config)).summary()
    assert (summary.organization, summary.succeeded, summary.reports) == ("Big Mail", 3, 1)


async def test_an_endpoint_that_always_fails_is_given_up_after_24_hours(sts_world,
                                                                        tmp_path):
    from harakapy.tls.tlsrpt_report import report_id

    posts: list[int] = []

    async def endpoint(request: web.Request) -> web.Response:
        posts.append(len(await request.read()))
        return web.Response(status=500)

    world, host = await https_rua_world(sts_world, tmp_path, endpoint)
    await traffic(world)
    day = datetime.datetime.fromtimestamp(world.env.clock.now, datetime.UTC).date()
    await next_day(world)
    await eventually(lambda: posts, timeout=15)
    ident = report_id(day, "a.test", "harakapy.test")
    rua = f"https://reports.test:{host.port}/tlsrpt"
    service = world.env.hp.server.config.derive("tlsrpt.service", None)
    for _ in range(30):  # rounds 6 hours apart, at most: the back-off's cap
        if service.deliveries.states(ident)[rua][0] == "gave-up":
            break
        await sender_asleep(world)
        await world.env.advance(6 * 3600)
    assert service.deliveries.states(ident)[rua][0] == "gave-up"
    tried = len(posts)
    assert 5 <= tried <= 12  # backed off, not every round
    await sender_asleep(world)
    await world.env.advance(6 * 3600)
    await sender_asleep(world)
    assert len(posts) == tried  # never again


def test_the_command_sends_no_report_of_a_day_that_is_not_over(config_dir):
    from tests.processes import harakapy

    root = config_dir({"me": "harakapy.test\n"})
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    done = harakapy("tlsrpt", "send", "--date", today, "-c", str(root))
    assert done.returncode == 2 and "is not over" in done.stderr


async def test_the_command_sends_a_finished_days_mail_report_through_the_server(
        sts_world, tmp_path):
    import time

    from tests.processes import harakapy

    # The command goes by the real clock: these sessions happened two days ago.
    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test",
                                  clock_start=time.time() - 2 * DAY)
    inbox = await world.mx(REAL_IP, tls_context=self_signed_context("mx.reports.test"))
    await traffic(world)
    day, root = await counted(world)
    done = await asyncio.to_thread(harakapy, "tlsrpt", "send", "--date", day.isoformat(),
                                   "-c", root)
    assert done.returncode == 0, done.stderr
    assert "a.test: mailto:tlsrpt@reports.test: sent" in done.stdout
    await eventually(lambda: inbox.messages, timeout=15)  # the running server took it
    assert b"TLS-Report-Domain: a.test" in inbox.messages[0].data
    again = await asyncio.to_thread(harakapy, "tlsrpt", "send", "--date", day.isoformat(),
                                    "-c", root)
    assert "nothing to send now" in again.stdout and len(inbox.messages) == 1


async def test_a_domain_without_a_policy_gets_its_report_under_no_policy_found(
        sts_world, tmp_path):
    world = await reporting_world(sts_world, tmp_path, "mailto:tlsrpt@reports.test")
    inbox = await world.mx(REAL_IP, tls_context=self_signed_context("mx.reports.test"))
    world.domain("b.test", mx=((10, "mx.b.test", MX2_IP),), txt=None)
    world.records["b.test"].append(
        '_smtp._tls.b.test. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"')
    world.publish_zone()
    mx = await world.mx(MX2_IP, tls_context=self_signed_context("mx.b.test"))
    await world.env.send("carol@b.test")
    await eventually(lambda: mx.messages)
    await next_day(world)
    await eventually(lambda: any(b"TLS-Report-Domain: b.test" in m.data
                                 for m in inbox.messages), timeout=15)
    (received,) = [m for m in inbox.messages if b"TLS-Report-Domain: b.test" in m.data]
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    (part,) = [p for p in message.iter_attachments()
               if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(part.get_content()))
    import jsonschema

    jsonschema.validate(report, SCHEMA)
    (entry,) = report["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "b.test"}
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 0}
