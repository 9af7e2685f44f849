"""The interop tests' receiving MX (tests/postfix_receiver.py) tells the truth: a message sent
to it over STARTTLS comes back with its envelope, its body and Postfix's own Received
header saying TLS was used; EHLO and MAIL FROM answer as Postfix 3.7 does (no REQUIRETLS,
555 for a parameter it does not know); the log records the session.

Sent with the standard library's smtplib, not harakapy: these tests prove the receiver, so
that an interop test that fails points at harakapy's client, not at the helper.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

import pytest
import trustme

from tests.postfix_receiver import PostfixReceiver, ReceiverError, parse_postcat

IP = "127.0.0.61"
MESSAGE = (b"From: sender@client.test\r\nTo: bob@example.test\r\nSubject: interop\r\n"
           b"Message-ID: <1@client.test>\r\n\r\nfirst line\r\n.starts with a dot\r\n")


@pytest.fixture
def mx_cert(tls_ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """``(cert, key)`` for mx.example.test and the receiver's address: smtplib checks the
    name it connected to, which is the address."""
    issued = tls_ca.issue_cert("mx.example.test", IP)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    return cert, key


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@pytest.fixture
async def mx(mx_cert: tuple[Path, Path]):
    async with PostfixReceiver(IP, cert=mx_cert, domains=["example.test"]) as receiver:
        yield receiver


def connect(mx: PostfixReceiver, context: ssl.SSLContext) -> smtplib.SMTP:
    """An smtplib session after STARTTLS and the second EHLO."""
    smtp = smtplib.SMTP(mx.ip, mx.port, local_hostname="client.test", timeout=30)
    smtp.starttls(context=context)
    smtp.ehlo()
    return smtp


async def test_a_message_over_starttls_arrives_with_its_envelope_and_tls_received(
        mx: PostfixReceiver, client_tls: ssl.SSLContext) -> None:
    def send() -> dict:
        with connect(mx, client_tls) as smtp:
            return smtp.sendmail("sender@client.test", ["bob@example.test", "carol@example.test"],
                                 MESSAGE, mail_options=["BODY=8BITMIME"],
                                 rcpt_options=["NOTIFY=SUCCESS,FAILURE"])

    assert await asyncio.to_thread(send) == {}
    [message] = await mx.wait_for_messages(1)
    assert message.sender == "sender@client.test"
    assert message.recipients == ("bob@example.test", "carol@example.test")
    assert message.attributes["encoding"] == "8bit"
    # Postfix's notify_flags bits: NEVER 1, SUCCESS 2, FAILURE 4, DELAY 8.
    assert message.recipient_attributes["bob@example.test"]["notify_flags"] == "6"
    assert message.body == b"first line\n.starts with a dot\n"
    assert message.message["Subject"] == "interop"
    assert message.message["Message-ID"] == "<1@client.test>"
    received = message.received
    assert f"by {mx.hostname} (Postfix) with ESMTPS id {message.queue_id}" in received
    assert "(using TLSv1.3 with cipher " in received
    await mx.wait_for_log(r"TLS connection established from \S+: TLSv1\.3 with cipher")


async def test_postfix_37_offers_no_requiretls_and_refuses_it_with_555(
        mx: PostfixReceiver, client_tls: ssl.SSLContext) -> None:
    def session() -> tuple[dict[str, str], tuple[int, bytes], tuple[int, bytes]]:
        with connect(mx, client_tls) as smtp:
            features = dict(smtp.esmtp_features)
            refused = smtp.docmd("MAIL FROM:<a@b> REQUIRETLS")
            accepted = smtp.docmd("MAIL FROM:<a@b>")
            return features, refused, accepted

    features, refused, accepted = await asyncio.to_thread(session)
    assert "starttls" not in features  # the EHLO after STARTTLS
    assert {"pipelining", "8bitmime", "dsn", "smtputf8", "chunking"} <= set(features)
    assert "requiretls" not in features
    assert refused == (555, b"5.5.4 Unsupported option: REQUIRETLS")
    assert accepted[0] == 250
    await mx.wait_for_log(r"disconnect from \S+ .*starttls=1 mail=1/2")
    transcript = mx.transcript()
    assert transcript[:2] == [f"> 220 {mx.hostname} ESMTP Postfix", "< ehlo client.test"]
    assert "< MAIL FROM:<a@b> REQUIRETLS" in transcript
    assert "> 555 5.5.4 Unsupported option: REQUIRETLS" in transcript


async def test_mail_for_another_domain_is_not_relayed(
        mx: PostfixReceiver, client_tls: ssl.SSLContext) -> None:
    def session() -> tuple[int, bytes]:
        with connect(mx, client_tls) as smtp:
            smtp.mail("sender@client.test")
            return smtp.rcpt("someone@elsewhere.test")

    assert await asyncio.to_thread(session) == (
        454, b"4.7.1 <someone@elsewhere.test>: Relay access denied")


async def test_the_null_sender_and_two_transactions_in_order(mx: PostfixReceiver) -> None:
    def send() -> None:
        with smtplib.SMTP(mx.ip, mx.port, local_hostname="client.test", timeout=30) as smtp:
            smtp.sendmail("", ["postmaster@example.test"], b"Subject: one\r\n\r\nbounce\r\n")
            smtp.sendmail("x@client.test", ["y@example.test"], b"Subject: two\r\n\r\n"
                          + b"x" * 5000 + b"\r\n")

    await asyncio.to_thread(send)
    first, second = await mx.wait_for_messages(2)
    assert (first.sender, first.recipients) == ("", ("postmaster@example.test",))
    assert second.message["Subject"] == "two"
    assert second.body == b"x" * 5000 + b"\n"  # longer than a queue record: joined again
    assert " with ESMTP id " in first.received  # no STARTTLS: ESMTP, not ESMTPS


async def test_stop_frees_the_port_and_removes_the_instance(mx_cert) -> None:
    receiver = PostfixReceiver(IP, cert=mx_cert)
    async with receiver:
        directory, port = receiver.directory, receiver.port
        assert (directory / "queue" / "hold").is_dir()
    assert not directory.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(IP, port)
    assert "daemon started -- version 3.7" in receiver.log()


async def test_two_receivers_at_once_keep_their_mail_apart(mx: PostfixReceiver) -> None:
    async with PostfixReceiver("127.0.0.62", domains=["other.test"]) as other:
        def send() -> None:
            for receiver, rcpt in ((mx, "a@example.test"), (other, "b@other.test")):
                with smtplib.SMTP(receiver.ip, receiver.port, timeout=30) as smtp:
                    smtp.sendmail("x@client.test", [rcpt], b"Subject: apart\r\n\r\nhi\r\n")

        await asyncio.to_thread(send)
        [here], [there] = await mx.wait_for_messages(1), await other.wait_for_messages(1)
        assert (here.recipients, there.recipients) == (("a@example.test",), ("b@other.test",))
        assert " by mx.other.test (Postfix) with ESMTP id " in there.received


def test_cert_and_key_in_the_wrong_order_are_refused(mx_cert) -> None:
    cert, key = mx_cert  # conftest's server_cert fixture is (key, cert): an easy mix-up
    with pytest.raises(ValueError, match="no CERTIFICATE"):
        PostfixReceiver(IP, cert=(key, cert))


def test_postcat_output_without_a_message_section_is_an_error() -> None:
    with pytest.raises(ReceiverError, match="no message section"):
        parse_postcat("ABC123", b"*** ENVELOPE RECORDS hold/ABC123 ***\nsender: a@b\n")
