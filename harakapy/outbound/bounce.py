"""Delivery status notifications (RFC 3464, RFC 6522): the text of a bounce or delay warning.

Pure: given the message and what happened to its recipients, build the DSN bytes. Sending
it (from ``<>``, never to ``<>``) is the queue runner's business.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from harakapy.dsn import xtext_decode
from harakapy.spool.store import QueuedMessage


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient's line in a DSN (a success too, for a ``relayed`` notice).

    :param recipient: The forward path.
    :param status: RFC 3463 code, e.g. ``5.1.1``.
    :param diagnostic: The remote server's reply (``smtp; 550 5.1.1 ...``) or our reason.
    :param remote_mta: The host that answered, if one did.
    :param remote: Whether ``diagnostic`` is a remote server's reply.
    :param orcpt: The recipient's RFC 3461 ``ORCPT`` (``rfc822;xtext``), if it gave one.
    """

    recipient: str
    status: str
    diagnostic: str
    remote_mta: str = ""
    remote: bool = False
    orcpt: str = ""


def _fold(text: str) -> str:
    return " ".join(text.split())[:900]


FAILED, DELAYED, RELAYED, DELIVERED = "failed", "delayed", "relayed", "delivered"
_SUBJECTS = {FAILED: "Undelivered Mail Returned to Sender",
             DELAYED: "Delayed Mail (still being retried)",
             RELAYED: "Successful Mail Delivery Report",
             DELIVERED: "Successful Mail Delivery Report"}
_EXPLAINED = {
    FAILED: "I'm sorry to have to inform you that your message could not be delivered to "
            "one or more recipients. It's attached below.",
    DELAYED: "Your message could not be delivered yet to the recipients below. It is "
             "still in the queue and will be tried again.",
    RELAYED: "Your message was handed to the recipients' mail servers below, which do not "
             "offer delivery status notifications: this is the last report you will get "
             "about them, as you asked with NOTIFY=SUCCESS.",
    DELIVERED: "Your message was delivered to the mailboxes of the recipients below, as "
               "you asked to hear with NOTIFY=SUCCESS.",
}


def build_dsn(message: QueuedMessage, failures: list[Failure], *, me: str,
              delayed: bool = False, retry_until: float | None = None,
              now: float | None = None, action: str = "") -> bytes:
    """The DSN for ``failures`` of ``message``, as bytes with CRLF line ends.

    :param me: Our host name (Reporting-MTA, From: MAILER-DAEMON@me).
    :param delayed: A delay warning (Action: delayed) instead of a bounce (Action: failed).
    :param retry_until: For a delay warning, when we give up (Will-Retry-Until).
    :param action: ``relayed`` or ``delivered`` for a success notice (RFC 3461
        NOTIFY=SUCCESS to a server without DSN, an LMTP mailbox); by default ``failed``,
        or ``delayed`` with ``delayed``.
    """
    action = action or (DELAYED if delayed else FAILED)
    boundary = f"=_harakapy_{os.urandom(8).hex()}"
    date = formatdate(now, usegmt=True)
    utf8 = message.smtputf8

    human = [f"This is the mail system at host {me}.", "", _EXPLAINED[action], ""]
    for failure in failures:
        human.append(f"<{failure.recipient}>: {_fold(failure.diagnostic)}")
        if failure.remote_mta:
            human.append(f"    (host {failure.remote_mta})")
    human.append("")

    per_message = [f"Reporting-MTA: dns; {me}", f"X-Harakapy-Queue-ID: {message.id}",
                   f"Arrival-Date: {formatdate(message.arrival, usegmt=True)}"]
    if message.envid:
        # RFC 3464 2.2.1: the sender's ENVID, xtext-decoded.
        per_message.insert(0, f"Original-Envelope-Id: {_fold(xtext_decode(message.envid))}")
    per_recipient = []
    for failure in failures:
        kind = "utf-8" if utf8 and not failure.recipient.isascii() else "rfc822"
        original = f"{kind}; {failure.recipient}"
        if failure.orcpt:
            address_type, _, address = failure.orcpt.partition(";")
            original = f"{address_type}; {_fold(xtext_decode(address))}"
        block = [f"Final-Recipient: {kind}; {failure.recipient}",
                 f"Original-Recipient: {original}",
                 f"Action: {action}", f"Status: {failure.status}"]
        if failure.remote_mta:
            block.append(f"Remote-MTA: dns; {failure.remote_mta}")
        if failure.diagnostic:
            kind = "smtp" if failure.remote else "x-harakapy"
            block.append(f"Diagnostic-Code: {kind}; {_fold(failure.diagnostic)}")
        block.append(f"Last-Attempt-Date: {date}")
        if action == DELAYED and retry_until is not None:
            block.append(f"Will-Retry-Until: {formatdate(retry_until, usegmt=True)}")
        per_recipient.append("\r\n".join(block))

    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    # A bounce returns the original whole unless the sender asked for its header only
    # (RFC 3461 RET=HDRS); a delay warning or success notice needs no more than the
    # header, and nor does any notice about a REQUIRETLS message (RFC 8689 5, whatever
    # RET says).
    headers_only = action != FAILED or message.ret == "HDRS" or message.requiretls
    if headers_only:
        original_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        original = message.read_headers()
    else:
        original_type = "message/global" if utf8 else "message/rfc822"
        original = message.read()

    head = "\r\n".join([
        f"From: MAILER-DAEMON@{me} (Mail Delivery System)",
        f"To: <{message.sender}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {date}",
        f"Message-ID: {make_msgid(domain=me)}",
        "Auto-Submitted: auto-replied",
        # The sender asked that TLS policy not stop the message; nor its notice (Postfix
        # does the same).
        *(["TLS-Required: No"] if message.tls_optional and not message.requiretls else []),
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "\r\n".join(human),
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}",
        "",
        "\r\n".join(per_message),
        "",
        "\r\n\r\n".join(per_recipient),
        "",
        f"--{boundary}",
        "Content-Description: Undelivered message" + (" header" if headers_only else ""),
        f"Content-Type: {original_type}",
        "",
        "",
    ])
    tail = f"\r\n--{boundary}--\r\n"
    original = original if original.endswith(b"\r\n") else original + b"\r\n"
    return head.encode("utf-8") + original + tail.encode()


HEADER_TYPES = ("text/rfc822-headers", "message/global-headers", "message/rfc822",
                "message/global")


def redact_notice(notice: bytes, *, me: str) -> bytes:
    """A notice about a REQUIRETLS message, without the original's header: for the way
    back when it cannot travel with REQUIRETLS (``[notices] fallback = redacted``). The
    delivery report stays; a sentence says what was left out and why."""
    parsed = email.parser.BytesParser(policy=email.policy.SMTP).parsebytes(notice)
    if not isinstance(parsed, EmailMessage) or not parsed.is_multipart():
        raise ValueError("not a notice of ours")
    kept = [part for part in parsed.iter_parts()
            if part.get_content_type() not in HEADER_TYPES]
    note = EmailMessage(policy=email.policy.SMTP)
    note.set_content(
        f"This is the mail system at host {me}.\n\n"
        "The message this notice is about was sent with REQUIRETLS (RFC 8689). The way "
        "back to you could not carry this notice with REQUIRETLS, so the original "
        "message's header, which the notice would return, has been left out.\n")
    note["Content-Description"] = "Notification"
    parsed.set_payload([note, *kept])
    if "Subject" in parsed:
        parsed.replace_header("Subject", f"{parsed['Subject']} (header withheld)")
    return parsed.as_bytes()
