"""Hostile and broken clients against the real inbound server (DESIGN.md invariant 4).

Every test speaks SMTP over a loopback socket to a server running in the test's event
loop, and after the bad input checks on a *new* connection that the server still takes
mail (``assert_serves_mail``): a reply on the bad connection proves little if the
listener died behind it.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import pytest

from tests.harness import (
    CAPTURE_PLUGIN,
    RawClient,
    Running,
    insecure_client_context,
    running_server,
    sendmail,
)

# b@example.test is local (rcpt_to.in_host_list); anything else is refused with 550.
LOCAL_RCPT = "b@example.test"
SENDER = "a@client.test"


def smtp_ini(**keys: object) -> str:
    lines = ["[main]", "listen = 127.0.0.1:0"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def make_dir(config_dir):
    """A config directory with local delivery to example.test into the capture plugin, and
    ``[main]`` keys of smtp.ini from keyword arguments."""

    def make(*, tls: tuple | None = None, **smtp: object):
        files = {"smtp.ini": smtp_ini(**smtp), "host_list": "example.test\n",
                 "plugins": "rcpt_to.in_host_list\ncapture\n"}
        if tls is not None:
            key, cert = tls
            files["tls.ini"] = f"[main]\nkey = {key}\ncert = {cert}\n"
            files["plugins"] = "tls\n" + files["plugins"]
        return config_dir(files, {"capture": CAPTURE_PLUGIN})

    return make


@asynccontextmanager
async def session(port: int, ehlo: str | None = "client.test") -> AsyncIterator[RawClient]:
    """A connection that has had its 220 (and, unless ``ehlo`` is None, its EHLO 250)."""
    client = await RawClient.connect(port)
    try:
        code, text = await client.reply()
        assert code == 220, (code, text)
        if ehlo is not None:
            code, text = await client.command(f"EHLO {ehlo}")
            assert code == 250, (code, text)
        yield client
    finally:
        await client.close()


def enhanced(text: str) -> str:
    """The RFC 3463 code at the start of a reply's text."""
    return text.split(maxsplit=1)[0] if text else ""


def assert_reply(reply: tuple[int, str], code: int, enhanced_pattern: str) -> None:
    got_code, text = reply
    assert got_code == code and re.fullmatch(enhanced_pattern, enhanced(text)), reply


async def start_transaction(client: RawClient) -> None:
    assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
    assert (await client.command(f"RCPT TO:<{LOCAL_RCPT}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354


async def assert_serves_mail(hp: Running) -> None:
    """A new connection gets 220 and a normal message is queued, exactly once."""
    before = len(hp.captured)
    token = uuid.uuid4().hex
    refused = await sendmail(hp.port, SENDER, [LOCAL_RCPT],
                             f"Subject: {token}\r\n\r\nstill serving\r\n".encode())
    assert refused == {}
    assert len(hp.captured) == before + 1
    assert token.encode() in hp.captured[-1][1].message


async def replies_until_closed(client: RawClient, limit: int, timeout: float = 10.0
                               ) -> tuple[list[tuple[int, str]], bool]:
    """Read up to ``limit`` replies; return them and whether the server closed first."""
    replies: list[tuple[int, str]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(replies) < limit:
                replies.append(await client.reply(timeout=timeout))
    except ConnectionError:
        return replies, True
    return replies, False


# -- line length limits ----------------------------------------------------------------


async def test_command_line_over_512_octets_gets_500_and_connection_survives(make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            assert_reply(await client.command("NOOP " + "x" * 600), 500, r"5\.5\.\d+")
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
            # An overlong RCPT is refused for its length, before anyone parses it. RFC 3461
            # lets RCPT grow by its NOTIFY and ORCPT parameters, so the limit is higher.
            long_rcpt = "RCPT TO:<" + "r" * 1100 + "@example.test>"
            assert_reply(await client.command(long_rcpt), 500, r"5\.5\.\d+")
            assert (await client.command(f"RCPT TO:<{LOCAL_RCPT}>"))[0] == 250
            assert (await client.command("DATA"))[0] == 354
            code, _ = await client.command(b"Subject: after long lines\r\n\r\nok\r\n.")
            assert code == 250
        assert len(hp.captured) == 1
        await assert_serves_mail(hp)


@pytest.mark.parametrize("greeting", [None, "HELO client.test", "EHLO client.test"])
@pytest.mark.parametrize("octets", [513, 514])
async def test_command_line_limit_is_512_octets_including_crlf(make_dir, greeting, octets):
    # RFC 5321 4.5.3.1.4: "The maximum total length of a command line including the
    # command word and the <CRLF> is 512 octets." protocol.py says the same of
    # MAX_COMMAND_LINE ("CRLF included"). 512 is fine; one octet more is not, whether the
    # client said EHLO, HELO or nothing yet.
    async with running_server(make_dir()) as hp:
        async with session(hp.port, ehlo=None) as client:
            if greeting is not None:
                assert (await client.command(greeting))[0] == 250
            at_limit = "NOOP " + "x" * (512 - len("NOOP ") - 2)
            assert (await client.command(at_limit))[0] == 250
            over = "NOOP " + "x" * (octets - len("NOOP ") - 2)
            assert len(over) + 2 == octets
            assert_reply(await client.command(over), 500, r"5\.5\.\d+")
        await assert_serves_mail(hp)


async def test_100kb_line_without_crlf_is_discarded_not_buffered(make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            # 100 KB with no line end: far past the reader's limit. The server must keep
            # reading (and throwing away) rather than stop reading or hold it all.
            async with asyncio.timeout(5):
                for _ in range(100):
                    await client.send(b"A" * 1024)
            # Meanwhile, other clients are served normally.
            await assert_serves_mail(hp)
            # The line ends: one 500 for the whole of it, and the connection is usable.
            await client.send(b"\r\n")
            assert_reply(await client.reply(), 500, r"5\.5\.\d+")
            assert (await client.command("NOOP"))[0] == 250
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        await assert_serves_mail(hp)


async def test_data_line_over_1000_octets_gets_500_after_the_dot_and_nothing_is_queued(
        make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            await start_transaction(client)
            # The reply must wait for the final dot (RFC 5321 4.2.5): nothing before it.
            await client.send(b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\n")
            await client.send(b"after the long line\r\n")
            with pytest.raises(TimeoutError):
                await client.reply(timeout=0.2)
            code, text = await client.command(b".")
            assert (code, enhanced(text)) == (500, "5.5.2"), (code, text)
            assert hp.captured == []
            # The transaction is over and the connection is good for the next one.
            await start_transaction(client)
            assert (await client.command(b"Subject: short\r\n\r\nok\r\n."))[0] == 250
        assert len(hp.captured) == 1
        await assert_serves_mail(hp)


@pytest.mark.parametrize("octets", [1001, 1002, 1003])
async def test_data_line_limit_is_1000_octets_including_crlf(make_dir, octets):
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF, and
    # _read_data's docstring promises a 500 "after a line over 1000 octets".
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            await start_transaction(client)
            code, text = await client.command(b"x" * 998 + b"\r\n.")  # exactly 1000: fine
            assert code == 250, (code, text)
            await start_transaction(client)
            code, text = await client.command(b"x" * (octets - 2) + b"\r\n.")
            assert (code, enhanced(text)) == (500, "5.5.2"), (octets, code, text)
        assert len(hp.captured) == 1
        await assert_serves_mail(hp)


async def test_dot_stuffed_line_of_1000_octets_plus_the_stuffing_dot_is_accepted(make_dir):
    # 4.5.3.1.6 does not count the dot added for transparency.
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            await start_transaction(client)
            code, _ = await client.command(b"." + b"." * 998 + b"\r\n.")
            assert code == 250
        (_, transaction), = hp.captured
        assert transaction.message.endswith(b"\r\n" + b"." * 998 + b"\r\n")
        await assert_serves_mail(hp)


# -- malformed commands ----------------------------------------------------------------


@pytest.mark.parametrize("line", [
    pytest.param(b"HELO client\x00.test", id="helo"),
    pytest.param(b"EHLO \x00", id="ehlo-only-nul"),
    pytest.param(b"MAIL FROM:<a\x00@client.test>", id="mail-in-address"),
    pytest.param(b"MAIL FROM:<a@client.test>\x00", id="mail-after-address"),
    pytest.param(b"RCPT TO:<b@example.test\x00>", id="rcpt-in-address"),
])
async def test_nul_in_arguments_gets_501_5_5_2(make_dir, line):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            if line.startswith(b"RCPT"):
                assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
            assert_reply(await client.command(line), 501, r"5\.5\.2")
            # The NUL line changed nothing: the dialogue goes on where it was.
            if line.startswith(b"RCPT"):
                assert (await client.command(f"RCPT TO:<{LOCAL_RCPT}>"))[0] == 250
            else:
                assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        await assert_serves_mail(hp)


@pytest.mark.parametrize("line", [
    pytest.param(b"M\xc3\xa4IL FROM:<a@client.test>", id="utf8-in-verb"),
    pytest.param(b"\xff\xfe\xfd", id="all-8bit"),
    pytest.param(b"\x80", id="one-byte"),
    pytest.param(b"RCPT\xa0TO:<b@example.test>", id="nbsp-separator"),
])
async def test_8bit_command_verb_gets_500(make_dir, line):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            code, _ = await client.command(line)
            assert code == 500
            assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        await assert_serves_mail(hp)


@pytest.mark.parametrize(("setup", "line", "codes"), [
    # RFC 1870: SIZE is digits. "\u00b2" (superscript two) is str.isdigit() but not int()-able.
    pytest.param([], "MAIL FROM:<a@client.test> SIZE=\u00b2".encode(), (501,),
                 id="size-superscript-digit"),
    # Not valid UTF-8, under SMTPUTF8: a syntax error (RFC 6531 3.3), not our failure.
    pytest.param([], b"MAIL FROM:<\xff@client.test> SMTPUTF8", (501, 553),
                 id="mail-invalid-utf8"),
    pytest.param([], b"MAIL FROM:<\xff x@client.test> SMTPUTF8", (501, 553),
                 id="mail-invalid-utf8-malformed"),
    pytest.param(["MAIL FROM:<a@client.test> SMTPUTF8"], b"RCPT TO:<\xfe@example.test>",
                 (501, 553), id="rcpt-invalid-utf8"),
    pytest.param([], b"VRFY \xff\xfe", (252, 501, 502, 550, 553), id="vrfy-invalid-utf8"),
])
async def test_8bit_arguments_get_a_client_error_not_an_internal_error(make_dir, setup, line,
                                                                       codes):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            for command in setup:
                assert (await client.command(command))[0] == 250
            code, text = await client.command(line)
            # 451 "Internal error" tells the client to retry the same bytes forever.
            assert code in codes, (line, code, text)
            assert "internal error" not in text.lower()
            assert (await client.command("RSET"))[0] == 250
        await assert_serves_mail(hp)


async def test_8bit_helo_name_does_not_break_the_message(make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port, ehlo=None) as client:
            code, text = await client.command(b"EHLO \xff\xfe(evil)\x1b[31m")
            if code == 250:
                await start_transaction(client)
                code, text = await client.command(b"Subject: x\r\n\r\nok\r\n.")
                assert code == 250, (code, text)
                (_, transaction), = hp.captured
                received = transaction.message.split(b"\r\n")[0]
                assert b"\x1b" not in received and b"(evil)" not in received
            else:
                assert code == 501, (code, text)
        await assert_serves_mail(hp)


async def test_unknown_commands_get_500_then_502_and_close(make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            codes = []
            for n in range(20):
                try:
                    code, text = await client.command(f"XBOGUS{n} arg")
                except ConnectionError:
                    break
                codes.append(code)
                if code == 502:
                    assert enhanced(text) == "5.5.1", text
                    assert await client.closed(timeout=5)
                    break
                assert_reply((code, text), 500, r"5\.5\.\d+")
            assert codes[-1] == 502, codes
            assert len(codes) >= 3, codes  # a typo or two is not a reason to hang up
        await assert_serves_mail(hp)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pipelined_random_lines_get_an_answer_each_or_a_close(make_dir, seed):
    rng = random.Random(seed)
    noise = bytes(b for b in range(256) if b not in b"\r\n")
    lines = [bytes(rng.choice(noise) for _ in range(rng.choice([0, 1, 5, 80, 600, 1500])))
             for _ in range(150)]
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            with suppress(ConnectionError):  # it may hang up before it has read everything
                await client.send(b"".join(line + b"\r\n" for line in lines))
            replies, closed = await replies_until_closed(client, len(lines))
            for code, text in replies:
                assert 500 <= code < 600, (code, text)
            if not closed:
                assert len(replies) == len(lines)
            else:
                assert replies and replies[-1][0] in (421, 502), replies[-3:]
        await assert_serves_mail(hp)


@pytest.mark.parametrize("seed", [4, 5])
async def test_random_byte_stream_is_answered_line_by_line_or_closed(make_dir, seed):
    blob = random.Random(seed).randbytes(64 * 1024)  # bare LFs, CRs, NULs, 8-bit: anything
    lines = blob.count(b"\n") + 1  # aiosmtpd ends a command line at LF
    async with running_server(make_dir(timeout=1)) as hp:
        async with session(hp.port, ehlo=None) as client:
            with suppress(ConnectionError):
                await client.send(blob + b"\r\nQUIT\r\n")
            replies, closed = await replies_until_closed(client, lines + 1, timeout=5)
            assert replies, "no answer at all"
            for code, text in replies[:-1]:
                assert code in (500, 501, 502, 503), (code, text)
            if replies[-1][0] == 221:
                # Survived all of it: one answer per line, and then QUIT worked.
                assert len(replies) == lines + 1
            else:
                # Or it hung up on the client, saying why.
                assert closed and replies[-1][0] in (421, 502), replies[-3:]
        await assert_serves_mail(hp)


# -- connection limits -----------------------------------------------------------------


async def test_300_concurrent_connections_all_get_220_and_can_quit(make_dir):
    async with running_server(make_dir()) as hp, AsyncExitStack() as stack:
        clients = await asyncio.gather(*(RawClient.connect(hp.port) for _ in range(300)))
        for client in clients:
            stack.push_async_callback(client.close)
        greetings = await asyncio.gather(*(client.reply() for client in clients))
        assert [code for code, _ in greetings] == [220] * 300
        byes = await asyncio.gather(*(client.command("QUIT") for client in clients))
        assert [code for code, _ in byes] == [221] * 300
        closed = await asyncio.gather(*(client.closed(timeout=5) for client in clients))
        assert all(closed)
        await assert_serves_mail(hp)


async def test_max_connections_refuses_the_sixth_with_421_until_one_leaves(make_dir):
    async with running_server(make_dir(max_connections=5)) as hp, AsyncExitStack() as stack:
        clients = []
        for _ in range(5):
            client = await RawClient.connect(hp.port)
            stack.push_async_callback(client.close)
            assert (await client.reply())[0] == 220
            clients.append(client)
        sixth = await RawClient.connect(hp.port)
        stack.push_async_callback(sixth.close)
        assert_reply(await sixth.reply(), 421, r"4\.3\.2")
        assert await sixth.closed(timeout=5)
        # The five are still served.
        assert (await clients[0].command("EHLO client.test"))[0] == 250
        # One leaves: a newcomer gets in, and takes mail.
        assert (await clients[4].command("QUIT"))[0] == 221
        assert await clients[4].closed(timeout=5)
        await assert_serves_mail(hp)
        # ... and the server is full again once the newcomer stays.
        newcomer = await RawClient.connect(hp.port)
        stack.push_async_callback(newcomer.close)
        assert (await newcomer.reply())[0] == 220
        seventh = await RawClient.connect(hp.port)
        stack.push_async_callback(seventh.close)
        assert_reply(await seventh.reply(), 421, r"4\.3\.2")


# -- timeouts --------------------------------------------------------------------------


async def test_idle_client_before_any_command_gets_421_4_4_2(make_dir):
    async with running_server(make_dir(timeout=0.5)) as hp:
        loop = asyncio.get_running_loop()
        client = await RawClient.connect(hp.port)
        try:
            assert (await client.reply())[0] == 220
            started = loop.time()
            assert_reply(await client.reply(timeout=5), 421, r"4\.4\.2")
            assert loop.time() - started >= 0.4  # the timeout did it, not something else
            assert await client.closed(timeout=5)
        finally:
            await client.close()
        await assert_serves_mail(hp)


@pytest.mark.parametrize("partial", [
    pytest.param(b"Subject: stall\r\n\r\nhalf a line", id="mid-line"),
    pytest.param(b"Subject: stall\r\n\r\nwhole lines\r\n", id="between-lines"),
])
async def test_client_stalling_in_data_gets_421_4_4_2_and_nothing_is_queued(make_dir,
                                                                           partial):
    async with running_server(make_dir(timeout=0.5)) as hp:
        loop = asyncio.get_running_loop()
        async with session(hp.port) as client:
            await start_transaction(client)
            await client.send(partial)
            started = loop.time()
            assert_reply(await client.reply(timeout=5), 421, r"4\.4\.2")
            assert loop.time() - started >= 0.4
            assert await client.closed(timeout=5)
        assert hp.captured == []
        await assert_serves_mail(hp)


async def test_data_trickled_past_data_timeout_gets_421_4_4_2(make_dir):
    async with running_server(make_dir(timeout=5, data_timeout=1)) as hp:
        loop = asyncio.get_running_loop()

        async def trickle(client: RawClient) -> None:
            try:
                while True:
                    await client.send(b"one more line\r\n")
                    await asyncio.sleep(0.2)
            except ConnectionError:
                pass

        async with session(hp.port) as client:
            await start_transaction(client)
            started = loop.time()
            trickler = asyncio.create_task(trickle(client))
            try:
                reply = await client.reply(timeout=4)
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
            elapsed = loop.time() - started
            assert_reply(reply, 421, r"4\.4\.2")
            # data_timeout (1 s) ended it: not the 5 s idle timeout, which each line resets.
            assert 0.9 <= elapsed < 4, elapsed
            assert await client.closed(timeout=5)
        assert hp.captured == []
        await assert_serves_mail(hp)


# -- message data: line ends and smuggling ---------------------------------------------


async def test_bare_lf_in_data_is_normalised_to_crlf(make_dir):
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            await start_transaction(client)
            code, _ = await client.command(b"Subject: lf\r\n\r\nline1\nline2\n\nline4\r\n.")
            assert code == 250
        (_, transaction), = hp.captured
        assert transaction.message.endswith(
            b"Subject: lf\r\n\r\nline1\r\nline2\r\n\r\nline4\r\n")
        assert re.search(rb"(?<!\r)\n", transaction.message) is None
        await assert_serves_mail(hp)


@pytest.mark.parametrize("smuggled", [
    pytest.param(b"a\n.\nMAIL FROM:<x@y>\r\n", id="LF.LF"),
    pytest.param(b"a\n.\r\nMAIL FROM:<x@y>\r\n", id="LF.CRLF"),
    pytest.param(b"a\r\n.\nMAIL FROM:<x@y>\r\n", id="CRLF.LF"),
])
async def test_lone_dot_with_bare_lf_does_not_end_the_message(make_dir, smuggled):
    # SMTP smuggling (CVE-2023-51764 and friends): only <CRLF>.<CRLF> ends the data. If
    # "<LF>.<LF>" ended it here, the text after it would run as a second transaction.
    async with running_server(make_dir()) as hp:
        async with session(hp.port) as client:
            await start_transaction(client)
            await client.send(b"Subject: smuggle\r\n\r\n" + smuggled
                              + b"RCPT TO:<b@example.test>\r\nDATA\r\n"
                              + b"Subject: smuggled\r\n\r\nevil\r\n")
            # Had the message ended at the lone dot, the smuggled commands would each have
            # had a reply below, and the body would stop there.
            await client.send(b"tail\r\n.\r\nQUIT\r\n")
            replies, closed = await replies_until_closed(client, 5, timeout=5)
            assert [code for code, _ in replies] == [250, 221], replies
            assert closed
        (_, transaction), = hp.captured
        body = transaction.message.split(b"Subject: smuggle\r\n\r\n", 1)[1]
        assert b"MAIL FROM:<x@y>\r\n" in body
        assert body.endswith(b"Subject: smuggled\r\n\r\nevil\r\ntail\r\n")


async def test_starttls_discards_plaintext_pipelined_after_it(make_dir, server_cert):
    # RFC 3207 4.2 / CVE-2011-0411: a man in the middle appends a command to STARTTLS in
    # the same segment; it must not run inside the TLS session the client then sets up.
    async with running_server(make_dir(tls=server_cert)) as hp:
        async with session(hp.port) as client:
            await client.send(b"STARTTLS\r\nRSET\r\n")
            code, _ = await client.reply()
            assert code == 220
            await client.starttls(insecure_client_context())
            code, text = await client.command("EHLO client.test")
            # The first reply inside TLS answers our EHLO, not the injected RSET.
            assert code == 250 and "ENHANCEDSTATUSCODES" in text.splitlines(), text
            assert "STARTTLS" not in text.splitlines()
            assert (await client.command("QUIT"))[0] == 221
        await assert_serves_mail(hp)


async def test_starttls_injected_transaction_does_not_survive_the_handshake(make_dir,
                                                                            server_cert):
    async with running_server(make_dir(tls=server_cert)) as hp:
        async with session(hp.port) as client:
            await client.send(b"STARTTLS\r\nEHLO evil.test\r\n"
                              b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<b@example.test>\r\n")
            assert (await client.reply())[0] == 220
            await client.starttls(insecure_client_context())
            # Had the injected lines run, the first reply here would be their EHLO's 250.
            # Nothing may be in progress: DATA has no MAIL.
            code, text = await client.command("DATA")
            assert_reply((code, text), 503, r"5\.5\.1")
            assert (await client.command("QUIT"))[0] == 221
        assert hp.captured == []
        await assert_serves_mail(hp)


# -- sequence and syntax errors --------------------------------------------------------

MAIL = (f"MAIL FROM:<{SENDER}>", 250)
RCPT_REFUSED = ("RCPT TO:<c@elsewhere.test>", 550)


@pytest.mark.parametrize(("setup", "line", "code", "enhanced_pattern"), [
    pytest.param([], "MAIL FROM:<a@client.test>", 503, r"5\.5\.1", id="mail-before-ehlo"),
    pytest.param([("EHLO c", 250), MAIL], "MAIL FROM:<a@client.test>", 503, r"5\.5\.1",
                 id="nested-mail"),
    pytest.param([("EHLO c", 250)], "RCPT TO:<b@example.test>", 503, r"5\.5\.1",
                 id="rcpt-before-mail"),
    pytest.param([("EHLO c", 250)], "DATA", 503, r"5\.5\.1", id="data-before-mail"),
    # RFC 2920 3.1: DATA after only refused recipients is 554.
    pytest.param([("EHLO c", 250), MAIL, RCPT_REFUSED], "DATA", 554, r"5\.5\.1",
                 id="data-after-refused-rcpt"),
    pytest.param([("EHLO c", 250), MAIL], "DATA", 554, r"5\.5\.1", id="data-without-rcpt"),
    pytest.param([], "HELO", 501, r"5\.5\.\d+", id="helo-without-name"),
    pytest.param([], "EHLO", 501, r"5\.5\.\d+", id="ehlo-without-name"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:a@client.test", 501, r"5\.5\.4",
                 id="mail-no-brackets"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a>", 501, r"5\.5\.4", id="mail-no-domain"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@>", 501, r"5\.5\.4",
                 id="mail-empty-domain"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a b@client.test>", 501, r"5\.5\.4",
                 id="mail-space-in-local"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client .test>", 501, r"5\.5\.4",
                 id="mail-space-in-domain"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client.test", 501, r"5\.5\.4",
                 id="mail-unclosed"),
    pytest.param([("EHLO c", 250)], "MAIL FROM <a@client.test>", 501, r"5\.5\.4",
                 id="mail-no-colon"),
    pytest.param([("EHLO c", 250), MAIL], "RCPT TO:b@example.test", 501, r"5\.5\.4",
                 id="rcpt-no-brackets"),
    pytest.param([("EHLO c", 250), MAIL], "RCPT TO:<b>", 501, r"5\.5\.4",
                 id="rcpt-no-domain"),
    pytest.param([("EHLO c", 250), MAIL], "RCPT TO:<>", 501, r"5\.5\.4", id="rcpt-null"),
    pytest.param([("EHLO c", 250), MAIL], "RCPT TO:<b c@example.test>", 501, r"5\.5\.4",
                 id="rcpt-space"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client.test> FOO=bar", 555, r"5\.5\.4",
                 id="mail-unknown-param"),
    pytest.param([("EHLO c", 250), MAIL], "RCPT TO:<b@example.test> FOO=bar", 555,
                 r"5\.5\.4", id="rcpt-unknown-param"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client.test> SIZE=abc", 501, r"5\.5\.4",
                 id="size-not-a-number"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client.test> SIZE=-1", 501, r"5\.5\.4",
                 id="size-negative"),
    pytest.param([("EHLO c", 250)], "MAIL FROM:<a@client.test> SIZE", 501, r"5\.5\.4",
                 id="size-without-value"),
    pytest.param([("HELO c", 250)], "MAIL FROM:<a@client.test> SIZE=10", 501, r"5\.5\.4",
                 id="params-after-helo"),
])
async def test_sequence_and_syntax_errors(make_dir, setup, line, code, enhanced_pattern):
    async with running_server(make_dir()) as hp:
        async with session(hp.port, ehlo=None) as client:
            for command, expected in setup:
                assert (await client.command(command))[0] == expected, command
            assert_reply(await client.command(line), code, enhanced_pattern)
            # The error left the dialogue where it was: RSET, then a whole message.
            assert (await client.command("RSET"))[0] == 250
            if not any(command.startswith(("EHLO", "HELO")) for command, _ in setup):
                assert (await client.command("EHLO c"))[0] == 250
            await start_transaction(client)
            assert (await client.command(b"Subject: after\r\n\r\nok\r\n."))[0] == 250
        assert len(hp.captured) == 1
        await assert_serves_mail(hp)
