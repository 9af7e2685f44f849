"""The DANE tests' world: zones the test signs, served by NSD and validated by a real
unbound (tests/dnssec_world.py), receiving MX servers with certificates the test makes,
and harakapy delivering between them, through the ``dane_world`` fixture of conftest.py."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.dnssec_world import DnssecWorld, tlsa_name, tlsa_text
from tests.outbound_env import RECORDER, Env, EnvFactory, free_port_on_all
from tests.servers import ReceivingMTA, StartTlsStripper

MX_IP, MX2_IP, REAL_IP, POLICY_IP = "127.0.0.51", "127.0.0.52", "127.0.0.59", "127.0.0.41"
HOSTS = (51, 52, 59)
BODY = b"Subject: secret\r\n\r\nthe merger closes on friday\r\n"


@dataclass
class Cert:
    """A certificate and key on disk, and the certificate's DER for TLSA records."""

    chain: str
    key: str
    der: bytes
    issuer_der: bytes = b""


def self_signed(directory: Path, name: str) -> Cert:
    """A self-signed certificate no CA vouches for: what DANE-EE is for."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                   .sign(key, hashes.SHA256()))
    chain, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    chain.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Cert(str(chain), str(key_file), certificate.public_bytes(serialization.Encoding.DER))


def issued(directory: Path, ca: trustme.CA, *names: str) -> Cert:
    """A certificate from ``ca`` (a private CA: DANE-TA's case), sent with the CA's own
    certificate, as RFC 7671 5.2 asks of servers."""
    cert = ca.issue_cert(*names)
    chain, key_file = directory / f"{names[0]}-ta.pem", directory / f"{names[0]}-ta.key"
    chain.write_bytes(cert.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(key_file))
    der = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER)
    ca_der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(
        serialization.Encoding.DER)
    return Cert(str(chain), str(key_file), der, ca_der)


class DaneWorld:
    """harakapy (``env``) and the signed internet it delivers into (``dns``)."""

    def __init__(self, env: Env, dns: DnssecWorld, port: int, directory: Path) -> None:
        self.env, self.dns, self.port, self.directory = env, dns, port, directory

    def tlsa(self, host: str, *records: str) -> str:
        return "".join(f"{tlsa_name(host, self.port)} TLSA {r}\n" for r in records)

    async def mx(self, ip: str, cert: Cert | None = None, **options) -> ReceivingMTA:
        if cert is not None:
            options["cert"] = (cert.chain, cert.key)
        return await self.env.mta(ip, **options)

    async def stripper(self, ip: str, upstream: ReceivingMTA) -> StartTlsStripper:
        return await self.env.stack.enter_async_context(
            StartTlsStripper(ip, self.port, upstream=(upstream.host, self.port)))


def dane_world_factory(outbound_env: EnvFactory, tmp_path: Path):
    """``world = await dane_world(zone_of(port), insecure=..., tamper=...)``: ``zone_of``
    gets the MX servers' port, for the TLSA owners."""

    async def start(zone_of, *, insecure=None, tamper=None,
                    plugins: str = "relay\ndane\nmta_sts\nrecorder\n",
                    mta_sts_ini: str = "", plugin_files: dict[str, str] | None = None
                    ) -> DaneWorld:
        port = free_port_on_all(HOSTS)
        if callable(insecure):
            insecure = insecure(port)
        dns = await outbound_env.stack.enter_async_context(DnssecWorld(
            zone_of(port), insecure=insecure, tamper=tamper, directory=tmp_path / "dnssec"))
        files = {"dns.ini": dns.dns_ini(),
                 "tls.ini": f"[outbound]\nca_file = {outbound_env.ca_file}\n"}
        if mta_sts_ini:
            files["mta_sts.ini"] = mta_sts_ini
        env = await outbound_env("@ SOA ns.test. h.test. 1 3600 600 86400 300\n",
                                 files=files, plugins=plugins,
                                 plugin_files={"recorder": RECORDER, **(plugin_files or {})},
                                 hosts=HOSTS, body=BODY,
                                 port=port)
        return DaneWorld(env, dns, port, tmp_path)

    return start


def zone(name: str, ip: str = MX_IP, extra: str = "") -> str:
    return f"{name}. MX 10 mx.{name}.\nmx.{name}. A {ip}\n{extra}"


def sent_in_plaintext(attacker: StartTlsStripper) -> bytes:
    return bytes(attacker.from_client)


def dane_ee_zone(name: str, cert: Cert, ip: str = MX_IP):
    """``zone`` for ``name`` with a DANE-EE record (3 1 1) of ``cert`` for its MX: a
    ``zone_of(port)`` for :func:`dane_world_factory`."""
    return lambda port: zone(name, ip, extra=(
        f"{tlsa_name(f'mx.{name}', port)} TLSA {tlsa_text(3, 1, 1, cert.der)}\n"))
