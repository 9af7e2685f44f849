"""Certificate checks after the handshake (harakapy.tls.verify): reference names (RFC 6125
with Postfix's match= patterns), MTA-STS mx patterns (RFC 8461 4.1), pins, OpenSSL verdicts
as RFC 8460 result types, and the chain a real server sends over loopback."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harakapy.tls import verify
from harakapy.tls.policy import Pin
from harakapy.tls.results import Failure, ResultType

UTC = datetime.UTC
DER = serialization.Encoding.DER


# -- certificates ------------------------------------------------------------------------


def make_cert(*dns_names: str, common_name: str = "", ips: tuple[str, ...] = (),
              issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None,
              ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A DER certificate with exactly the SAN entries given (none: no SAN extension at all),
    built with cryptography so that names trustme would refuse can be presented too."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
                        if common_name else [])
    issuer_name, issuer_key = (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]),
                               issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - datetime.timedelta(days=1))
               .not_valid_after(not_after or now + datetime.timedelta(days=30)))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(DER), key


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(DER)


# -- name_matches (RFC 6125 6.4.3) -----------------------------------------------------


@pytest.mark.parametrize(("presented", "reference", "expected"), [
    # mta-sts.md section 12, vectors 27 and 28
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "MAIL.Example.COM.", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mail.example.com.evil.test", False),
    ("example.com", "mail.example.com", False),
    # exact names, case and trailing dots on either side
    ("mx.example.com", "mx.example.com", True),
    ("MX.Example.Com", "mx.example.COM", True),
    ("mx.example.com.", "mx.example.com", True),
    ("mx.example.com", "mx.example.com.", True),
    ("mx.example.com", "mx2.example.com", False),
    ("mx.example.com", "x.example.com", False),
    ("*.EXAMPLE.com.", "a.example.COM", True),
    # a wildcard matches exactly one whole label, never an empty one
    ("*.example.com", ".example.com", False),
    ("*.example.com", "*.example.com", True),
    # too broad: a wildcard directly over a single label is never honoured
    ("*.com", "example.com", False),
    ("*.", "example", False),
    ("*", "localhost", False),
    # a wildcard that is not the whole left-most label never matches (RFC 6125 as RFC 7672
    # and RFC 8461 use it: the complete left-most label only)
    ("a*.example.com", "ab.example.com", False),
    ("a*.example.com", "a.example.com", False),
    ("*a.example.com", "ba.example.com", False),
    ("f*o.example.com", "foo.example.com", False),
    ("xn--*.example.com", "xn--bcher-kva.example.com", False),
    ("*.*.example.com", "a.b.example.com", False),
    ("a.*.example.com", "a.b.example.com", False),
    ("mail.*.com", "mail.example.com", False),
    # A-labels are just labels
    ("*.xn--bcher-kva.example", "mx.xn--bcher-kva.example", True),
])
def test_name_matches(presented, reference, expected):
    assert verify.name_matches(presented, reference) is expected


# -- reference_patterns and names_match (Postfix match=) -------------------------------


def test_reference_patterns_fill_in_the_postfix_keywords():
    patterns = verify.reference_patterns(
        ["hostname", "NextHop", "dot-nexthop", "Literal.Example.", ".Sub.Example", " ", ""],
        hostname="MX1.Example.NET", nexthop="Example.COM")
    assert patterns == ["mx1.example.net", "example.com", ".example.com",
                        "literal.example", ".sub.example"]


def test_reference_patterns_for_no_match_names_are_empty():
    assert verify.reference_patterns([], hostname="mx.example", nexthop="example") == []


def postfix(match: tuple[str, ...], names: list[str], *, hostname: str = "mx1.example.net",
            nexthop: str = "example.com") -> bool:
    patterns = verify.reference_patterns(match, hostname=hostname, nexthop=nexthop)
    return verify.names_match(names, patterns)


SECURE = ("nexthop", "dot-nexthop")  # Postfix's smtp_tls_secure_cert_match


@pytest.mark.parametrize(("match", "names", "expected"), [
    # verify: the MX host name (smtp_tls_verify_cert_match = hostname)
    (("hostname",), ["mx1.example.net"], True),
    (("hostname",), ["*.example.net"], True),
    (("hostname",), ["example.com"], False),  # the destination is not the MX
    (("hostname",), ["mx2.example.net", "MX1.EXAMPLE.NET"], True),
    (("hostname",), [], False),
    # secure: the destination and its subdomains, never the MX name for itself
    (SECURE, ["example.com"], True),
    (SECURE, ["mx.example.com"], True),
    (SECURE, ["a.b.example.com"], True),  # dot-nexthop: any depth, as in Postfix
    (SECURE, ["*.example.com"], True),
    (SECURE, ["*.b.example.com"], True),
    (SECURE, ["mx1.example.net"], False),
    (SECURE, ["notexample.com"], False),
    (SECURE, ["example.com.evil.test"], False),
    (SECURE, ["com"], False),
    (("nexthop",), ["mx.example.com"], False),
    (("nexthop",), ["*.com"], False),
    (("dot-nexthop",), ["example.com"], False),  # strictly below
    (("dot-nexthop",), ["mx.example.com"], True),
    # literal names: exact, wildcard certificates per RFC 6125
    (("mx.partner.example",), ["mx.partner.example"], True),
    (("mx.partner.example",), ["*.partner.example"], True),
    (("a.mx.partner.example",), ["*.partner.example"], False),
    (("mx.partner.example",), ["partner.example"], False),
    (("partner.example",), ["mx.partner.example"], False),
    # .name literal patterns: any subdomain
    ((".partner.example",), ["x.y.partner.example"], True),
    ((".partner.example",), ["*.partner.example"], True),
    ((".partner.example",), ["partner.example"], False),
    ((".partner.example",), ["xpartner.example"], False),
    ((".partner.example",), ["*.example"], False),
    # malformed wildcards match no pattern, not even a .name one
    ((".partner.example",), ["a*.partner.example"], False),
    ((".partner.example",), ["*.*.partner.example"], False),
    ((".example",), ["*.example"], False),  # "*.<one label>" is never honoured
    ((".com",), ["*.com"], False),
    # any pattern with any name is enough
    (("hostname", "mx.partner.example"), ["mx.partner.example"], True),
    (("nope.example", ".partner.example"), ["other.test", "a.partner.example"], True),
])
def test_postfix_match_semantics(match, names, expected):
    assert postfix(match, names) is expected


def test_names_match_with_no_patterns_is_false():
    assert verify.names_match(["example.com"], []) is False


# -- mx_pattern_matches (RFC 8461 4.1) --------------------------------------------------


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "MAIL.Example.COM.", True),
    ("*.Example.COM.", "mail.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "foo.bar.example.com", False),
    ("*.example.com", "mail.example.com.evil.test", False),
    ("*.example.com", "mailexample.com", False),
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.EXAMPLE.COM.", True),
    ("example.com", "mail.example.com", False),
    ("mail.example.com", "example.com", False),
    ("mx.xn--bcher-kva.example", "mx.xn--bcher-kva.example", True),
])
def test_mx_pattern_matches(pattern, host, expected):
    assert verify.mx_pattern_matches(pattern, host) is expected


# -- certificate_names -------------------------------------------------------------------


def test_certificate_names_are_the_dns_sans_lower_case_without_final_dot():
    der, _ = make_cert("MX.Example.COM.", "*.Example.net", common_name="cn.example.org",
                       ips=("192.0.2.1",))
    assert verify.certificate_names(der) == ["mx.example.com", "*.example.net"]


def test_the_common_name_is_never_a_name():
    der, _ = make_cert(common_name="mx.example.com")
    assert verify.certificate_names(der) == []
    # and no check through the name functions finds it either
    names = verify.certificate_names(der)
    assert not verify.names_match(names, ["mx.example.com", ".example.com"])


def test_a_certificate_with_only_ip_sans_has_no_names():
    der, _ = make_cert(common_name="mx.example.com", ips=("192.0.2.1",))
    assert verify.certificate_names(der) == []


def test_names_of_a_trustme_certificate(tls_ca):
    issued = tls_ca.issue_cert("mx1.example.test", "*.example.test",
                               common_name="ignored.example.test")
    der = der_of(issued.cert_chain_pems[0].bytes())
    assert verify.certificate_names(der) == ["mx1.example.test", "*.example.test"]


def test_names_of_something_that_is_not_a_certificate():
    assert verify.certificate_names(b"\x30\x03\x02\x01\x00") == []


# -- pins and digests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned() -> tuple[bytes, bytes]:
    """A certificate and its SubjectPublicKeyInfo, the latter from the private key (not
    through the certificate, so the code under test cannot agree with itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der, _ = make_cert("mx.bank.example", key=key)
    spki = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der, spki


def test_spki_der_is_the_public_key_info(pinned):
    der, spki = pinned
    assert verify.spki_der(der) == spki


def test_spki_der_of_an_rsa_trustme_certificate():
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    issued = ca.issue_cert("mx.example.test", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    expected = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert verify.spki_der(der_of(issued.cert_chain_pems[0].bytes())) == expected


def test_fingerprints(pinned):
    der, spki = pinned
    assert verify.fingerprints(der) == (hashlib.sha256(der).hexdigest(),
                                        hashlib.sha256(spki).hexdigest())
    assert verify.fingerprints(der, "sha512") == (hashlib.sha512(der).hexdigest(),
                                                  hashlib.sha512(spki).hexdigest())


@pytest.mark.parametrize(("of", "algorithm"), [
    ("cert", "sha256"), ("key", "sha256"), ("cert", "sha512"), ("key", "sha512")])
def test_a_pin_of_the_certificate_or_its_key_matches(pinned, of, algorithm):
    der, spki = pinned
    digest = hashlib.new(algorithm, der if of == "cert" else spki).hexdigest()
    assert verify.pin_matches(der, [Pin(algorithm, digest)]) is True
    # as an operator writes it in the table: upper case with colons
    spelt = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()
    assert verify.pin_matches(der, [Pin.parse(spelt)]) is True


def test_pins_of_something_else_do_not_match(pinned):
    der, _ = pinned
    other, _ = make_cert("mx.bank.example")  # same name, another key
    pins = [Pin("sha256", hashlib.sha256(other).hexdigest()),
            Pin("sha256", hashlib.sha256(verify.spki_der(other)).hexdigest()),
            Pin("sha512", hashlib.sha512(other).hexdigest())]
    assert verify.pin_matches(der, pins) is False
    assert verify.pin_matches(der, []) is False
    # a SHA-256 digest is not a SHA-512 pin: the algorithm counts, not only the hex
    assert verify.pin_matches(der, [Pin("sha512", hashlib.sha256(der).hexdigest())]) is False


def test_any_one_matching_pin_is_enough(pinned):
    der, spki = pinned
    pins = [Pin("sha256", "00" * 32), Pin("sha512", "11" * 64),
            Pin("sha512", hashlib.sha512(spki).hexdigest())]
    assert verify.pin_matches(der, pins) is True


def test_a_pin_survives_reissuing_with_the_same_key(pinned):
    der, spki = pinned
    key_pin = Pin("sha256", hashlib.sha256(spki).hexdigest())
    cert_pin = Pin("sha256", hashlib.sha256(der).hexdigest())
    key = serialization.load_der_public_key(spki)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    # Re-sign a new certificate over the same public key: only the key pin still matches.
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    renewed = (x509.CertificateBuilder()
               .subject_name(x509.Name([])).issuer_name(
                   x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Renewal CA")]))
               .public_key(key).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.bank.example")]),
                              critical=False)
               .sign(issuer_key, hashes.SHA256()).public_bytes(DER))
    assert verify.pin_matches(renewed, [key_pin]) is True
    assert verify.pin_matches(renewed, [cert_pin]) is False


# -- CertificateFacts --------------------------------------------------------------------


def test_certificate_facts():
    ca_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = datetime.datetime(2027, 6, 7, 8, 9, 10, tzinfo=UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    der, _ = make_cert("mx.example.com", "*.example.net", common_name="mx.example.com",
                       issuer=("Example Test CA", ca_key), not_before=start, not_after=end,
                       key=key)
    facts = verify.CertificateFacts.of(der)
    spki = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert facts == verify.CertificateFacts(
        subject="CN=mx.example.com", issuer="CN=Example Test CA",
        names=("mx.example.com", "*.example.net"),
        not_before="2025-01-02T03:04:05+00:00", not_after="2027-06-07T08:09:10+00:00",
        sha256=hashlib.sha256(der).hexdigest(), spki_sha256=hashlib.sha256(spki).hexdigest())


# -- handshake_failure -------------------------------------------------------------------


def cert_error(code: int, message: str = "certificate verify failed") -> ssl.SSLError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(("code", "result_type", "name"), [
    (10, ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_HAS_EXPIRED"),
    (2, ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT"),
    (18, ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT"),
    (19, ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN"),
    (20, ResultType.CERTIFICATE_NOT_TRUSTED,
     "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
    (21, ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE"),
    (27, ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_CERT_UNTRUSTED"),
    (62, ResultType.CERTIFICATE_HOST_MISMATCH, "X509_V_ERR_HOSTNAME_MISMATCH"),
    (9, ResultType.VALIDATION_FAILURE, "X509_V_ERR_CERT_NOT_YET_VALID"),
    (7, ResultType.VALIDATION_FAILURE, "X509_V_ERR_CERT_SIGNATURE_FAILURE"),
    (23, ResultType.VALIDATION_FAILURE, "X509_V_ERR_CERT_REVOKED"),
    (24, ResultType.VALIDATION_FAILURE, "X509_V_ERR_INVALID_CA"),
    (26, ResultType.VALIDATION_FAILURE, "X509_V_ERR_INVALID_PURPOSE"),
    (28, ResultType.VALIDATION_FAILURE, "X509_V_ERR_CERT_REJECTED"),
    (99, ResultType.VALIDATION_FAILURE, "X509_V_ERR_99"),
])
def test_handshake_failure_for_a_verification_error(code, result_type, name):
    failure = verify.handshake_failure(cert_error(code), "mx1.example: handshake failed")
    assert failure == Failure(result_type, "mx1.example: handshake failed", name)


def test_handshake_failure_for_other_tls_errors():
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    assert verify.handshake_failure(error, "r") == Failure(
        ResultType.VALIDATION_FAILURE, "r", "WRONG_VERSION_NUMBER")
    assert verify.handshake_failure(ssl.SSLError(1, "x"), "r") == Failure(
        ResultType.VALIDATION_FAILURE, "r", "SSLError")
    assert verify.handshake_failure(ConnectionResetError(104, "reset"), "r") == Failure(
        ResultType.VALIDATION_FAILURE, "r", "ConnectionResetError")
    assert verify.handshake_failure(TimeoutError(), "r").code == "TimeoutError"
    assert verify.handshake_failure(None, "no reason") == Failure(
        ResultType.VALIDATION_FAILURE, "no reason", "")


# -- real handshakes over loopback -------------------------------------------------------


def server_context(chain_pem: bytes, key_pem: bytes, tmp_path: Path) -> ssl.SSLContext:
    cert, key = tmp_path / "server-cert.pem", tmp_path / "server-key.pem"
    cert.write_bytes(chain_pem)
    key.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def client_context(ca: trustme.CA, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def serving(handle, context: ssl.SSLContext | None) -> AsyncIterator[int]:
    """A loopback server on a port the OS picks; on leaving, every connection it accepted
    has been closed (none is left for the garbage collector to find open)."""
    handlers: list[asyncio.Task] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        try:
            await handle(reader, writer)
        except ConnectionError:
            pass  # the client gave up on the handshake: what these tests provoke
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            await asyncio.gather(*handlers)


async def _wait_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


def tls_server(context: ssl.SSLContext):
    """A TLS server that completes the handshake, then waits for the client to go."""
    return serving(_wait_for_eof, context)


async def handshake_error(server: ssl.SSLContext, client: ssl.SSLContext,
                          name: str = "mx.example.test") -> BaseException:
    async with tls_server(server) as port:
        with pytest.raises(ssl.SSLError) as caught:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname=name)
            writer.close()
            await writer.wait_closed()
    return caught.value


async def test_a_real_chain_from_an_unknown_ca_is_not_trusted(tmp_path):
    theirs, ours = trustme.CA(), trustme.CA()
    issued = theirs.issue_cert("mx.example.test")
    server = server_context(b"".join(p.bytes() for p in issued.cert_chain_pems),
                            issued.private_key_pem.bytes(), tmp_path)
    error = await handshake_error(server, client_context(ours))
    failure = verify.handshake_failure(error, "r")
    assert failure.result_type is ResultType.CERTIFICATE_NOT_TRUSTED
    assert failure.code == "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"


async def test_a_real_self_signed_certificate_is_not_trusted(tmp_path):
    theirs, ours = trustme.CA(), trustme.CA()
    server = server_context(theirs.cert_pem.bytes(), theirs.private_key_pem.bytes(), tmp_path)
    error = await handshake_error(server, client_context(ours, check_hostname=False))
    failure = verify.handshake_failure(error, "r")
    assert failure == Failure(ResultType.CERTIFICATE_NOT_TRUSTED, "r",
                              "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT")


async def test_a_real_expired_certificate(tls_ca, tmp_path):
    now = datetime.datetime.now(UTC)
    issued = tls_ca.issue_cert("mx.example.test", not_before=now - datetime.timedelta(days=60),
                               not_after=now - datetime.timedelta(days=1))
    server = server_context(b"".join(p.bytes() for p in issued.cert_chain_pems),
                            issued.private_key_pem.bytes(), tmp_path)
    error = await handshake_error(server, client_context(tls_ca))
    assert verify.handshake_failure(error, "r") == Failure(
        ResultType.CERTIFICATE_EXPIRED, "r", "X509_V_ERR_CERT_HAS_EXPIRED")


async def test_a_real_name_mismatch(tls_ca, tmp_path):
    issued = tls_ca.issue_cert("mx.example.test")
    server = server_context(b"".join(p.bytes() for p in issued.cert_chain_pems),
                            issued.private_key_pem.bytes(), tmp_path)
    error = await handshake_error(server, client_context(tls_ca), name="other.example.test")
    assert verify.handshake_failure(error, "r") == Failure(
        ResultType.CERTIFICATE_HOST_MISMATCH, "r", "X509_V_ERR_HOSTNAME_MISMATCH")


async def test_a_real_protocol_error_keeps_openssl_reason():
    async def plaintext(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello has arrived: answer as a plaintext server
        writer.write(b"220 mx.example.test ESMTP not TLS at all\r\n")
        await writer.drain()
        await reader.read()

    async with serving(plaintext, None) as port:
        with pytest.raises(ssl.SSLError) as caught:
            await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(),
                                          server_hostname="mx.example.test")
    failure = verify.handshake_failure(caught.value, "r")
    assert failure.result_type is ResultType.VALIDATION_FAILURE
    assert failure.code == caught.value.reason
    assert failure.code  # OpenSSL names it (WRONG_VERSION_NUMBER or similar)
    assert not failure.code.startswith("X509_V_ERR")


# -- peer_chain --------------------------------------------------------------------------


async def test_peer_chain_is_what_the_server_sent_leaf_first(tmp_path):
    root = trustme.CA()
    intermediate = root.create_child_ca()
    issued = intermediate.issue_cert("mx.example.test")
    pems = [p.bytes() for p in issued.cert_chain_pems]
    server = server_context(b"".join(pems), issued.private_key_pem.bytes(), tmp_path)
    async with tls_server(server) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(root),
                                                  server_hostname="mx.example.test")
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            chain = verify.peer_chain(ssl_object)
            leaf = ssl_object.getpeercert(binary_form=True)
        finally:
            writer.close()
            await writer.wait_closed()
    assert len(chain) >= 2
    assert all(isinstance(c, bytes) for c in chain)
    assert chain[0] == leaf == der_of(pems[0])
    assert chain[1] == der_of(intermediate.cert_pem.bytes())
    assert verify.certificate_names(chain[0]) == ["mx.example.test"]
    # the intermediate issued the leaf, and the root the intermediate
    assert x509.load_der_x509_certificate(chain[0]).issuer == \
        x509.load_der_x509_certificate(chain[1]).subject
    assert x509.load_der_x509_certificate(chain[1]).issuer == \
        x509.load_pem_x509_certificate(root.cert_pem.bytes()).subject


async def test_peer_chain_without_checking_anything(tmp_path):
    # DANE makes the handshake with no chain check: the chain is still what was sent.
    stranger = trustme.CA()
    issued = stranger.create_child_ca().issue_cert("elsewhere.example.test")
    pems = [p.bytes() for p in issued.cert_chain_pems]
    server = server_context(b"".join(pems), issued.private_key_pem.bytes(), tmp_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    async with tls_server(server) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                  server_hostname="mx.example.test")
        try:
            chain = verify.peer_chain(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()
            await writer.wait_closed()
    assert chain == [der_of(p) for p in pems]


class _LeafOnly:
    """An SSL object from a Python with no way to read the chain."""

    def __init__(self, leaf: bytes | None) -> None:
        self.leaf = leaf

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.leaf


class _PublicChain:
    """Python 3.13's SSLObject.get_unverified_chain(), returning DER bytes."""

    def __init__(self, chain: list[bytes] | None) -> None:
        self.chain = chain

    def get_unverified_chain(self) -> list[bytes] | None:
        return self.chain


def test_peer_chain_falls_back_to_the_leaf():
    assert verify.peer_chain(_LeafOnly(b"leaf")) == [b"leaf"]
    assert verify.peer_chain(_LeafOnly(None)) == []


def test_peer_chain_uses_the_public_method_when_there_is_one():
    assert verify.peer_chain(_PublicChain([b"leaf", b"ca"])) == [b"leaf", b"ca"]
    assert verify.peer_chain(_PublicChain(None)) == []
