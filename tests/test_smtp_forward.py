"""queue/smtp_forward: the inbound gateway in front of an SMTP or LMTP backend."""

from __future__ import annotations

import asyncio
import smtplib
from contextlib import AsyncExitStack

import pytest

from tests.harness import ManualClock, eventually, running_server, sendmail
from tests.outbound_env import free_port_on_all
from tests.servers import ReceivingMTA


@pytest.fixture
def gateway(config_dir):
    port = free_port_on_all()

    def make(lmtp: bool):
        return config_dir({
            "me": "gw.test\n",
            "host_list": "corp.test\n",
            "relay_acl_allow": "192.0.2.0/24\n",
            "plugins": "rcpt_to.in_host_list\nqueue/smtp_forward\n",
            "smtp_forward.ini": f"[main]\nhost = 127.0.0.2\nport = {port}\n"
                                f"lmtp = {'yes' if lmtp else 'no'}\n",
            "outbound.ini": "[main]\nmin_backoff = 60\nconnect_timeout = 2\n",
        }), port

    return make


async def test_forwards_to_an_smtp_backend(gateway):
    root, port = gateway(lmtp=False)
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(ReceivingMTA("127.0.0.2", port))
        hp = await stack.enter_async_context(running_server(root))
        await sendmail(hp.port, "x@outside.test", ["user@corp.test"], b"Subject: in\r\n\r\nx\r\n")
        await eventually(lambda: backend.messages)
        assert backend.messages[0].recipients == ["user@corp.test"]
        assert b"by gw.test (harakapy)" in backend.messages[0].data
        # Other domains are still refused: a gateway is no open relay.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await sendmail(hp.port, "x@outside.test", ["y@elsewhere.test"], b"x\r\n")


async def test_lmtp_backend_per_recipient_replies(gateway):
    root, port = gateway(lmtp=True)
    clock = ManualClock()
    replies = {"full@corp.test": "452 4.2.2 mailbox full", "gone@corp.test": "550 5.1.1 gone"}
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(
            ReceivingMTA("127.0.0.2", port, lmtp=True, lmtp_reply=replies.get))
        hp = await stack.enter_async_context(running_server(root, clock=clock))
        await sendmail(hp.port, "", ["ok@corp.test", "full@corp.test", "gone@corp.test"],
                       b"Subject: lmtp\r\n\r\nx\r\n")
        await eventually(lambda: backend.messages)
        assert backend.messages[0].recipients == ["ok@corp.test"]
        queue = hp.root / "queue" / "msg"
        await eventually(lambda: len(list(queue.iterdir())) == 1)  # full@ waits for a retry
        [waiting] = list(queue.iterdir())
        journal = hp.root / "queue" / "log" / waiting.name
        # The retry is scheduled when the deferral is in the journal: move the clock after.
        await eventually(lambda: journal.exists() and b'"deferred"' in journal.read_bytes())
        replies.pop("full@corp.test")
        clock.advance(61)
        await eventually(lambda: len(backend.messages) == 2)
        assert backend.messages[1].recipients == ["full@corp.test"]
        await eventually(lambda: not list(queue.iterdir()))


async def test_a_success_notice_for_an_lmtp_mailbox_says_delivered(gateway):
    # RFC 3464 2.3.3: into a mailbox is "delivered"; handed to another server "relayed".
    root, port = gateway(lmtp=True)
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(ReceivingMTA("127.0.0.2", port, lmtp=True))
        hp = await stack.enter_async_context(running_server(root))

        def run() -> None:
            with smtplib.SMTP("127.0.0.1", hp.port, timeout=30) as smtp:
                smtp.sendmail("boss@corp.test", ["user@corp.test"],
                              b"Subject: in\r\n\r\nx\r\n", rcpt_options=["NOTIFY=SUCCESS"])

        await asyncio.to_thread(run)
        # The notice goes to the sender's mailbox on the same backend.
        await eventually(lambda: len(backend.messages) == 2)
        notice = backend.messages[1]
        assert notice.sender == "<>" and notice.recipients == ["boss@corp.test"]
        assert b"Action: delivered" in notice.data and b"Status: 2.0.0" in notice.data
