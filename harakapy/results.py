"""What a decision hook answers, and how an answer becomes an SMTP reply.

This module knows SMTP reply codes and RFC 3463 enhanced status codes. It does not
know which hook is running or what the server does after replying: the inbound
protocol decides that, using the defaults each hook passes to :func:`reply_for`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# What a client hears when a plugin failed: nothing of our plugins (the log has them).
PLUGIN_FAILED = "temporary local problem, please try again later"


class Action(enum.Enum):
    """How a decision hook's answer stops the chain (Haraka's return codes)."""

    OK = "ok"
    DENY = "deny"
    DENYSOFT = "denysoft"
    DENYDISCONNECT = "denydisconnect"


@dataclass(frozen=True, slots=True)
class Result:
    """A plugin's decision.

    :param action: What the server does.
    :param message: Text for the SMTP reply; the hook's default text when ``None``.
    :param code: The 3-digit reply code; the action's default for the hook when ``None``.
    :param enhanced: RFC 3463 status code such as ``"5.7.1"``; derived when ``None``.
    """

    action: Action
    message: str | None = None
    code: int | None = None
    enhanced: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.action is Action.OK

    @property
    def disconnects(self) -> bool:
        return self.action is Action.DENYDISCONNECT


def ok(message: str | None = None, *, code: int | None = None,
       enhanced: str | None = None) -> Result:
    """Accept: stop the chain and let the command succeed."""
    return Result(Action.OK, message, code, enhanced)


def deny(message: str | None = None, *, code: int | None = None,
         enhanced: str | None = None) -> Result:
    """Refuse permanently (5xx)."""
    return Result(Action.DENY, message, code, enhanced)


def denysoft(message: str | None = None, *, code: int | None = None,
             enhanced: str | None = None) -> Result:
    """Refuse temporarily (4xx): the client retries later."""
    return Result(Action.DENYSOFT, message, code, enhanced)


def denydisconnect(message: str | None = None, *, code: int | None = None,
                   enhanced: str | None = None) -> Result:
    """Refuse permanently (5xx) and close the connection."""
    return Result(Action.DENYDISCONNECT, message, code, enhanced)


_DEFAULT_CODE = {
    Action.OK: 250,
    Action.DENY: 550,
    Action.DENYSOFT: 451,
    Action.DENYDISCONNECT: 554,
}

# RFC 3463 / RFC 5248 defaults for replies that carry no enhanced code of their own.
_DEFAULT_ENHANCED = {
    221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 251: "2.1.5", 252: "2.5.0",
    421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0", 455: "4.5.4",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 538: "5.7.11", 550: "5.7.1",
    551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.7.1", 555: "5.5.4",
}

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY = re.compile(r"^([2-5]\d\d)([ -])(.*)$", re.DOTALL)


def default_enhanced(code: int) -> str:
    """The enhanced status code to use with a bare reply ``code``."""
    return _DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")


def format_reply(code: int, message: str, enhanced: str | None = None) -> str:
    """One SMTP reply line (or lines, for a message with newlines), CRLF not included.

    :param code: The 3-digit reply code.
    :param message: Human-readable text; each line of it becomes one reply line.
    :param enhanced: RFC 3463 code; ``default_enhanced(code)`` when ``None``.
    """
    if enhanced is None or not _ENHANCED.match(enhanced):
        enhanced = default_enhanced(code)
    if enhanced[0] != str(code)[0]:  # a 5.x.x code with a 4xx reply misleads clients
        enhanced = str(code)[0] + enhanced[1:]
    lines = [line.strip() for line in message.splitlines()] or [""]
    out = [f"{code}-{enhanced} {line}" for line in lines[:-1]]
    out.append(f"{code} {enhanced} {lines[-1]}")
    return "\r\n".join(out)


def add_enhanced(reply: str) -> str:
    """Give a single-line reply written without an enhanced code the default one.

    aiosmtpd writes some replies itself (``500 Command line too long``); RFC 2034
    asks that every reply but the greeting and the EHLO answer carry one once
    ENHANCEDSTATUSCODES is advertised.
    """
    match = _REPLY.match(reply)
    if match is None or match.group(2) != " ":
        return reply
    code, text = int(match.group(1)), match.group(3)
    head = text.split(" ", 1)[0]
    if _ENHANCED.match(head) or code in (220, 334, 354):
        return reply
    if text.startswith("Error: "):  # aiosmtpd's prefix says nothing a client can use
        text = text[len("Error: "):]
    return f"{code} {default_enhanced(code)} {text}"


def reply_for(result: Result, *, default_message: str,
              default_enhanced: str | None = None) -> str:
    """The SMTP reply for a decision, using the hook's defaults where the plugin gave none."""
    code = result.code or _DEFAULT_CODE[result.action]
    return format_reply(code, result.message or default_message,
                        result.enhanced or default_enhanced)
