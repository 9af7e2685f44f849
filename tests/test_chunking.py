"""CHUNKING (RFC 3030) inbound: BDAT chunks over a real socket, pipelined and not, and
every way a chunk can be refused without its octets being taken for commands."""

from __future__ import annotations

import pytest

from tests.harness import CAPTURE_PLUGIN, RawClient, running_server

LOCAL = {"host_list": "example.test\n", "plugins": "rcpt_to.in_host_list\ncapture\n"}
REFUSE_DATA = '''
from harakapy import deny, hookimpl


@hookimpl
def data(transaction):
    if transaction.sender.local == "spammer":
        return deny("no thanks")
'''


@pytest.fixture
async def server(config_dir):
    root = config_dir(dict(LOCAL), {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        yield hp


async def start(hp, sender: str = "a@client.test") -> RawClient:
    client = await RawClient.connect(hp.port)
    await client.reply()
    code, text = await client.command("EHLO client.test")
    assert code == 250 and "CHUNKING" in text.splitlines()
    assert (await client.command(f"MAIL FROM:<{sender}>"))[0] == 250
    return client


async def bdat(client: RawClient, data: bytes, *, last: bool = False) -> tuple[int, str]:
    await client.send(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data)
    return await client.reply()


async def test_a_message_in_chunks_is_queued_exactly_as_sent(server):
    client = await start(server)
    assert (await client.command("RCPT TO:<bob@example.test>"))[0] == 250
    # No dot-stuffing with BDAT: a line with a lone dot is text like any other.
    assert await bdat(client, b"Subject: chunks\r\n\r\nfirst\r\n.\r\n") == (
        250, "2.0.0 29 octets received")
    code, text = await bdat(client, "caf\u00e9 \r\n".encode(), last=True)
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    await client.close()
    (_, transaction), = server.captured
    assert transaction.message.startswith(b"Received: ")
    assert transaction.message.endswith(
        b"\r\nSubject: chunks\r\n\r\nfirst\r\n.\r\ncaf\xc3\xa9 \r\n")


async def test_pipelined_mail_rcpt_and_one_last_chunk(server):
    client = await RawClient.connect(server.port)
    await client.reply()
    await client.command("EHLO client.test")
    data = b"Subject: p\r\n\r\nhello\r\n"
    await client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@example.test>\r\n"
                      b"RCPT TO:<nobody@elsewhere.test>\r\n"
                      + f"BDAT {len(data)} LAST\r\n".encode() + data + b"QUIT\r\n")
    codes = [(await client.reply())[0] for _ in range(5)]
    await client.close()
    assert codes == [250, 250, 550, 250, 221]
    (_, transaction), = server.captured
    assert [r.address for r in transaction.recipients] == ["bob@example.test"]


async def test_an_empty_last_chunk_ends_the_message(server):
    client = await start(server)
    await client.command("RCPT TO:<bob@example.test>")
    assert (await bdat(client, b"Subject: e\r\n\r\nbody\r\n"))[0] == 250
    assert (await bdat(client, b"", last=True))[0] == 250
    await client.close()
    assert server.captured[0][1].message.endswith(b"\r\n\r\nbody\r\n")


async def test_bdat_before_mail_is_refused_and_its_octets_are_not_commands(server):
    client = await RawClient.connect(server.port)
    await client.reply()
    await client.command("EHLO client.test")
    assert await bdat(client, b"RSET\r\nQUIT\r\n", last=True) == (
        503, "5.5.1 Need MAIL command")
    assert (await client.command("NOOP"))[0] == 250  # still here: QUIT was data
    await client.close()


async def test_bdat_without_recipients_is_554_and_nothing_is_queued(server):
    client = await start(server)
    assert (await client.command("RCPT TO:<x@elsewhere.test>"))[0] == 550
    assert await bdat(client, b"Subject: x\r\n\r\nx\r\n", last=True) == (
        554, "5.5.1 No valid recipients")
    await client.close()
    assert server.captured == []


async def test_data_after_bdat_is_refused(server):
    client = await start(server)
    await client.command("RCPT TO:<bob@example.test>")
    await bdat(client, b"Subject: x\r\n")
    assert await client.command("DATA") == (
        503, "5.5.1 DATA after BDAT; finish with BDAT LAST or RSET")
    assert (await client.command("RSET"))[0] == 250
    await client.close()
    assert server.captured == []


async def test_a_message_over_the_size_limit_is_read_and_refused_at_last(config_dir):
    root = config_dir({**LOCAL, "smtp.ini": "[main]\nlisten = 127.0.0.1:0\n"
                       "max_message_bytes = 2048\n"}, {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await start(hp)
        await client.command("RCPT TO:<bob@example.test>")
        line = b"x" * 78 + b"\r\n"
        assert (await bdat(client, line * 20))[0] == 250
        assert (await bdat(client, line * 20))[0] == 250
        assert await bdat(client, b"", last=True) == (
            552, "5.3.4 Message size exceeds fixed maximum message size (2048 bytes)")
        assert (await client.command("NOOP"))[0] == 250
        await client.close()
    assert hp.captured == []


async def test_a_line_over_1000_octets_is_refused(server):
    client = await start(server)
    await client.command("RCPT TO:<bob@example.test>")
    assert (await bdat(client, b"x" * 1200 + b"\r\n", last=True))[0] == 500
    await client.close()


@pytest.mark.parametrize("command", ["BDAT", "BDAT x", "BDAT -1", "BDAT 10 MORE",
                                     "BDAT 1 LAST extra", "BDAT 99999999999999"])
async def test_a_malformed_bdat_closes_the_connection(server, command):
    client = await start(server)
    await client.command("RCPT TO:<bob@example.test>")
    assert await client.command(command) == (
        501, "5.5.4 Syntax: BDAT chunk-size [LAST]; closing")
    assert await client.closed()
    await client.close()


async def test_a_data_hook_refusal_comes_after_the_chunk(config_dir):
    root = config_dir({**LOCAL, "plugins": "refuse\nrcpt_to.in_host_list\ncapture\n"},
                      {"capture": CAPTURE_PLUGIN, "refuse": REFUSE_DATA})
    async with running_server(root) as hp:
        client = await start(hp, sender="spammer@client.test")
        await client.command("RCPT TO:<bob@example.test>")
        assert await bdat(client, b"QUIT\r\n") == (550, "5.7.1 no thanks")
        assert await bdat(client, b"QUIT\r\n", last=True) == (503, "5.5.1 Need MAIL command")
        assert (await client.command("NOOP"))[0] == 250
        await client.close()
    assert hp.captured == []


async def test_a_chunk_that_stops_arriving_times_out(config_dir):
    root = config_dir({**LOCAL, "smtp.ini": "[main]\nlisten = 127.0.0.1:0\ntimeout = 0.3\n"},
                      {"capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await start(hp)
        await client.command("RCPT TO:<bob@example.test>")
        await client.send(b"BDAT 100 LAST\r\nonly part of it")
        code, text = await client.reply()
        assert code == 421 and text.startswith("4.4.2 ")
        assert await client.closed()
        await client.close()
    assert hp.captured == []


async def test_nothing_pipelined_after_a_malformed_bdat_is_acted_on(server):
    # Found by the fuzzer: the connection is closed, and the DATA behind the BDAT must
    # not queue a message the client never hears a 250 for.
    client = await RawClient.connect(server.port)
    await client.reply()
    await client.command("EHLO client.test")
    await client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@example.test>\r\n"
                      b"BDAT\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
    replies = [await client.reply() for _ in range(3)]
    assert [code for code, _ in replies] == [250, 250, 501]
    assert await client.closed()
    await client.close()
    assert server.captured == []
