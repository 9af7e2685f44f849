"""The inbound dialogue end to end: a real client against the real server on loopback."""

from __future__ import annotations

import smtplib
import ssl

import aiosmtplib
import pytest

from tests.harness import (
    CAPTURE_PLUGIN,
    RawClient,
    insecure_client_context,
    running_server,
    sendmail,
)

LOCAL = {"host_list": "example.test\n", "relay_acl_allow": "192.0.2.0/24\n",
         "plugins": "tls\nrcpt_to.in_host_list\nrelay\ncapture\n"}


@pytest.fixture
def local_dir(config_dir):
    return config_dir(dict(LOCAL), {"capture": CAPTURE_PLUGIN})


async def test_ehlo_advertises_extensions_and_greeting_names_host(config_dir):
    root = config_dir({"me": "mx.example.test\n", "plugins": "tls\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        code, text = await client.reply()
        assert code == 220 and text.startswith("mx.example.test ESMTP")
        code, text = await client.command("EHLO client.test")
        assert code == 250
        lines = text.splitlines()
        assert lines[0] == "mx.example.test"
        for extension in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                          "STARTTLS", "SIZE 26214400"):
            assert extension in lines
        assert not any(line.startswith("AUTH") for line in lines)  # never before TLS
        await client.close()


async def test_local_delivery_over_starttls_records_tls_in_received(local_dir):
    async with running_server(local_dir) as hp:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=hp.port, start_tls=False,
                               tls_context=insecure_client_context())
        await smtp.connect()
        await smtp.starttls()
        errors, reply = await smtp.sendmail("a@client.test", ["b@example.test"],
                                            b"Subject: hi\r\n\r\nhello\r\n")
        await smtp.quit()
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued as ")
        (hook, transaction), = hp.captured
        assert hook == "queue"
        header = transaction.message.split(b"\r\n\r\n")[0].decode()
        assert header.startswith("Received: from ")
        assert "(using TLSv1." in header and " with cipher " in header
        assert "with ESMTPS id " + transaction.id in header
        assert "for <b@example.test>;" in header
        assert transaction.message.endswith(b"Subject: hi\r\n\r\nhello\r\n")


async def test_plaintext_delivery_says_esmtp_without_tls(local_dir):
    async with running_server(local_dir) as hp:
        await sendmail(hp.port, "a@client.test", ["b@example.test"],
                       b"Subject: x\r\n\r\nbody\r\n")
        (_, transaction), = hp.captured
        assert b"with ESMTP id" in transaction.message
        assert b"using TLS" not in transaction.message


async def test_unauthorised_client_cannot_relay(config_dir):
    # 127.0.0.1 is not in this relay ACL: the server must not relay for it.
    root = config_dir({"relay_acl_allow": "192.0.2.0/24\n", "host_list": "example.test\n",
                       "plugins": "rcpt_to.in_host_list\nrelay\ncapture\n"},
                      {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO client.test")
        assert (await client.command("MAIL FROM:<a@client.test>"))[0] == 250
        code, text = await client.command("RCPT TO:<victim@outside.test>")
        assert code == 550 and text.startswith("5.7.1") and "elaying denied" in text
        code, _ = await client.command("RCPT TO:<b@example.test>")
        assert code == 250
        await client.close()


async def test_no_rcpt_plugin_at_all_is_still_no_open_relay(config_dir):
    root = config_dir({"plugins": "capture\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await sendmail(hp.port, "a@client.test", ["b@outside.test"], b"x\r\n")
        assert refused.value.recipients["b@outside.test"][0] == 550
        assert hp.captured == []


async def test_relay_from_acl_network_goes_to_queue_outbound(config_dir):
    root = config_dir({"plugins": "relay\ncapture\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        await sendmail(hp.port, "a@client.test", ["b@outside.test"], b"x\r\n")
        (hook, transaction), = hp.captured
        assert hook == "queue_outbound"
        assert [r.address for r in transaction.recipients] == ["b@outside.test"]


async def test_relayed_mail_is_in_the_spool_before_the_client_hears_250(config_dir):
    # No queue_outbound plugin: the core outbound queue takes it. DNS points nowhere, so
    # the message stays queued for us to look at.
    root = config_dir({"plugins": "relay\n",
                       "dns.ini": "[main]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.2\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("MAIL FROM:<a@client.test>")
        await client.command("RCPT TO:<b@outside.test>")
        await client.command("DATA")
        code, text = await client.command("Subject: s\r\n\r\nbody\r\n.")
        assert code == 250
        queue_id = text.rsplit(" ", 1)[1]
        spooled = (root / "queue" / "msg" / queue_id).read_bytes()
        assert spooled.endswith(b"Subject: s\r\n\r\nbody\r\n")
        await client.close()


async def test_too_many_recipients_gets_452(config_dir):
    root = config_dir({"smtp.ini": "listen = 127.0.0.1:0\nmax_recipients = 2\n",
                       "plugins": "relay\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("MAIL FROM:<a@c.test>")
        assert (await client.command("RCPT TO:<1@x.test>"))[0] == 250
        assert (await client.command("RCPT TO:<2@x.test>"))[0] == 250
        code, text = await client.command("RCPT TO:<3@x.test>")
        assert (code, text[:5]) == (452, "4.5.3")
        await client.close()


async def test_message_over_size_gets_552_and_nothing_is_queued(config_dir):
    root = config_dir({"smtp.ini": "listen = 127.0.0.1:0\nmax_message_bytes = 2048\n",
                       "plugins": "relay\ncapture\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        code, text = await client.command("MAIL FROM:<a@c.test> SIZE=4096")
        assert (code, text[:5]) == (552, "5.3.4")
        await client.command("MAIL FROM:<a@c.test>")
        await client.command("RCPT TO:<b@x.test>")
        assert (await client.command("DATA"))[0] == 354
        code, text = await client.command(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n"
                                          + b"z" * 900 + b"\r\n.")
        assert (code, text[:5]) == (552, "5.3.4")
        # The connection is still good for the next message.
        assert (await client.command("MAIL FROM:<a@c.test>"))[0] == 250
        await client.close()
        assert hp.captured == []


async def test_smtputf8_address_accepted_when_declared(local_dir):
    async with running_server(local_dir) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        code, _ = await client.command("MAIL FROM:<jörg@c.test>")
        assert code == 501
        code, _ = await client.command("MAIL FROM:<jörg@c.test> SMTPUTF8")
        assert code == 250
        assert (await client.command("RCPT TO:<b@example.test>"))[0] == 250
        await client.close()


async def test_every_reply_after_ehlo_carries_an_enhanced_code(local_dir):
    async with running_server(local_dir) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        for line in ("NOOP", "FOO bar", "MAIL FROM:bad", "RCPT TO:<x@y.test>",
                     "MAIL FROM:<a@c.test>", "RCPT TO:<b@example.test>", "RSET", "VRFY x",
                     "DATA", "HELP"):
            code, text = await client.command(line)
            assert text.split()[0].count(".") == 2, f"{line!r} -> {code} {text!r}"
        await client.close()


# What SmtpProtocol keeps beyond the state aiosmtpd's SMTP.__init__ sets up.
OUR_STATE = {"command_size_limit", "command_size_limits", "server", "implicit_tls",
             "connection", "_busy", "_auth_failures", "_implicit_handshake", "_replies",
             "_progress_check", "_chunks"}


def state_drift(ours: object, theirs: object) -> tuple[set[str], set[str]]:
    """Attributes aiosmtpd sets that our connections lack, and ones we set that aiosmtpd
    no longer has (a rename leaves one of each)."""
    theirs_names = set(vars(theirs)) - {"_auth_methods"}  # ours is a cached property
    ours_names = set(vars(ours)) - OUR_STATE
    return theirs_names - ours_names, ours_names - theirs_names


async def test_connections_have_all_the_state_aiosmtpd_sets_up(local_dir):
    # SmtpProtocol sets up aiosmtpd's state itself, from tables made once per class: a
    # newer aiosmtpd must not add or rename state that our connections then lack.
    from aiosmtpd.smtp import SMTP

    from harakapy.inbound.protocol import SmtpProtocol, _NoHandler

    async with running_server(local_dir) as hp:
        ours = SmtpProtocol(hp.server)
        theirs = SMTP(_NoHandler(), hostname="mx.example.test", auth_require_tls=False)
        assert state_drift(ours, theirs) == (set(), set())
        assert set(ours._auth_methods) == set(theirs._auth_methods) == {"PLAIN", "LOGIN"}
        # Every command aiosmtpd knows, and BDAT (RFC 3030), which it does not.
        assert set(ours._smtp_methods) == set(theirs._smtp_methods) | {"BDAT"}
        for name, method in ours._smtp_methods.items():  # HELP reads the syntax
            function = getattr(SmtpProtocol, f"smtp_{name}")
            assert getattr(method, "__smtp_syntax__", None) == getattr(
                function, "__smtp_syntax__", None)


async def test_the_state_check_fails_for_an_aiosmtpd_that_adds_or_renames_state(
        local_dir, monkeypatch):
    from aiosmtpd.smtp import SMTP

    from harakapy.inbound.protocol import SmtpProtocol, _NoHandler

    original = SMTP.__init__

    def newer_init(self, *args, **kwargs):  # as a release that renames _proxy_timeout
        original(self, *args, **kwargs)
        self._proxy_deadline = self.__dict__.pop("_proxy_timeout")
        self._new_state = None

    async with running_server(local_dir) as hp:
        ours = SmtpProtocol(hp.server)
        monkeypatch.setattr(SMTP, "__init__", newer_init)
        theirs = SMTP(_NoHandler(), hostname="mx.example.test", auth_require_tls=False)
        assert state_drift(ours, theirs) == ({"_proxy_deadline", "_new_state"},
                                             {"_proxy_timeout"})


def test_the_installed_aiosmtpd_is_in_the_range_the_state_check_covers():
    import importlib.metadata
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    [pin] = [Requirement(r) for r in project["project"]["dependencies"]
             if r.startswith("aiosmtpd")]
    assert pin.specifier.contains(importlib.metadata.version("aiosmtpd"))
    assert any(spec.operator == "<" for spec in pin.specifier)  # an upper bound


async def test_smtplib_client_with_verified_starttls(config_dir, server_cert, tls_ca):
    key, cert = server_cert
    root = config_dir({**LOCAL, "tls.ini": f"[main]\nkey = {key}\ncert = {cert}\n"},
                      {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        context = ssl.create_default_context()
        tls_ca.configure_trust(context)
        await sendmail(hp.port, "a@client.test", ["b@example.test"],
                       b"Subject: v\r\n\r\nok\r\n", host="localhost", starttls=context)
        assert len(hp.captured) == 1


async def test_mail_loop_is_refused_by_hop_count(config_dir):
    root = config_dir({"smtp.ini": "listen = 127.0.0.1:0\nmax_hops = 5\n",
                       "plugins": "relay\ncapture\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        looped = b"".join(b"Received: from x by y; Sun, 29 Nov 2026 08:00:00 +0000\r\n"
                          for _ in range(5)) + b"Subject: loop\r\n\r\nbody\r\n"
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await sendmail(hp.port, "a@c.test", ["b@x.test"], looped)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (554, b"5.4.6")
        await sendmail(hp.port, "a@c.test", ["b@x.test"], looped[56:])  # four hops: fine
        assert len(hp.captured) == 1


async def test_utf8_transaction_is_recorded_as_utf8smtp(config_dir):
    root = config_dir({"plugins": "relay\ncapture\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("MAIL FROM:<jörg@c.test> SMTPUTF8")
        await client.command("RCPT TO:<b@x.test>")
        await client.command("DATA")
        assert (await client.command("Subject: ü\r\n\r\nbody\r\n."))[0] == 250
        await client.close()
        (_, transaction), = hp.captured
        assert b"with UTF8SMTP id" in transaction.message


@pytest.mark.parametrize(("length", "code"), [(510, 250), (511, 500)])
async def test_command_line_limit_is_512_octets_with_crlf(config_dir, length, code):
    root = config_dir({"plugins": "relay\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        line = "NOOP " + "x" * (length - 5)
        assert len(line) + 2 == length + 2
        assert (await client.command(line))[0] == code
        await client.close()
