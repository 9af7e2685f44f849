"""The outbound TLS policy model: what a destination demands of a connection.

A :class:`Policy` is a value: a level with Postfix's names and meanings, the attributes
that refine it, and where it came from for RFC 8460 reports. Plugins build policies and
answer the ``tls_policy`` hook with them; ``harakapy.outbound.negotiate`` enforces them.
Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from harakapy.tls.results import Failure


class Level(enum.StrEnum):
    """Postfix's ``smtp_tls_security_level`` values, with Postfix's meanings."""

    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, nothing verified, plaintext when it fails
    ENCRYPT = "encrypt"  # TLS required, nothing verified
    DANE = "dane"  # DANE when the MX has usable TLSA records, else as "may"
    DANE_ONLY = "dane-only"  # DANE required
    FINGERPRINT = "fingerprint"  # the certificate or its public key matches a pin
    VERIFY = "verify"  # trusted chain, name matches the MX host name
    SECURE = "secure"  # trusted chain, name matches the next-hop domain (not the MX)

    @property
    def requires_tls(self) -> bool:
        """TLS is mandatory whatever the MX has (``dane`` decides per MX)."""
        return self not in (Level.NONE, Level.MAY, Level.DANE)

    @property
    def verifies_chain(self) -> bool:
        """The chain must lead to a trusted CA."""
        return self in (Level.VERIFY, Level.SECURE)


# Postfix's default ``match=`` for the name-checking levels.
DEFAULT_MATCH = {Level.VERIFY: ("hostname",), Level.SECURE: ("nexthop", "dot-nexthop")}

NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Where a policy came from, in RFC 8460's terms (section 4.4).

    :param type: ``sts``, ``tlsa`` or ``no-policy-found`` (a local table, a pin or the
        default: RFC 8460 has no type for those).
    :param domain: The policy domain; empty means the destination domain.
    :param strings: ``policy-string`` entries (the MTA-STS policy lines, TLSA records).
    :param mx_patterns: ``mx-host`` entries (MTA-STS ``mx`` patterns).
    """

    type: str = NO_POLICY_FOUND
    domain: str = ""
    strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()


_HEX = re.compile(r"^[0-9a-f]+$")
_DIGEST_SIZES = {64: "sha256", 128: "sha512"}


@dataclass(frozen=True, slots=True)
class Pin:
    """A certificate or public-key digest to accept (level ``fingerprint``, ``tls_pin``).

    A pin matches the DER certificate or its SubjectPublicKeyInfo, whichever it is of: as
    Postfix does, both are tried, so an operator need not say which it is.
    """

    algorithm: str  # "sha256" or "sha512"
    digest: str  # lower-case hex, no colons

    @classmethod
    def parse(cls, text: str) -> Pin:
        """``sha256:AB:CD...``, ``sha512:abcd...`` or bare hex (its length says which).

        :raises ValueError: with a sentence saying what is wrong.
        """
        algorithm, sep, value = text.strip().partition(":")
        if not sep or algorithm.lower() not in ("sha256", "sha512"):
            algorithm, value = "", text.strip()
        digest = value.replace(":", "").lower()
        if not digest or not _HEX.match(digest):
            raise ValueError(f"{text!r} is not a hex digest")
        expected = _DIGEST_SIZES.get(len(digest))
        if expected is None:
            raise ValueError(f"{text!r} has {len(digest)} hex digits; a SHA-256 digest has "
                             f"64 and a SHA-512 digest 128")
        if algorithm and algorithm.lower() != expected:
            raise ValueError(f"{text!r}: {len(digest)} hex digits is not a {algorithm} digest")
        return cls(expected, digest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest}"


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698): usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:  # RFC 8460 4.5 policy-string form
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex().upper()}"


@dataclass(frozen=True, slots=True)
class TlsaLookup:
    """The TLSA records for one MX, as the DANE authority found them.

    :param records: The usable records; empty when the MX has none (or none secure).
        With ``unusable`` set, the records found, none of them usable (for reports).
    :param base_domain: The TLSA base domain (the MX host, CNAME-expanded): the SNI name
        and the RFC 8460 policy domain.
    :param failure: The lookup itself failed (bogus DNSSEC): that MX cannot be used now,
        at ``dane`` as at ``dane-only``.
    :param unusable: Secure TLSA records exist but none is usable (unknown usage or
        algorithm): RFC 7672 2.2 still demands TLS, without authentication.
    """

    records: tuple[TlsaRecord, ...] = ()
    base_domain: str = ""
    failure: Failure | None = None
    unusable: bool = False


class DaneAuthority(Protocol):
    """What the ``dane`` plugin supplies in :attr:`Policy.dane`.

    The engine asks :meth:`lookup` for each MX at levels ``dane`` and ``dane-only``; when
    there are usable records it requires TLS, makes the handshake without chain checks, and
    asks :meth:`verify` about the chain the server presented before sending any command.
    """

    async def lookup(self, hostname: str, port: int) -> TlsaLookup:
        """The TLSA records of ``_<port>._tcp.<hostname>`` (CNAME-expanded, DNSSEC-secure
        only)."""
        ...

    def verify(self, lookup: TlsaLookup, chain: Sequence[bytes], hostname: str,
               nexthop: str) -> Failure | None:
        """``None`` when ``chain`` (DER, leaf first) satisfies ``lookup``'s records for the
        MX ``hostname``; else why not."""
        ...


@dataclass(frozen=True, slots=True)
class Policy:
    """What a destination demands of the connection that carries its mail.

    :param level: One of :class:`Level`.
    :param match: Names the certificate must match at ``verify``/``secure``, in Postfix's
        ``match=`` terms: ``hostname`` (the MX host), ``nexthop`` (the destination),
        ``dot-nexthop`` (its subdomains), a name, or ``.name`` for its subdomains. Empty
        means Postfix's default for the level.
    :param pins: Digests for ``fingerprint`` (any one matching is enough).
    :param min_protocol: Lowest TLS version; ``None`` means ``[outbound] min_version``
        at the levels that require TLS, and anything at ``may``.
    :param max_protocol: Highest TLS version, ``None`` for no limit.
    :param ciphers: OpenSSL cipher list for TLS 1.2 and below; empty for the default.
    :param mx_patterns: When set, only MX hosts matching one of these (MTA-STS syntax:
        ``mx.example.com`` or ``*.example.com``) may be used.
    :param enforce: False to check and report only (MTA-STS ``testing``, a pin in
        ``report`` mode): failures reach ``tls_result`` and mail goes on as at ``may``.
    :param dane: The DANE authority, at ``dane`` and ``dane-only``.
    :param servername: SNI to send; empty means the MX host name.
    :param required_extensions: EHLO keywords the server must list after STARTTLS, or it
        fails the policy like a bad certificate (``REQUIRETLS``, RFC 8689).
    :param mail_parameters: Parameters to send on ``MAIL FROM`` under this policy
        (``REQUIRETLS``).
    :param source: For RFC 8460 reports.
    :param fallback: At ``dane``: the policy for an MX without usable TLSA records (what
        the plugins after ``dane`` decided: MTA-STS, the default); ``None`` for ``may``.
    :param discovery_failure: Finding the policy went wrong (an MTA-STS policy host that
        failed): each session under this policy reports it, as a failure that did not
        stop the mail, unless the session has a failure of its own.
    :param requiretls: The engine's mark on the policy of a message sent with REQUIRETLS
        (``harakapy.outbound.requiretls``): its failures carry 5.7.30 and 4.7.10.
    :param waived: Why this policy only reports for this message (``TLS-Required: No``);
        the engine logs each failure it let through.
    :param reason: Why this policy: a file and line, a DNS record. Shown by
        ``harakapy tls-policy``.
    :param decided_by: The plugin that answered ``tls_policy``; the engine fills it in.
    """

    level: Level
    match: tuple[str, ...] = ()
    pins: tuple[Pin, ...] = ()
    min_protocol: ssl.TLSVersion | None = None
    max_protocol: ssl.TLSVersion | None = None
    ciphers: str = ""
    mx_patterns: tuple[str, ...] = ()
    enforce: bool = True
    dane: DaneAuthority | None = field(default=None, compare=False)
    servername: str = ""
    required_extensions: tuple[str, ...] = ()
    mail_parameters: tuple[str, ...] = ()
    source: PolicySource = PolicySource()
    fallback: Policy | None = field(default=None, compare=False)
    discovery_failure: Failure | None = field(default=None, compare=False)
    requiretls: bool = False
    waived: str = field(default="", compare=False)
    reason: str = field(default="", compare=False)
    decided_by: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", Level(self.level))
        if self.level is Level.FINGERPRINT and not self.pins:
            raise ValueError("level fingerprint needs at least one pin")

    @property
    def match_names(self) -> tuple[str, ...]:
        """``match``, or Postfix's default for the level."""
        return self.match or DEFAULT_MATCH.get(self.level, ())

    def session_key(self, nexthop: str) -> tuple:
        """What a pooled session must have been opened under to serve this policy."""
        uses_nexthop = any(m in ("nexthop", "dot-nexthop") for m in self.match_names)
        return (self.level.value, self.match_names, self.pins, self.min_protocol,
                self.max_protocol, self.ciphers, self.mx_patterns, self.enforce,
                id(self.dane), self.servername, self.required_extensions,
                nexthop if uses_nexthop else "")

    def with_decider(self, plugin: str) -> Policy:
        return replace(self, decided_by=plugin)

    def describe(self) -> str:
        """The policy in ``smtp_tls_policy_maps`` terms, e.g. ``secure match=nexthop``."""
        parts = [self.level.value]
        if self.level is Level.FINGERPRINT:
            parts.append("match=" + "|".join(str(p) for p in self.pins))
        elif self.match:
            parts.append("match=" + ":".join(self.match))
        if self.min_protocol or self.max_protocol:
            parts.append("protocols=" + format_protocols(self.min_protocol,
                                                         self.max_protocol))
        if self.ciphers:
            parts.append(f"ciphers={self.ciphers}")
        if self.servername:
            parts.append(f"servername={self.servername}")
        if self.mx_patterns:
            parts.append("mx=" + ",".join(self.mx_patterns))
        if not self.enforce:
            parts.append("(report only)")
        if self.fallback is not None:
            parts.append(f"(without TLSA records: {self.fallback.describe()})")
        return " ".join(parts)


_VERSIONS = {
    "sslv3": ssl.TLSVersion.SSLv3,
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_ORDER = list(_VERSIONS.values())


def format_protocols(low: ssl.TLSVersion | None, high: ssl.TLSVersion | None) -> str:
    names = {v: k.replace("tls", "TLS").replace("ssl", "SSL") for k, v in _VERSIONS.items()}
    bounds = []
    if low:
        bounds.append(f">={names[low]}")
    if high:
        bounds.append(f"<={names[high]}")
    return ":".join(bounds)


def parse_protocols(text: str) -> tuple[ssl.TLSVersion | None, ssl.TLSVersion | None]:
    """Postfix's ``protocols=`` (and ``smtp_tls_mandatory_protocols``) syntax as bounds.

    Both forms: ``>=TLSv1.2``, ``<=TLSv1.3`` (Postfix 3.6), and the older exclusion list
    ``!SSLv2:!SSLv3:!TLSv1``, separated by colons, commas or spaces. ``SSLv2`` is accepted:
    OpenSSL no longer has it, so ``!SSLv2`` and ``>=SSLv2`` change nothing, while ``SSLv2``
    alone or ``<=SSLv2`` leave nothing. Bounds cannot express a gap (``!TLSv1.1`` with
    TLS 1.0 and 1.2 allowed): the highest contiguous run of versions is kept, so that an
    excluded version is never allowed.

    :returns: ``(lowest, highest)``; ``None`` for an open end.
    :raises ValueError: for a name we do not know, or bounds that leave nothing.
    """
    low: ssl.TLSVersion | None = None
    high: ssl.TLSVersion | None = None
    excluded: set[ssl.TLSVersion] = set()
    included: set[ssl.TLSVersion] = set()
    inclusion_list = False  # a bare name was given: only the names given are allowed
    for token in re.split(r"[\s,:]+", text.strip()):
        if not token:
            continue
        op = ""
        for prefix in (">=", "<=", "!"):
            if token.startswith(prefix):
                op, token = prefix, token[len(prefix):]
                break
        name = token.lower()
        if name == "sslv2":
            if op == "<=":  # nothing OpenSSL still has is at or below SSLv2
                raise ValueError(f"protocols {text!r} leave no protocol to use")
            inclusion_list = inclusion_list or not op
            continue
        if name not in _VERSIONS:
            raise ValueError(f"unknown protocol {token!r} (known: SSLv3, TLSv1, TLSv1.1, "
                             f"TLSv1.2, TLSv1.3)")
        version = _VERSIONS[name]
        if op == ">=":
            low = version
        elif op == "<=":
            high = version
        elif op == "!":
            excluded.add(version)
        else:
            included.add(version)
            inclusion_list = True
    allowed = [v for v in _ORDER
               if v not in excluded and (not inclusion_list or v in included)
               and (low is None or _ORDER.index(v) >= _ORDER.index(low))
               and (high is None or _ORDER.index(v) <= _ORDER.index(high))]
    if not allowed:
        raise ValueError(f"protocols {text!r} leave no protocol to use")
    # A minimum and a maximum cannot leave out a version between them: keep the highest
    # contiguous run rather than let an excluded version back in.
    while _ORDER.index(allowed[-1]) - _ORDER.index(allowed[0]) >= len(allowed):
        allowed.pop(0)
    low_out = allowed[0] if allowed[0] != _ORDER[0] or low or excluded or included else None
    high_out = allowed[-1] if allowed[-1] != _ORDER[-1] else None
    return low_out, high_out


# Postfix's cipher grades (tls_high_cipherlist & co.), in OpenSSL terms.
CIPHER_GRADES = {
    "high": "HIGH:!aNULL:!eNULL",
    "medium": "HIGH:MEDIUM:!aNULL:!eNULL",
    "low": "ALL:!aNULL:!eNULL:@SECLEVEL=0",
    "export": "ALL:!aNULL:!eNULL:@SECLEVEL=0",
    "null": "eNULL:!aNULL:@SECLEVEL=0",
}


def cipher_list(grade_or_list: str, exclude: Sequence[str] = ()) -> str:
    """Postfix ``ciphers=`` (a grade) or an OpenSSL list, minus ``exclude=`` entries.

    :raises ValueError: when OpenSSL selects no cipher from the result.
    """
    base = CIPHER_GRADES.get(grade_or_list.lower(), grade_or_list) if grade_or_list \
        else "DEFAULT"
    result = base + "".join(f":!{name}" for name in exclude)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(result)
    except ssl.SSLError:
        raise ValueError(f"OpenSSL selects no cipher from {result!r}") from None
    return result
