"""Checks on a server's certificate after the handshake, and the names of what went wrong.

Pure functions over DER bytes and :mod:`ssl` errors: reference-name matching (RFC 6125 as
RFC 7672 and RFC 8461 use it, with Postfix's ``match=`` patterns), pins, MTA-STS ``mx``
patterns, and the mapping from OpenSSL's verdicts to RFC 8460 result types. The chain
itself is checked by OpenSSL during the handshake (levels ``verify`` and ``secure``).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harakapy.tls.policy import Pin
from harakapy.tls.results import Failure, ResultType


def _load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def certificate_names(der: bytes) -> list[str]:
    """The certificate's DNS-IDs (subjectAltName dNSName), lower-case.

    No fallback to the subject CN: RFC 6125 6.4.4 allows it only for certificates without
    DNS-IDs, and RFC 8461 forbids it, so we are strict for every level.
    """
    try:
        san = _load(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [name.lower().rstrip(".") for name in san.value.get_values_for_type(x509.DNSName)]


def name_matches(presented: str, reference: str) -> bool:
    """RFC 6125 6.4.3: a wildcard only as the whole left-most label, matching one label."""
    presented, reference = presented.lower().rstrip("."), reference.lower().rstrip(".")
    if presented.startswith("*."):
        parent = presented[2:]
        head, _, rest = reference.partition(".")
        return bool(head) and "*" not in parent and rest == parent and "." in parent
    return "*" not in presented and presented == reference


def _below(presented: str, parent: str) -> bool:
    """Whether the certificate name covers a name strictly below ``parent``."""
    name = presented[2:] if presented.startswith("*.") else presented
    if "*" in name or (presented.startswith("*.") and "." not in name):
        return False  # the wildcards name_matches never honours: not here either
    if presented.startswith("*.") and name == parent:
        return True
    return name.endswith("." + parent)


def reference_patterns(match: Iterable[str], *, hostname: str, nexthop: str) -> list[str]:
    """Postfix ``match=`` names with ``hostname``/``nexthop``/``dot-nexthop`` filled in:
    plain names must match exactly, ``.name`` entries any subdomain."""
    out = []
    for item in match:
        key = item.strip().lower().rstrip(".")
        if key == "hostname":
            out.append(hostname.lower())
        elif key == "nexthop":
            out.append(nexthop.lower())
        elif key == "dot-nexthop":
            out.append("." + nexthop.lower())
        elif key:
            out.append(key)
    return out


def names_match(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether any certificate name satisfies any reference pattern."""
    for pattern in patterns:
        for name in names:
            if pattern.startswith("."):
                if _below(name, pattern[1:]):
                    return True
            elif name_matches(name, pattern):
                return True
    return False


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``mx.example.com`` exactly, or ``*.example.com`` one label below."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def spki_der(der: bytes) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER: what public-key pins and TLSA
    selector 1 are computed over."""
    return _load(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprints(der: bytes, algorithm: str = "sha256") -> tuple[str, str]:
    """``(certificate digest, public-key digest)`` in lower-case hex."""
    return (hashlib.new(algorithm, der).hexdigest(),
            hashlib.new(algorithm, spki_der(der)).hexdigest())


def pin_matches(der: bytes, pins: Iterable[Pin]) -> bool:
    """Whether the certificate or its public key matches any of ``pins``."""
    digests: dict[str, tuple[str, str]] = {}
    for pin in pins:
        if pin.algorithm not in digests:
            digests[pin.algorithm] = fingerprints(der, pin.algorithm)
        if any(hmac.compare_digest(pin.digest, d) for d in digests[pin.algorithm]):
            return True
    return False


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The chain the server sent, leaf first, as DER, unverified.

    Python 3.13 has ``get_unverified_chain()``; 3.11 and 3.12 have it on the inner
    ``_sslobj`` only. Where neither exists, the leaf alone.
    """
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)
                for c in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


# OpenSSL X509_V_ERR_* codes that have their own RFC 8460 result type.
_EXPIRED = 10
_NOT_TRUSTED = {2, 18, 19, 20, 21, 27}
_HOST_MISMATCH = 62
_X509_NAMES = {
    2: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT",
    7: "X509_V_ERR_CERT_SIGNATURE_FAILURE",
    9: "X509_V_ERR_CERT_NOT_YET_VALID",
    10: "X509_V_ERR_CERT_HAS_EXPIRED",
    18: "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT",
    19: "X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN",
    20: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    21: "X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE",
    23: "X509_V_ERR_CERT_REVOKED",
    24: "X509_V_ERR_INVALID_CA",
    26: "X509_V_ERR_INVALID_PURPOSE",
    27: "X509_V_ERR_CERT_UNTRUSTED",
    28: "X509_V_ERR_CERT_REJECTED",
    62: "X509_V_ERR_HOSTNAME_MISMATCH",
}


def handshake_failure(error: BaseException | None, reason: str) -> Failure:
    """The RFC 8460 failure for a handshake that did not complete."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        name = _X509_NAMES.get(code, f"X509_V_ERR_{code}")
        if code == _EXPIRED:
            kind = ResultType.CERTIFICATE_EXPIRED
        elif code in _NOT_TRUSTED:
            kind = ResultType.CERTIFICATE_NOT_TRUSTED
        elif code == _HOST_MISMATCH:
            kind = ResultType.CERTIFICATE_HOST_MISMATCH
        else:
            kind = ResultType.VALIDATION_FAILURE
        return Failure(kind, reason, name)
    code = getattr(error, "reason", None) or ""
    if not code and error is not None:
        code = type(error).__name__
    return Failure(ResultType.VALIDATION_FAILURE, reason, str(code))


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What an operator wants to see of a certificate when diagnosing (``--probe``)."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: str
    not_after: str
    sha256: str
    spki_sha256: str

    @classmethod
    def of(cls, der: bytes) -> CertificateFacts:
        cert = _load(der)
        cert_digest, key_digest = fingerprints(der)
        return cls(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                   names=tuple(certificate_names(der)),
                   not_before=cert.not_valid_before_utc.isoformat(),
                   not_after=cert.not_valid_after_utc.isoformat(),
                   sha256=cert_digest, spki_sha256=key_digest)


class TrustStore:
    """The CAs ``verify`` trusts, for telling a ``Trusted`` session from an ``Untrusted``
    one where the policy checked nothing (Postfix's log words): loaded on first use."""

    def __init__(self, ca_file: Path | None) -> None:
        self.ca_file = ca_file
        self._store: object | None = None

    def trusts(self, chain: Sequence[bytes]) -> bool:
        """Whether ``chain`` (DER, leaf first) leads to one of the CAs, names aside."""
        from cryptography.x509.verification import (
            Criticality,
            ExtensionPolicy,
            PolicyBuilder,
            VerificationError,
        )

        if not chain:
            return False
        store = self._load()
        if store is None:
            return False
        try:
            leaf = _load(chain[0])
            names = certificate_names(chain[0])
            if not names:
                return False
            # RFC 5280 for the CAs; the leaf as OpenSSL takes it (verify's own check),
            # not the Web PKI's rules for leaf extensions.
            verifier = PolicyBuilder().store(store).extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all().require_present(
                    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None),
            ).build_server_verifier(
                x509.DNSName(names[0].replace("*", "x", 1)))
            verifier.verify(leaf, [_load(der) for der in chain[1:]])
        except (VerificationError, ValueError):
            return False
        return True

    def _load(self) -> object | None:
        if self._store is None:
            from cryptography.x509.verification import Store

            path = self.ca_file or Path(ssl.get_default_verify_paths().openssl_cafile)
            try:
                with warnings.catch_warnings():
                    # System bundles hold old roots cryptography frowns on (a negative
                    # serial); OpenSSL takes them, and so does this word for the log.
                    warnings.simplefilter("ignore")
                    certificates = x509.load_pem_x509_certificates(path.read_bytes())
                self._store = Store(certificates)
            except (OSError, ValueError):
                self._store = False
        return self._store or None
