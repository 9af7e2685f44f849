"""The DSN extension's parameters (RFC 3461): what a sender asks to hear about its mail.

``MAIL FROM`` may carry ``RET=FULL|HDRS`` (how much of the message a notice returns) and
``ENVID=`` (an id the sender's notices quote); each ``RCPT TO`` ``NOTIFY=`` (``NEVER``, or
any of ``SUCCESS``, ``FAILURE``, ``DELAY``) and ``ORCPT=`` (the address as the sender first
had it). They are checked here, kept with the message in the spool, honoured in our own
notices and passed on to servers that offer DSN. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUCCESS, FAILURE, DELAY, NEVER = "SUCCESS", "FAILURE", "DELAY", "NEVER"
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2

# RFC 3461 4: xtext is printable ASCII but "+" and "=", which are written "+XX" (hex).
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")


def is_xtext(text: str) -> bool:
    return bool(text) and bool(_XTEXT.match(text))


def xtext_decode(text: str) -> str:
    """``+XX`` escapes back to their characters."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    return "".join(c if 0x21 <= ord(c) <= 0x7e and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode()) for c in text)


def check_mail_param(name: str, value: str | bool) -> str | None:
    """``None`` when ``RET`` or ``ENVID`` is well formed, else the reply that refuses it."""
    if name == "RET":
        if not isinstance(value, str) or value.upper() not in ("FULL", "HDRS"):
            return "501 5.5.4 RET must be FULL or HDRS"
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ENVID \
            or not _XTEXT.match(value):
        return f"501 5.5.4 ENVID must be xtext of 1 to {MAX_ENVID} characters"
    return None


def check_rcpt_param(name: str, value: str | bool) -> str | None:
    """``None`` when ``NOTIFY`` or ``ORCPT`` is well formed, else the reply."""
    if name == "NOTIFY":
        words = value.upper().split(",") if isinstance(value, str) else []
        if words == [NEVER] or (words and len(set(words)) == len(words)
                                and set(words) <= {SUCCESS, FAILURE, DELAY}):
            return None
        return "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY"
    kind, sep, address = value.partition(";") if isinstance(value, str) else ("", "", "")
    if not sep or not _ADDR_TYPE.match(kind) or not address or len(value) > MAX_ORCPT \
            or not _XTEXT.match(address):
        return "501 5.5.4 ORCPT must be address-type;xtext (rfc822;user@example.com)"
    return None


def wants(notify: str, event: str) -> bool:
    """Whether a recipient's ``NOTIFY`` asks for a notice on ``event``; without NOTIFY,
    failures and delays are told and successes are not (RFC 3461 4.1)."""
    if not notify:
        return event != SUCCESS
    return event in notify.upper().split(",")


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """The DSN parameters of one delivery attempt's recipients, to pass on.

    :ivar ret: ``FULL``, ``HDRS`` or empty; ``envid`` as the sender gave it (xtext).
    :ivar notify: Each recipient's ``NOTIFY`` (empty for none), in the attempt's order.
    :ivar orcpt: Each recipient's ``ORCPT`` (``rfc822;xtext``, empty for none).
    """

    ret: str = ""
    envid: str = ""
    notify: tuple[str, ...] = ()
    orcpt: tuple[str, ...] = ()

    def mail_params(self) -> list[str]:
        params = [f"RET={self.ret}"] if self.ret else []
        return params + ([f"ENVID={self.envid}"] if self.envid else [])

    def rcpt_params(self, index: int) -> list[str]:
        params = []
        if index < len(self.notify) and self.notify[index]:
            params.append(f"NOTIFY={self.notify[index]}")
        if index < len(self.orcpt) and self.orcpt[index]:
            params.append(f"ORCPT={self.orcpt[index]}")
        return params
