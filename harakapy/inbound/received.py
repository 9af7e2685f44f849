"""The ``Received:`` header we prepend, written the way Postfix writes it.

RFC 5321 4.4 trace fields with RFC 3848 protocol names (ESMTPS: TLS, ESMTPA: AUTH), and
Postfix's ``(using TLSv1.3 with cipher ...)`` comment, which tools already parse.
"""

from __future__ import annotations

import functools
import time
from email.utils import formatdate

from harakapy.inbound.connection import Connection, Transaction


def protocol_name(connection: Connection, transaction: Transaction) -> str:
    """RFC 3848 / RFC 6531 names: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP(S)(A)."""
    if not connection.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if transaction.smtputf8 else "ESMTP"
    return base + ("S" if connection.tls else "") + ("A" if connection.auth_user else "")


def received_header(connection: Connection, transaction: Transaction, me: str,
                    *, now: float | None = None) -> bytes:
    """The header, folded, ending in CRLF.

    :param now: Seconds since the epoch (the current time when ``None``).
    """
    helo = _clean(connection.helo or "unknown")
    lines = [f"Received: from {helo} (unknown [{connection.remote_ip}])"]
    if connection.tls is not None:
        tls = connection.tls
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} "
                     f"({tls.bits}/{tls.bits} bits))")
        lines.append("\t(No client certificate requested)")
    if connection.auth_user:
        lines.append("\t(Authenticated sender: " + _clean(connection.auth_user) + ")")
    protocol = protocol_name(connection, transaction)
    lines.append(f"\tby {me} (harakapy) with {protocol} id {transaction.id}")
    rcpt = f"for {transaction.recipients[0]}; " if len(transaction.recipients) == 1 else ""
    lines.append(f"\t{rcpt}{_date(int(time.time() if now is None else now))}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    # One RFC 5322 date per second serves every message received in it.
    return formatdate(second, localtime=False, usegmt=True)


def _clean(text: str) -> str:
    # The client chose this text: keep it on one line and out of our comment syntax.
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text)[:255]


def count_received(message: bytes) -> int:
    """How many ``Received:`` fields the header section of ``message`` has."""
    header = message.split(b"\r\n\r\n", 1)[0]
    return sum(1 for line in header.split(b"\r\n") if line[:9].lower() == b"received:")
