"""What one outbound TLS negotiation came to, in RFC 8460's terms.

Every session opened where TLS was attempted or required produces one :class:`TlsResult`,
success or failure, for the ``tls_result`` hook: the ``tlsrpt`` plugin counts them, an
operator's plugin may alert on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ResultType(enum.StrEnum):
    """RFC 8460 section 4.3: the IANA "STARTTLS Validation Result Types"."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a session did not meet its policy.

    :param result_type: The RFC 8460 result-type.
    :param reason: A sentence for logs, deferrals and DSNs.
    :param code: RFC 8460 ``failure-reason-code``: a short token such as
        ``X509_V_ERR_CERT_HAS_EXPIRED``, or empty.
    """

    result_type: ResultType
    reason: str
    code: str = ""


@dataclass(frozen=True, slots=True)
class TlsResult:
    """One negotiation, as the ``tls_result`` hook sees it.

    :ivar domain: The destination (next-hop) domain whose policy applied.
    :ivar level: The policy level that was enforced for this MX (``"may"``, ``"verify"``...).
    :ivar policy_type: RFC 8460 ``policy-type``: ``sts``, ``tlsa`` or ``no-policy-found``.
    :ivar policy_domain: RFC 8460 ``policy-domain`` (the TLSA base domain for ``tlsa``).
    :ivar policy_strings: RFC 8460 ``policy-string`` entries.
    :ivar mx_host_patterns: RFC 8460 ``mx-host`` (MTA-STS ``mx`` patterns).
    :ivar mx_hostname: The MX host we connected to (``receiving-mx-hostname``).
    :ivar receiving_ip: Its address (``receiving-ip``).
    :ivar receiving_helo: The name in its EHLO reply (``receiving-mx-helo``), if it gave one.
    :ivar sending_ip: Our address on that connection (``sending-mta-ip``).
    :ivar failure: ``None`` on success.
    :ivar enforced: False when the policy only reports (MTA-STS ``testing``, a pin in
        ``report`` mode): the failure was reported and the mail went on as at ``may``.
    :ivar tls_version: The negotiated protocol (``TLSv1.3``), empty without TLS.
    :ivar cipher: The negotiated cipher suite, empty without TLS.
    :ivar decided_by: The plugin whose policy this was (empty for the default).
    :ivar certificate: The server's certificate (DER) when the handshake completed.
    """

    domain: str
    level: str
    policy_type: str
    policy_domain: str
    mx_hostname: str
    receiving_ip: str
    sending_ip: str = ""
    receiving_helo: str = ""
    policy_strings: tuple[str, ...] = ()
    mx_host_patterns: tuple[str, ...] = ()
    failure: Failure | None = None
    enforced: bool = True
    tls_version: str = ""
    cipher: str = ""
    decided_by: str = ""
    certificate: bytes = b""

    @property
    def success(self) -> bool:
        return self.failure is None

    @property
    def result_type(self) -> str:
        """The RFC 8460 result-type, empty on success."""
        return self.failure.result_type.value if self.failure else ""
