"""Server-side TLS contexts for inbound STARTTLS and implicit-TLS listeners.

Knows ``ssl`` and ``cryptography``; does not know where settings come from: the ``tls``
plugin reads ``config/tls.ini`` and calls :func:`server_context`.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def parse_tls_version(text: str) -> ssl.TLSVersion:
    """``TLSv1.2`` (case-insensitive; ``1.2`` also accepted) as an :class:`ssl.TLSVersion`.

    :raises ValueError: naming the accepted spellings.
    """
    wanted = text.strip().lower().removeprefix("tlsv").removeprefix("tls")
    for name, version in VERSIONS.items():
        if name.lower().removeprefix("tlsv") == wanted:
            return version
    raise ValueError(f"unknown TLS version {text!r} (expected one of {', '.join(VERSIONS)})")


def server_context(cert: Path, key: Path, *, min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                   ciphers: str | None = None) -> ssl.SSLContext:
    """A server context with ``cert`` (chain, PEM) and ``key`` loaded.

    :raises OSError: when a file cannot be read.
    :raises ssl.SSLError: when the key does not match, or ``ciphers`` selects nothing.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min_version
    # Mail clients almost never present certificates; asking would only slow handshakes.
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if ciphers:
        context.set_ciphers(ciphers)
    context.load_cert_chain(cert, key)
    return context


def self_signed(hostname: str, *, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``hostname``: ``(cert_pem, key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def self_signed_context(hostname: str, *,
                        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                        ciphers: str | None = None) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate, kept only in memory.

    ``ssl`` loads keys from files alone, so the pair lives for a moment in a private
    temporary directory (mode 0700) that is removed at once.
    """
    cert_pem, key_pem = self_signed(hostname)
    with tempfile.TemporaryDirectory(prefix="harakapy-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key_pem)
        return server_context(cert_path, key_path, min_version=min_version, ciphers=ciphers)


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str, int]:
    """``(protocol version, cipher name, secret bits)`` of an established session."""
    name, _protocol, bits = ssl_object.cipher() or ("unknown", "", 0)
    return ssl_object.version() or "unknown", name, int(bits or 0)
