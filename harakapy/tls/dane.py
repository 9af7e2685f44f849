"""DANE for SMTP without I/O: which TLSA records are usable, and whether a certificate
chain satisfies them (RFC 6698, RFC 7671, RFC 7672 section 3).

Rules:

1. Usable records are DANE-TA(2) and DANE-EE(3), selector Cert(0) or SPKI(1), matching
   type Full(0), SHA2-256(1) or SHA2-512(2), with data of the right size (Full data must
   parse). Usages 0 and 1 are unusable for SMTP (RFC 7672 3.1.3); unusable records are
   ignored, not errors.
2. Digest agility (RFC 7671 9): per usage and selector, Full records and those of the
   strongest digest present are used; weaker digests beside a stronger one are ignored.
3. DANE-EE matches the leaf only, and then nothing else is checked: no names, no dates,
   no chain (RFC 7672 3.1.1).
4. DANE-TA matches a certificate above the leaf in the chain the server sent (or the
   full certificate of a ``2 0 0`` record); the chain from the leaf to it is then
   validated (signatures, dates, constraints) and the leaf must name one of the
   reference identifiers: the TLSA base domain, the MX host, the next-hop domain
   (RFC 7672 3.2).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from harakapy.tls import verify
from harakapy.tls.policy import TlsaRecord
from harakapy.tls.results import Failure, ResultType

DANE_TA, DANE_EE = 2, 3
CERT, SPKI = 0, 1
FULL, SHA256, SHA512 = 0, 1, 2
_DIGEST_SIZE = {SHA256: 32, SHA512: 64}
_STRENGTH = {SHA256: 1, SHA512: 2}


def usable(record: TlsaRecord) -> bool:
    """Rule 1."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in (CERT, SPKI):
        return False
    if record.mtype in _DIGEST_SIZE:
        return len(record.data) == _DIGEST_SIZE[record.mtype]
    if record.mtype != FULL:
        return False
    try:
        if record.selector == CERT:
            x509.load_der_x509_certificate(record.data)
        else:
            load_der_public_key(record.data)
    except (ValueError, TypeError):
        return False
    return True


def usable_records(records: Sequence[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """Rules 1 and 2: the records to match against, in their published order."""
    kept = [record for record in records if usable(record)]
    strongest: dict[tuple[int, int], int] = {}
    for record in kept:
        if record.mtype != FULL:
            key = (record.usage, record.selector)
            strongest[key] = max(strongest.get(key, 0), _STRENGTH[record.mtype])
    return tuple(record for record in kept if record.mtype == FULL or
                 _STRENGTH[record.mtype] == strongest[(record.usage, record.selector)])


def _selected(certificate: x509.Certificate, selector: int) -> bytes:
    if selector == CERT:
        return certificate.public_bytes(Encoding.DER)
    return certificate.public_key().public_bytes(Encoding.DER,
                                                 PublicFormat.SubjectPublicKeyInfo)


def matches(record: TlsaRecord, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` is what ``record`` designates."""
    data = _selected(certificate, record.selector)
    if record.mtype == SHA256:
        data = hashlib.sha256(data).digest()
    elif record.mtype == SHA512:
        data = hashlib.sha512(data).digest()
    return hmac.compare_digest(data, record.data)


class Match(NamedTuple):
    """Which record a chain satisfied, for ``harakapy tls-policy --probe``."""

    record: TlsaRecord
    depth: int  # 0 for the leaf


def verify_chain(records: Sequence[TlsaRecord], chain: Sequence[bytes],
                 references: Sequence[str], *,
                 now: datetime.datetime | None = None) -> Match | Failure:
    """Rules 3 and 4: the record the chain (DER, leaf first) satisfies, or why none.

    :param references: Names a DANE-TA leaf may carry: the TLSA base domain first.
    """
    if not chain:
        return Failure(ResultType.VALIDATION_FAILURE, "the server sent no certificate",
                       "no-peer-certificate")
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return Failure(ResultType.VALIDATION_FAILURE,
                       "the server sent a certificate that does not parse",
                       "bad-certificate")
    leaf, above = certificates[0], certificates[1:]
    for record in records:
        if record.usage == DANE_EE and matches(record, leaf):
            return Match(record, 0)
    ta_failure: Failure | None = None
    for record in records:
        if record.usage != DANE_TA:
            continue
        anchors = [(depth, cert) for depth, cert in enumerate(above, 1)
                   if matches(record, cert)]
        if not anchors and record.selector == CERT and record.mtype == FULL:
            anchors = [(len(certificates), x509.load_der_x509_certificate(record.data))]
        for depth, anchor in anchors:
            outcome = _validate(leaf, above[:depth - 1], anchor, references, now)
            if outcome is None:
                return Match(record, depth)
            ta_failure = ta_failure or outcome
    if ta_failure is not None:
        return ta_failure
    return Failure(ResultType.CERTIFICATE_NOT_TRUSTED,
                   f"no TLSA record matches the certificate chain ({len(records)} "
                   f"usable record(s))", "dane-no-matching-tlsa")


def _validate(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
              anchor: x509.Certificate, references: Sequence[str],
              now: datetime.datetime | None) -> Failure | None:
    """Rule 4: the path from ``leaf`` to ``anchor``, then the names (reported apart)."""
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    moment = now or datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= moment <= leaf.not_valid_after_utc:
        return Failure(ResultType.CERTIFICATE_EXPIRED,
                       f"the certificate is not valid now (valid "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d} to "
                       f"{leaf.not_valid_after_utc:%Y-%m-%d})", "X509_V_ERR_CERT_HAS_EXPIRED")
    der = leaf.public_bytes(Encoding.DER)
    names = verify.certificate_names(der)
    if not names:
        return Failure(ResultType.CERTIFICATE_HOST_MISMATCH,
                       "the certificate has no DNS names", "X509_V_ERR_HOSTNAME_MISMATCH")
    # The path is checked against a name the leaf has, so that a name mismatch is told
    # from a broken chain; the reference identifiers are matched after.
    own = names[0].replace("*", "x", 1)
    # RFC 5280 for the CAs; for the leaf only what DANE-TA needs (a subjectAltName),
    # not the Web PKI's rules for leaf extensions, which private CAs need not follow.
    leaf_policy = ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    builder = PolicyBuilder().store(Store([anchor])).time(moment).extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
    verifier = builder.build_server_verifier(x509.DNSName(own))
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        return Failure(ResultType.VALIDATION_FAILURE,
                       f"the chain to the TLSA trust anchor does not validate: "
                       f"{str(exc)[:160]}", "dane-ta-chain-invalid")
    wanted = [ref.rstrip(".").lower() for ref in references if ref]
    if not verify.names_match(names, wanted):
        return Failure(ResultType.CERTIFICATE_HOST_MISMATCH,
                       f"certificate names ({', '.join(names)}) match none of "
                       f"{', '.join(dict.fromkeys(wanted))}", "X509_V_ERR_HOSTNAME_MISMATCH")
    return None
