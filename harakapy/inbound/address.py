"""SMTP paths (RFC 5321 section 4.1.2): parsing ``<local@domain>`` and its parameters.

Pure functions, no I/O. A path that does not parse is the client's error, reported with
the reason so the reply can say what was wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class AddressError(ValueError):
    """The client sent a path or parameter we cannot parse; the text says why."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from ``MAIL FROM`` or ``RCPT TO``.

    ``local`` keeps the client's spelling (local parts may be case-sensitive); ``domain`` is
    lower-case. The null reverse path ``<>`` has both empty.
    """

    local: str
    domain: str
    # The path began with a source route (<@a,@b:u@d>); not part of the address.
    source_routed: bool = field(default=False, compare=False)

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def address(self) -> str:
        return "" if self.is_null else f"{self.local}@{self.domain}"

    def __str__(self) -> str:
        return f"<{self.address}>"


NULL = Address("", "")

# RFC 5321 4.1.2 with RFC 6531's UTF-8 allowed where SMTPUTF8 is on (checked separately).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LET_DIG = r"[A-Za-z0-9\u0080-\U0010ffff]"
_LABEL = rf"{_LET_DIG}(?:[A-Za-z0-9\-\u0080-\U0010ffff]*{_LET_DIG})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = re.compile(rf"^(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
_PARAM_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+$")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3


def parse_path(text: str, *, allow_null: bool, smtputf8: bool) -> tuple[Address, str]:
    """Parse ``<path>`` at the start of ``text``; return it and the rest (the parameters).

    :param text: What follows ``FROM:`` or ``TO:``.
    :param allow_null: Whether ``<>`` is allowed (the reverse path only).
    :param smtputf8: Whether non-ASCII is allowed (the client sent ``SMTPUTF8``).
    :raises AddressError: naming what is wrong.
    """
    text = text.strip()
    if not text.startswith("<"):
        raise AddressError("address must be enclosed in <>")
    end = text.find(">")
    if end < 0:
        raise AddressError("address must be enclosed in <>")
    path, rest = text[1:end], text[end + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("expected a space between address and parameters")
    if len(path) > MAX_PATH:
        raise AddressError("address too long")
    if not path:
        if allow_null:
            return NULL, rest.strip()
        raise AddressError("empty address")
    ascii_only = path.isascii()
    if not smtputf8 and not ascii_only:
        raise AddressError("non-ASCII address needs SMTPUTF8")
    if not ascii_only and any(0xD800 <= ord(c) <= 0xDFFF for c in path):
        # aiosmtpd keeps undecodable bytes as lone surrogates: not UTF-8, not an address.
        raise AddressError("address is not valid UTF-8")
    routed = path[:1] == "@"
    if routed:
        path = _ROUTE.sub("", path, count=1)  # RFC 5321 4.1.2: source routes are ignored
    if path.endswith(".") and not path.endswith("]."):
        path = path[:-1]  # a fully qualified "example.com." is example.com
    match = _MAILBOX.match(path)
    if match is None:
        raise AddressError(f"malformed address <{path}>")
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("domain too long")
    return Address(local, domain.lower(), routed), rest.strip()


def routes_through(address: Address) -> bool:
    """Whether the sender asks for routing beyond this address (RFC 5321 3.6.1 calls it
    deprecated): a source route, or a local part that names another host with ``%``,
    ``!`` or a quoted ``@``, which a mail store behind us might still honour."""
    local = address.local[1:-1] if address.local.startswith('"') else address.local
    return address.source_routed or any(c in local for c in "%!@")


def parse_params(text: str) -> dict[str, str | bool]:
    """ESMTP parameters (``SIZE=123 BODY=8BITMIME SMTPUTF8``), names upper-cased.

    :raises AddressError: for a malformed or repeated parameter.
    """
    params: dict[str, str | bool] = {}
    for word in text.split():
        name, eq, value = word.partition("=")
        if not _PARAM.match(name) or (eq and not _PARAM_VALUE.match(value)):
            raise AddressError(f"malformed parameter {word!r}")
        key = name.upper()
        if key in params:
            raise AddressError(f"parameter {key} given twice")
        params[key] = value if eq else True
    return params
