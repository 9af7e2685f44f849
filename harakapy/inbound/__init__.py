"""The inbound SMTP server: what plugins see (Connection, Transaction, Address) and the
aiosmtpd bridge that drives the hooks."""

from harakapy.inbound.address import Address
from harakapy.inbound.connection import Connection, TlsInfo, Transaction

__all__ = ["Address", "Connection", "TlsInfo", "Transaction"]
