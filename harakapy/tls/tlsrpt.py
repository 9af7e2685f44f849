"""The ``_smtp._tls`` TXT record (RFC 8460 section 3), parsed strictly.

Rules:

1. Of the TXT records at ``_smtp._tls.<domain>``, those whose first field is not
   ``v=TLSRPTv1`` are someone else's; exactly one must remain, or the domain does not
   ask for reports.
2. The record is ``v=TLSRPTv1`` then fields separated by ``;`` (spaces around allowed,
   one trailing ``;`` too); ``rua`` is required, other fields must be well-formed
   extensions and are ignored. A duplicated ``rua``: the first counts.
3. ``rua`` is a comma-separated list of URIs (``,`` inside a URI must be percent-encoded,
   so it always separates). ``mailto:`` and ``https:`` URIs are kept, in order; other
   schemes are skipped; none left means nothing can be sent.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

VERSION = "v=TLSRPTv1"
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_URI_SPLIT = re.compile(r"[ \t]*,[ \t]*")
_MAILBOX = re.compile(r"^[^@\s]+@[A-Za-z0-9.\-]+$")


class TlsrptError(ValueError):
    """The domain's record is missing or broken; the reason says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rua:
    """One report destination: ``mailto`` with its address, or ``https`` with its URL."""

    scheme: str
    target: str  # the address (mailto) or the whole URL (https)

    def __str__(self) -> str:
        return f"mailto:{self.target}" if self.scheme == "mailto" else self.target


@dataclass(frozen=True, slots=True)
class TlsrptRecord:
    """A valid record: where reports go (possibly nowhere we can send to), and its text."""

    rua: tuple[Rua, ...]
    skipped: tuple[str, ...]  # URIs of schemes we do not send to
    text: str


def _rua(uri: str) -> Rua | None:
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.lower()
    if not colon:
        raise TlsrptError(f"rua {uri[:60]!r} is not a URI")
    if scheme == "mailto":
        address = urllib.parse.unquote(rest.split("?", 1)[0])
        if not _MAILBOX.match(address):
            raise TlsrptError(f"rua {uri[:60]!r} is not a mailto: address")
        return Rua("mailto", address)
    if scheme == "https":
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname:
            raise TlsrptError(f"rua {uri[:60]!r} has no host")
        return Rua("https", uri)
    return None


def parse_record(text: str) -> TlsrptRecord:
    """One TXT record's text (strings joined without separators).

    :raises TlsrptError: not a valid TLSRPT record (rule 2).
    """
    fields = _FIELD_DELIM.split(text.strip(" \t"))
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != VERSION:
        raise TlsrptError("the record does not begin with v=TLSRPTv1")
    rua_text: str | None = None
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if name == "rua" and equals:
            if rua_text is None:
                rua_text = value
            continue
        if not equals or not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            raise TlsrptError(f"malformed field {field[:40]!r}")
    if rua_text is None or not rua_text.strip():
        raise TlsrptError("the record has no rua")
    kept, skipped = [], []
    for uri in _URI_SPLIT.split(rua_text.strip(" \t")):
        if not uri:
            raise TlsrptError("an empty URI in rua")
        found = _rua(uri)
        if found is None:
            skipped.append(uri)
        else:
            kept.append(found)
    return TlsrptRecord(tuple(kept), tuple(skipped), text)


def select_record(texts: list[str]) -> TlsrptRecord:
    """The domain's record among the TXT records at ``_smtp._tls.<domain>`` (rule 1).

    :raises TlsrptError: none, several, or an invalid one.
    """
    candidates = [t for t in texts if _FIELD_DELIM.split(t.strip(" \t"), 1)[0] == VERSION]
    if not candidates:
        raise TlsrptError("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        raise TlsrptError(f"{len(candidates)} v=TLSRPTv1 records (exactly one is allowed)")
    return parse_record(candidates[0])
