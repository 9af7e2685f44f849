"""MTA-STS (RFC 8461) as text: the ``_mta-sts`` TXT record and the policy file, parsed
strictly, and a parsed policy as the engine's :class:`~harakapy.tls.policy.Policy`.

Pure functions, no I/O: the plugin fetches, caches and schedules; this module only says
what a record or a policy file means, or precisely why it means nothing. Strict where
the RFC's grammar is (case-sensitive keys and values, no whitespace before ``:``, no
blank lines), lenient only where the RFC asks (unknown keys ignored, the first of a
duplicated field wins, LF or CRLF line ends: erratum 6253).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from harakapy.tls.policy import Level, Policy, PolicySource

STS = "sts"
MAX_MAX_AGE = 31_557_600  # RFC 8461 3.2: about one year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: the suggested cap on a policy body

# RFC 8461 3.1, ABNF (RFC 7405: %s is case-sensitive).
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")

# RFC 8461 3.2.
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class StsError(ValueError):
    """A record or a policy that means no policy, with why (for the log and the report).

    :ivar reason: Short text naming the defect.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoRecord(StsError):
    """The domain has no STS record: it does not use MTA-STS (not a fault)."""


class Mode(enum.StrEnum):
    """The ``mode`` of a policy, with its wire spelling."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A valid ``_mta-sts`` TXT record: the policy's ``id`` (compared byte for byte)."""

    id: str


def parse_record(text: str) -> StsRecord:
    """One TXT record's text (its strings already joined without separators).

    :raises StsError: not a valid STS record (the RFC 8461 3.1 grammar).
    """
    fields = _FIELD_DELIM.split(text)
    if fields and fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    if not fields or fields[0] != "v=STSv1":
        raise StsError("the record does not begin with v=STSv1")
    record_id = None
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals or not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            raise StsError(f"malformed field {field[:40]!r}")
        if name == "id":
            if not _ID.fullmatch(value):
                raise StsError(f"id {value[:40]!r} is not 1 to 32 letters and digits")
            if record_id is None:  # RFC 8461 3.2: the first of a duplicated field wins
                record_id = value
    if record_id is None:
        raise StsError("the record has no id")
    return StsRecord(record_id)


def select_record(texts: list[str]) -> StsRecord:
    """The domain's STS record among all TXT records at ``_mta-sts.<domain>``.

    RFC 8461 3.1: records whose first field is not ``v=STSv1`` are someone else's (SPF,
    ``v=STSv10``); exactly one must remain, and it must be valid. The first field is
    compared rather than the prefix ``v=STSv1;``, so that ``v=STSv1 ; id=x`` (valid
    ABNF, erratum 6285) still counts.

    :raises StsError: none, several, or one that is invalid: no policy is available.
    """
    candidates = [text for text in texts if _FIELD_DELIM.split(text, 1)[0] == "v=STSv1"]
    if not candidates:
        raise NoRecord("no v=STSv1 record")
    if len(candidates) > 1:
        raise StsError(f"{len(candidates)} v=STSv1 records (exactly one is allowed)")
    return parse_record(candidates[0])


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A valid policy file.

    :ivar lines: The policy's lines as received, for RFC 8460's ``policy-string``.
    """

    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    lines: tuple[str, ...]

    def policy(self, domain: str, *, enforce: bool | None = None) -> Policy | None:
        """The engine's policy for mail to ``domain`` (``None`` for ``mode: none``).

        :param enforce: Override the mode (``True``: treat ``testing`` as ``enforce``).
        """
        if self.mode is Mode.NONE:
            return None
        enforcing = self.mode is Mode.ENFORCE if enforce is None else enforce
        how = self.mode.value
        if enforcing != (self.mode is Mode.ENFORCE):
            how += ", applied as enforce" if enforcing else ", applied as testing"
        # RFC 8461 4.2: a PKIX chain, and the MX host's own name in the certificate.
        return Policy(
            Level.VERIFY, match=("hostname",), mx_patterns=self.mx, enforce=enforcing,
            source=PolicySource(STS, domain, self.lines, self.mx),
            reason=f"MTA-STS policy of {domain} (mode {how}, max_age {self.max_age})")


def check_mx_pattern(pattern: str) -> str:
    """An ``mx`` value: a domain in A-labels, or ``*.`` and one; lower-cased."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise StsError(f"mx {pattern[:80]!r} is not a host name or *.host name in A-labels")
    if all(label.isdigit() for label in labels):
        raise StsError(f"mx {pattern[:80]!r} is an IP address, not a host name")
    return pattern.lower()


def parse_policy(body: bytes) -> StsPolicy:
    """A policy file (RFC 8461 3.2), as fetched.

    :raises StsError: over :data:`MAX_POLICY_BYTES`, not UTF-8, or not the grammar.
    """
    if len(body) > MAX_POLICY_BYTES:
        raise StsError(f"the policy is over {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("the policy is not UTF-8") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    lines = text.replace("\r\n", "\n").split("\n")
    found: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(lines, 1):
        if "\r" in line:
            raise StsError(f"line {number}: a CR that does not end a line")
        key, colon, rest = line.partition(":")
        if not colon or not _POLICY_KEY.fullmatch(key):
            raise StsError(f"line {number}: not key: value ({line[:60]!r})")
        value = rest.lstrip(" \t").rstrip(" \t")
        if not value or any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
            raise StsError(f"line {number}: {key} has an empty or unprintable value")
        if key == "mx":
            mx.append(check_mx_pattern(value))
        elif key in ("version", "mode", "max_age"):
            found.setdefault(key, value)  # RFC 8461 3.2: the first wins
    missing = [key for key in ("version", "mode", "max_age") if key not in found]
    if missing:
        raise StsError(f"no {', '.join(missing)} in the policy")
    if found["version"] != "STSv1":
        raise StsError(f"version {found['version'][:20]!r} is not STSv1")
    try:
        mode = Mode(found["mode"])
    except ValueError:
        raise StsError(f"mode {found['mode'][:20]!r} is not enforce, testing or none") from None
    if not _MAX_AGE.fullmatch(found["max_age"]) or int(found["max_age"]) > MAX_MAX_AGE:
        raise StsError(f"max_age {found['max_age'][:20]!r} is not 0 to {MAX_MAX_AGE} seconds")
    if not mx and mode is not Mode.NONE:
        raise StsError(f"mode {mode.value} without any mx")
    return StsPolicy(mode, int(found["max_age"]), tuple(mx), tuple(lines))
