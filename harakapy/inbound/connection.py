"""What plugins see of an inbound client: the Connection and its current Transaction.

Plain data with ``notes`` mappings for plugins to talk to each other, as in Haraka. The
protocol (``inbound/protocol.py``) fills them in; nothing here does I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from harakapy.inbound.address import Address


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS session of a connection, for ``Received:`` and for plugins."""

    version: str
    cipher: str
    bits: int


@dataclass(slots=True, eq=False)
class Transaction:
    """One message: from ``MAIL FROM`` to the end of data (or ``RSET``).

    :ivar id: ``<connection id>.<n>``; the id the client hears in ``queued as``.
    :ivar sender: The reverse path.
    :ivar recipients: Accepted forward paths, in order.
    :ivar message: The message as received, our ``Received:`` header first, CRLF line ends;
        ``None`` until the data has arrived.
    :ivar requiretls: Deliver only over validated TLS to servers that offer REQUIRETLS
        (RFC 8689): set when the client sent ``MAIL FROM:<...> REQUIRETLS``; a plugin may
        set it too (in ``mail``, ``rcpt``, ``data`` or ``data_post``), never clear it.
    :ivar rcpt_params: Each accepted recipient's DSN parameters (``NOTIFY``, ``ORCPT``),
        by address; :meth:`add_recipient` keeps them.
    :ivar notes: Free for plugins.
    """

    id: str
    sender: Address
    mail_params: dict[str, str | bool]
    recipients: list[Address] = field(default_factory=list)
    message: bytes | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    requiretls: bool = False
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requiretls = self.requiretls or self.mail_params.get("REQUIRETLS") is True

    def add_recipient(self, recipient: Address, params: dict[str, str | bool] | None = None
                      ) -> None:
        """Accept ``recipient``, with its ``NOTIFY`` and ``ORCPT`` if it gave them."""
        self.recipients.append(recipient)
        kept = {k: v.upper() if k == "NOTIFY" else v for k, v in (params or {}).items()
                if k in ("NOTIFY", "ORCPT") and isinstance(v, str)}
        if kept:
            self.rcpt_params[recipient.address] = kept

    @property
    def ret(self) -> str:
        """``RET`` of ``MAIL FROM`` (``FULL``, ``HDRS``), upper-case; empty for none."""
        return str(self.mail_params.get("RET", "")).upper()

    @property
    def envid(self) -> str:
        return str(self.mail_params.get("ENVID", ""))

    @property
    def smtputf8(self) -> bool:
        return bool(self.mail_params.get("SMTPUTF8"))

    @property
    def body_8bit(self) -> bool:
        return str(self.mail_params.get("BODY", "7BIT")).upper() == "8BITMIME"


@dataclass(slots=True, eq=False)
class Connection:
    """One client connection.

    :ivar remote_ip: The client's address; ``remote_port`` its port.
    :ivar local_ip: The address the client connected to; ``local_port`` its port.
    :ivar helo: The HELO/EHLO argument, once given; ``esmtp`` is true after EHLO.
    :ivar tls: The TLS session once STARTTLS (or an implicit-TLS listener) set one up.
    :ivar auth_user: The authenticated user, after a successful AUTH.
    :ivar relaying: Whether this client may relay (set by plugins, e.g. ``relay``).
    :ivar transaction: The transaction in progress, if any.
    :ivar notes: Free for plugins; lives as long as the connection.
    """

    id: str
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int
    started: float = field(default_factory=time.time)
    helo: str | None = None
    esmtp: bool = False
    tls: TlsInfo | None = None
    auth_user: str | None = None
    relaying: bool = False
    transaction: Transaction | None = None
    transaction_count: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def start_transaction(self, sender: Address, params: dict[str, str | bool]) -> Transaction:
        self.transaction_count += 1
        self.transaction = Transaction(f"{self.id}.{self.transaction_count}", sender, params)
        return self.transaction
