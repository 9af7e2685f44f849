"""Recipients a Postfix user takes for granted: the domainless postmaster, sender-specified
routing refused, a trailing dot on a domain (RFC 5321 4.5.1, 3.6.1, 2.3.5)."""

from __future__ import annotations

import pytest

from harakapy.inbound.address import Address, parse_path, routes_through
from tests.harness import CAPTURE_PLUGIN, RawClient, running_server

# A client outside relay_acl_allow (it connects from 127.0.0.1).
LOCAL = {"host_list": "example.test\n", "relay_acl_allow": "192.0.2.0/24\n",
         "me": "mx.example.test\n", "plugins": "rcpt_to.in_host_list\nrelay\ncapture\n"}


async def _dialogue(hp, *rcpts: str) -> list[tuple[int, str]]:
    client = await RawClient.connect(hp.port)
    await client.reply()
    await client.command("EHLO client.test")
    await client.command("MAIL FROM:<a@client.test>")
    replies = [await client.command(f"RCPT TO:{rcpt}") for rcpt in rcpts]
    await client.close()
    return replies


@pytest.mark.parametrize("spelling", ["<postmaster>", "<POSTMASTER>", "<PostMaster>"])
async def test_the_domainless_postmaster_is_accepted_from_anyone(config_dir, spelling):
    root = config_dir(dict(LOCAL), {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<a@client.test>")
        assert await client.command(f"RCPT TO:{spelling}") == (250, "2.1.5 Ok")
        assert (await client.command("DATA"))[0] == 354
        assert (await client.command(b"Subject: hi\r\n\r\nhello\r\n."))[0] == 250
        await client.close()
    (_, transaction), = hp.captured
    assert transaction.recipients == [Address("postmaster", "mx.example.test")]


async def test_postmaster_goes_where_smtp_ini_says(config_dir):
    root = config_dir({**LOCAL, "smtp.ini": "[main]\nlisten = 127.0.0.1:0\n"
                       "postmaster = hostmaster@example.test\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        assert await _dialogue(hp, "<postmaster>") == [(250, "2.1.5 Ok")]


async def test_a_bad_postmaster_address_stops_the_start_with_file_and_line(config_dir):
    from harakapy.config import Config, ConfigError
    from harakapy.inbound.settings import InboundSettings

    root = config_dir({"smtp.ini": "[main]\nlisten = 127.0.0.1:0\npostmaster = not an address\n"})
    with pytest.raises(ConfigError) as error:
        InboundSettings.from_config(Config.load(root))
    assert "smtp.ini:3" in str(error.value) and "postmaster" in str(error.value)


@pytest.mark.parametrize("rcpt", ["<u%outside.test@example.test>",
                                  "<outside.test!u@example.test>",
                                  '<"u@outside.test"@example.test>',
                                  "<@relay.test:u@example.test>"])
async def test_sender_specified_routing_is_refused(config_dir, rcpt):
    async with running_server(config_dir(dict(LOCAL), {"capture": CAPTURE_PLUGIN})) as hp:
        assert await _dialogue(hp, rcpt) == [
            (550, "5.7.1 Sender-specified routing is not allowed (allow_untrusted_routing)")]


async def test_allow_untrusted_routing_lets_the_plugins_decide(config_dir):
    root = config_dir({**LOCAL, "smtp.ini": "[main]\nlisten = 127.0.0.1:0\n"
                       "allow_untrusted_routing = yes\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        assert await _dialogue(hp, "<u%outside.test@example.test>") == [(250, "2.1.5 Ok")]


async def test_a_relaying_client_may_route(config_dir):
    root = config_dir({**LOCAL, "relay_acl_allow": "127.0.0.0/8\n"},
                      {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        assert (await _dialogue(hp, "<u%outside.test@example.test>"))[0][0] == 250


async def test_a_trailing_dot_is_the_same_domain(config_dir):
    root = config_dir(dict(LOCAL), {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        assert await _dialogue(hp, "<u@example.test.>", "<u@EXAMPLE.test.>") == [
            (250, "2.1.5 Ok"), (250, "2.1.5 Ok")]


@pytest.mark.parametrize(("path", "expected"), [
    ("<u@example.test.>", Address("u", "example.test")),
    ("<u@[192.0.2.1]>", Address("u", "[192.0.2.1]")),
    ("<@a.test,@b.test:u@example.test>", Address("u", "example.test")),
])
def test_paths_normalise(path, expected):
    address, _ = parse_path(path, allow_null=False, smtputf8=False)
    assert address == expected


@pytest.mark.parametrize(("path", "routes"), [
    ("<u@example.test>", False), ("<u.v+tag@example.test>", False),
    ("<u%x@example.test>", True), ("<x!u@example.test>", True),
    ('<"u@x"@example.test>', True), ("<@a.test:u@example.test>", True),
])
def test_routes_through(path, routes):
    address, _ = parse_path(path, allow_null=False, smtputf8=False)
    assert routes_through(address) is routes
