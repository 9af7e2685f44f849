"""The DANE tests' DNS: a real DNSSEC world on loopback. A ``test.`` zone that this module
signs, served by a real authoritative server (NSD), behind a real validating resolver
(unbound) that harakapy's stub resolver asks and whose AD bit it reads.

Why real parts: what DANE rests on is the resolver's verdict (secure, insecure, bogus,
secure denial), and a fake that sets AD by hand proves nothing about the NSEC chain, the
delegation to an unsigned child, or a record changed after signing. tests/dns_server.py
stays the DNS of the tests that need no DNSSEC.

This module owns the world's keys, the signing (dnspython's ``dns.dnssec.sign_zone``, NSEC,
ECDSAP256SHA256 to keep answers under 1232 bytes), the two daemons' config files and their
lifetime. It knows nothing of harakapy beyond :meth:`DnssecWorld.dns_ini`.

Each daemon runs in the foreground as the user running the tests (no chroot, no change of
user: nothing here needs root), on a loopback port the OS picked, with all its files in one
directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.DS
import dns.zone
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dns.rdtypes.dnskeybase import Flag

ORIGIN = dns.name.from_text("test.")
LOOPBACK = "127.0.0.1"

# What the world adds to a zone that lacks it; the serial is replaced by the world's
# generation (see DnssecWorld.update), so the text's serial never matters.
DEFAULT_TTL = 300
SOA_TEXT = "ns.{origin} hostmaster.{origin} 1 3600 600 86400 300"

# RFC 4034 §3.1.5: signatures are valid from an hour ago (clocks a little behind ours still
# accept them) to 30 days ahead (longer than any test run), in real time: unbound checks
# them against its own clock, which no test moves.
INCEPTION_BEFORE = datetime.timedelta(hours=1)
VALID_FOR = datetime.timedelta(days=30)

# How long a daemon may take to answer its first query; they take tens of milliseconds.
START_TIMEOUT = 10.0

Tamper = Callable[[dns.zone.Zone], None]


class WorldError(RuntimeError):
    """The DNS world could not be built: a daemon did not start, or did not validate its
    own zone. The message carries the daemon's log tail."""


def missing_binary(reason: str) -> NoReturn:
    """Skip the test for a missing system binary, or fail it under ``CI=true``.

    The project rule: on a developer's machine a missing ``nsd`` is a skip with the
    install command in the reason; in CI (``.ci/run`` exports ``CI=true``) it is a failure,
    because there a skip would hide that the DANE tests never ran.

    :param reason: What is missing and how to install it.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing system binary fails the run)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, package: str) -> str:
    """The path of system binary ``name`` (``PATH``, then ``/usr/sbin``, where Debian puts
    daemons and where a non-root ``PATH`` often does not look); see :func:`missing_binary`.

    :param name: The executable, e.g. ``"nsd"``.
    :param package: The Debian package that ships it, for the skip reason.
    """
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        missing_binary(f"{name} not found: apt-get install {package}")
    return found


def tlsa_text(usage: int, selector: int, mtype: int,
              certificate: bytes | x509.Certificate) -> str:
    """The rdata of a TLSA record for ``certificate`` (RFC 6698 §2.1), e.g. ``"3 1 1 AB12..."``.

    :param usage: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE (not checked: a test may want
        an unknown usage).
    :param selector: 0 the whole certificate, 1 its SubjectPublicKeyInfo.
    :param mtype: 0 the selected bytes themselves, 1 their SHA-256, 2 their SHA-512.
    :param certificate: DER bytes, PEM bytes, or a loaded certificate.
    """
    if isinstance(certificate, bytes):
        certificate = (x509.load_pem_x509_certificate(certificate)
                       if certificate.lstrip().startswith(b"-----BEGIN")
                       else x509.load_der_x509_certificate(certificate))
    if selector == 0:
        selected = certificate.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        selected = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raise ValueError(f"TLSA selector {selector}: expected 0 (certificate) or 1 (SPKI)")
    if mtype == 0:
        data = selected
    elif mtype == 1:
        data = hashlib.sha256(selected).digest()
    elif mtype == 2:
        data = hashlib.sha512(selected).digest()
    else:
        raise ValueError(f"TLSA matching type {mtype}: expected 0, 1 (SHA-256) or 2 (SHA-512)")
    return f"{usage} {selector} {mtype} {data.hex().upper()}"


def tlsa_name(host: str, port: int = 25, protocol: str = "tcp") -> str:
    """The owner of a host's TLSA records (RFC 6698 §3): ``_25._tcp.mx.good.test.``."""
    return f"_{port}._{protocol}.{host.rstrip('.')}."


def tampered(name: str, rdtype: str, *rdata: str) -> Tamper:
    """A tamper hook: after signing, replace the ``rdtype`` records at ``name`` with
    ``rdata`` and keep the old signatures, as an attacker on the path would (no rdata:
    remove the records, keeping their RRSIG and the NSEC that lists them).

    The hook acts on the signed zone that holds ``name`` (``test.`` or a signed child),
    and leaves the others alone. A validating resolver must call the answer bogus
    (SERVFAIL), never insecure.

    :param name: Absolute (``_25._tcp.mx.good.test.``) or relative to ``test.``.
    :param rdtype: The type to replace, e.g. ``"TLSA"``.
    :param rdata: The new records' rdata in presentation form.
    """
    owner = dns.name.from_text(name, origin=ORIGIN)
    kind = dns.rdatatype.from_text(rdtype)

    def tamper(zone: dns.zone.Zone) -> None:
        assert zone.origin is not None
        if not _zone_holds(zone, owner, kind):
            return
        with zone.writer() as txn:
            old = txn.get(owner, kind)
            ttl = old.ttl if old is not None else DEFAULT_TTL
            txn.delete(owner, kind)
            if rdata:
                txn.add(owner, ttl, *(dns.rdata.from_text(dns.rdataclass.IN, kind, text,
                                                          origin=zone.origin)
                                      for text in rdata))

    return tamper


def _zone_holds(zone: dns.zone.Zone, owner: dns.name.Name, kind: dns.rdatatype.RdataType
                ) -> bool:
    """Are the ``kind`` records at ``owner`` authoritative data of ``zone``: at or below its
    origin and above any cut, except a DS, which lives on the parent's side of its cut
    (RFC 4035 §2.4)?"""
    assert zone.origin is not None
    if not owner.is_subdomain(zone.origin):
        return False
    if kind == dns.rdatatype.DS and owner == zone.origin:
        return False
    name = owner
    while name != zone.origin:
        node = zone.get_node(name)
        at_cut = node is not None and node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS)
        if at_cut and not (name == owner and kind == dns.rdatatype.DS):
            return False  # at or below a delegation: the child's data
        name = name.parent()
    return True


@dataclass(frozen=True)
class ZoneKey:
    """One combined signing key (KSK and ZSK in one, the SEP flag set): one DNSKEY and one
    RRSIG per RRset keep answers small. Kept across updates, so the trust anchor and the
    parent's DS stay right."""

    private: ec.EllipticCurvePrivateKey
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY

    @classmethod
    def generate(cls) -> ZoneKey:
        private = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(private.public_key(),
                                        dns.dnssec.Algorithm.ECDSAP256SHA256,
                                        flags=Flag.ZONE | Flag.SEP)
        return cls(private, dnskey)

    def ds(self, origin: dns.name.Name) -> dns.rdtypes.ANY.DS.DS:
        return dns.dnssec.make_ds(origin, self.dnskey, "SHA256")


class Daemon:
    """One server process: started in its own session (so that a kill reaches NSD's
    children too), its stdout and stderr in ``<name>.out`` beside its own log file."""

    def __init__(self, name: str, argv: list[str], directory: Path, log: Path) -> None:
        self.name, self.argv, self.directory, self.log = name, argv, directory, log
        self.out = directory / f"{name}.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.out.open("ab") as out:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=self.directory,
                                            start_new_session=True)

    @property
    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to its whole session if it has not gone in ``timeout`` s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, timeout)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its log and of its stdout/stderr, for failure messages."""
        parts = []
        for path in (self.log, self.out):
            try:
                text = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or f"({self.name} wrote no log)"


def free_dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (a DNS server binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise WorldError("no port free for both UDP and TCP on 127.0.0.1")


def port_is_free(port: int) -> bool:
    """Could a DNS server bind ``127.0.0.1:port`` now, UDP and TCP? SO_REUSEADDR on the
    TCP probe, as NSD and unbound set it: connections of the last run left in TIME_WAIT
    do not stop them, a process still listening does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            udp.bind((LOOPBACK, port))
            tcp.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


async def wait_port_free(port: int, daemon: str, timeout: float = START_TIMEOUT) -> None:
    """Until ``port`` is free again after ``daemon`` stopped. NSD's main process exits
    before its server child has closed its sockets (the child is left to init), so a
    restart at once can find the port taken."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not port_is_free(port):
        if loop.time() > deadline:
            raise WorldError(f"port {port} still taken {timeout} s after {daemon} stopped")
        await asyncio.sleep(0.005)  # a poll interval; the loop ends when the port is free


async def probe(port: int, query: dns.message.Message, timeout: float = 1.0
                ) -> dns.message.Message | None:
    """Ask ``127.0.0.1:port`` once over a connected UDP socket; ``None`` while nothing
    listens there. A connected socket hears the ICMP port-unreachable at once, so a poll
    loop needs no guess of how long a lost query should be waited for."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((LOOPBACK, port))
        try:
            await loop.sock_sendall(sock, query.to_wire())
            async with asyncio.timeout(timeout):
                while True:
                    data = await loop.sock_recv(sock, 65535)
                    try:
                        response = dns.message.from_wire(data)
                    except dns.exception.DNSException:
                        continue
                    if query.is_response(response):
                        return response
        except (ConnectionRefusedError, TimeoutError):
            return None


def validating_query(name: str, rdtype: str = "A") -> dns.message.Message:
    """A query as a DANE client sends it (RFC 7672 §2.1.1): EDNS0 with DO, 1232-byte
    buffer, and AD set so that the resolver reports what it validated (RFC 6840 §5.7)."""
    query = dns.message.make_query(dns.name.from_text(name, origin=ORIGIN), rdtype,
                                   use_edns=0, want_dnssec=True, payload=1232)
    query.flags |= dns.flags.AD | dns.flags.RD
    return query


def _load(text: str, origin: dns.name.Name) -> dns.zone.Zone:
    # A default $TTL first, so a child's two lines need none; the text's own $TTL wins.
    return dns.zone.from_text(f"$TTL {DEFAULT_TTL}\n{text}", origin=origin,
                              relativize=False, check_origin=False)


class DnssecWorld:
    """``test.`` signed and served by NSD, validated by unbound; use as ``async with``.

    :param zone: The ``test.`` zone, as tests/outbound_env.py writes them: names relative
        to ``test.`` or absolute, ``$TTL`` allowed. An SOA (``ns.test.``) and an apex NS
        are added when missing; the SOA serial is replaced by the world's generation.
    :param insecure: Unsigned child zones, origin to text (``{"plain.test": "..."}``):
        ``test.`` gets their NS (and glue, 127.0.0.1) and no DS, so names there validate
        as insecure.
    :param signed: Child zones signed with keys of their own, delegated with a DS: a chain
        of trust one step longer than ``test.``'s own.
    :param tamper: Called with each signed zone after signing (see :func:`tampered`):
        what it changes keeps the old signatures.
    :param directory: Where the zone files, configs and logs go (a test's ``tmp_path``
        keeps them after a failure); default a temporary directory removed on exit.
    """

    def __init__(self, zone: str, *, insecure: Mapping[str, str] | None = None,
                 signed: Mapping[str, str] | None = None, tamper: Tamper | None = None,
                 directory: Path | None = None) -> None:
        self.nsd_binary = self.unbound_binary = ""
        self._zone, self._tamper = zone, tamper
        self._insecure = dict(insecure or {})
        self._signed = dict(signed or {})
        self._given_directory = directory
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self.directory = Path()
        self.key = ZoneKey.generate()
        self.child_keys: dict[dns.name.Name, ZoneKey] = {}
        self.generation = 0
        self.authority_port = 0
        self.resolver_port = 0
        self.nsd: Daemon | None = None
        self.unbound: Daemon | None = None
        self.zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._final_logs: dict[str, str] = {}

    # -- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> DnssecWorld:
        self.nsd_binary = require_binary("nsd", "nsd")
        self.unbound_binary = require_binary("unbound", "unbound")
        if self._given_directory is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="dnssec-world-")
            self.directory = Path(self._temporary.name)
        else:
            self.directory = self._given_directory
            self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._write_zones()
            await self._start_nsd()
            await self._start_unbound()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop both daemons (SIGTERM, then SIGKILL) and keep their log tails in memory, for
        :meth:`unbound_log` after the directory is gone."""
        for daemon in (self.unbound, self.nsd):
            if daemon is not None:
                await daemon.stop()
                self._final_logs[daemon.name] = daemon.tail(200)
        self.unbound = self.nsd = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    async def update(self, zone: str | None = None, *, insecure: Mapping[str, str] | None = None,
                     signed: Mapping[str, str] | None = None,
                     tamper: Tamper | None = None) -> None:
        """Change the world mid-test: re-sign, and restart NSD and unbound on their ports.

        Returns once NSD serves the new generation and unbound has forgotten the old one,
        so the next query sees the change. The children and the zone text are kept when
        not given; ``tamper`` is not (each update states its own, or none).

        :param zone: The new ``test.`` zone text (default: the current one).
        :param insecure: The new unsigned children (default: the current ones).
        :param signed: The new signed children (default: the current ones); a child keeps
            its key across updates.
        :param tamper: Applied to the newly signed zones, as in the constructor.
        """
        if zone is not None:
            self._zone = zone
        if insecure is not None:
            self._insecure = dict(insecure)
        if signed is not None:
            self._signed = dict(signed)
        self._tamper = tamper
        self._write_zones()
        assert self.nsd is not None and self.unbound is not None
        await self.nsd.stop()
        await wait_port_free(self.authority_port, "nsd")
        self.nsd.start()
        await self._wait_for_nsd()
        # A restart of unbound forgets everything it cached: messages, RRsets, the key
        # cache, bogus answers and the stub's RTT. The TTL caps in its config are not
        # enough: unbound compares expiry at one-second resolution, and without the restart
        # an answer changed within the same second was served stale (tried: the TXT
        # added by one update was missing until the next second). Stub zones may have come
        # or gone with the children, too. Both restarts take about 0.1 s together.
        await self.unbound.stop()
        await wait_port_free(self.resolver_port, "unbound")
        self._write_unbound_conf()
        self.unbound.start()
        await self._wait_for_unbound()

    # -- asking --------------------------------------------------------------------------

    async def query(self, name: str, rdtype: str = "A", *,
                    timeout: float = 5.0) -> dns.message.Message:
        """Ask unbound as harakapy would (:func:`validating_query`) and return the whole
        response: ``rcode()``, ``flags & dns.flags.AD``, ``answer``, EDNS options (EDE).

        :param name: Absolute, or relative to ``test.``.
        :param timeout: Seconds for the answer; loopback answers take milliseconds.
        """
        response = await probe(self.resolver_port, validating_query(name, rdtype), timeout)
        if response is None:
            raise WorldError(f"unbound gave no answer for {name} {rdtype} in {timeout} s\n"
                             + self.unbound_log())
        return response

    def dns_ini(self, **keys: str | float) -> str:
        """``config/dns.ini`` pointing harakapy at this world's unbound, with
        ``dnssec_probe = test.`` (there is no root here). Extra ``[main]`` keys as keywords."""
        settings = {"nameservers": LOOPBACK, "port": self.resolver_port, "timeout": 2,
                    "dnssec_probe": "test.", **keys}
        return "[main]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())

    @property
    def trust_anchor(self) -> str:
        """``test.``'s DS record, the resolver's trust anchor, in presentation form."""
        return f"{ORIGIN} DS {self.key.ds(ORIGIN)}"

    def unbound_log(self, lines: int = 40) -> str:
        """The tail of unbound's log (``val-log-level: 2``: why each answer was bogus), for
        assertion messages: ``assert ..., world.unbound_log()``."""
        if self.unbound is not None:
            return self.unbound.tail(lines)
        return "\n".join(self._final_logs.get("unbound", "").splitlines()[-lines:])

    def nsd_log(self, lines: int = 40) -> str:
        """The tail of NSD's log (zone parse errors show here)."""
        if self.nsd is not None:
            return self.nsd.tail(lines)
        return "\n".join(self._final_logs.get("nsd", "").splitlines()[-lines:])

    # -- zones ---------------------------------------------------------------------------

    def _write_zones(self) -> None:
        """Build, sign and write every zone of this generation, and nsd.conf."""
        self.generation += 1
        now = datetime.datetime.now(datetime.UTC)
        parent = _load(self._zone, ORIGIN)
        zones: dict[dns.name.Name, dns.zone.Zone] = {}
        for children, secure in ((self._insecure, False), (self._signed, True)):
            for text_origin, text in children.items():
                origin = dns.name.from_text(text_origin, origin=dns.name.root)
                if not origin.is_subdomain(ORIGIN) or origin == ORIGIN:
                    raise ValueError(f"child zone {origin} is not below {ORIGIN}")
                child = _load(text, origin)
                self._complete(child)
                self._delegate(parent, child)
                if secure:
                    key = self.child_keys.setdefault(origin, ZoneKey.generate())
                    with parent.writer() as txn:
                        txn.replace(origin, DEFAULT_TTL, key.ds(origin))
                    self._sign(child, key, now)
                zones[origin] = child
        self._complete(parent)
        self._sign(parent, self.key, now)
        zones[ORIGIN] = parent
        self.zones = zones
        for origin, zone in zones.items():
            zone.to_file(str(self._zone_file(origin)), sorted=True, relativize=False)
        self._write_nsd_conf()

    def _complete(self, zone: dns.zone.Zone) -> None:
        """Add what NSD needs and the text may leave out (SOA, apex NS with its address),
        and stamp the SOA serial with this generation, so a poll can tell a restarted NSD
        serves the new zone."""
        origin = zone.origin
        assert origin is not None
        with zone.writer() as txn:
            soa = txn.get(origin, dns.rdatatype.SOA)
            if soa is None:
                text = SOA_TEXT.format(origin=origin)
                rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, text)
                ttl = DEFAULT_TTL
            else:
                rdata, ttl = soa[0], soa.ttl
            txn.replace(origin, ttl, rdata.replace(serial=self.generation))
            if txn.get(origin, dns.rdatatype.NS) is None:
                ns = dns.name.from_text("ns", origin=origin)
                txn.add(origin, DEFAULT_TTL,
                        dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.NS, ns.to_text()))
                if txn.get(ns, dns.rdatatype.A) is None:
                    txn.add(ns, DEFAULT_TTL,
                            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, LOOPBACK))

    def _delegate(self, parent: dns.zone.Zone, child: dns.zone.Zone) -> None:
        """Copy the child's apex NS into the parent, with glue for in-child servers
        (RFC 9471: required glue). The address does not matter to unbound, which reaches
        every child through its own stub-zone (glue carries no port); it matters to NSD,
        which wants glue for in-bailiwick NS targets."""
        origin = child.origin
        assert origin is not None
        ns = child.get_rdataset(origin, dns.rdatatype.NS)
        assert ns is not None
        with parent.writer() as txn:
            txn.replace(origin, ns.ttl, *ns)
            for rdata in ns:
                if not rdata.target.is_subdomain(origin):
                    continue
                for kind in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    glue = child.get_rdataset(rdata.target, kind)
                    if glue is not None:
                        txn.replace(rdata.target, glue.ttl, *glue)

    def _sign(self, zone: dns.zone.Zone, key: ZoneKey, now: datetime.datetime) -> None:
        # dns.dnssec.sign_zone adds the DNSKEY, signs every authoritative RRset (at a cut:
        # only the DS), leaves glue unsigned and builds the NSEC chain over the names it
        # holds, skipping those below cuts; empty non-terminals get no NSEC (RFC 4035
        # §2.3). tests/test_dnssec_world.py proves the chain with secure NXDOMAIN/NODATA.
        dns.dnssec.sign_zone(zone, keys=[(key.private, key.dnskey)], dnskey_ttl=DEFAULT_TTL,
                             inception=now - INCEPTION_BEFORE, expiration=now + VALID_FOR)
        if self._tamper is not None:
            self._tamper(zone)

    def _zone_file(self, origin: dns.name.Name) -> Path:
        return self.directory / f"{origin.to_text(omit_final_dot=True)}.zone"

    # -- daemons -------------------------------------------------------------------------

    def _write_nsd_conf(self) -> None:
        directory = self.directory
        zones = "".join(f'zone:\n    name: "{origin}"\n    zonefile: "{self._zone_file(origin)}"\n'
                        for origin in self.zones)
        (directory / "nsd.conf").write_text(f"""\
server:
    ip-address: {LOOPBACK}@{self.authority_port}
    port: {self.authority_port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{directory}"
    database: ""
    zonelistfile: "{directory}/zone.list"
    xfrdfile: "{directory}/xfrd.state"
    xfrdir: "{directory}"
    pidfile: "{directory}/nsd.pid"
    logfile: "{directory}/nsd.log"
    verbosity: 2
    server-count: 1
remote-control:
    control-enable: no
{zones}""")

    def _write_unbound_conf(self) -> None:
        directory = self.directory
        stubs = "".join(f'stub-zone:\n    name: "{origin}"\n'
                        f"    stub-addr: {LOOPBACK}@{self.authority_port}\n"
                        for origin in self.zones)
        (directory / "unbound.conf").write_text(f"""\
server:
    interface: {LOOPBACK}@{self.resolver_port}
    port: {self.resolver_port}
    outgoing-interface: {LOOPBACK}
    do-ip6: no
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{directory}"
    pidfile: "{directory}/unbound.pid"
    logfile: "{directory}/unbound.log"
    use-syslog: no
    log-time-ascii: yes
    verbosity: 1
    # one line per bogus answer, saying why; and one per SERVFAIL
    val-log-level: 2
    log-servfail: yes
    num-threads: 1
    module-config: "validator iterator"
    # NSD is on loopback, which unbound never asks by default
    do-not-query-localhost: no
    harden-dnssec-stripped: yes
    # nothing outlives its second in the cache: a changed zone is asked afresh
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    val-bogus-ttl: 0
    # RFC 8914 extended errors say why a SERVFAIL was one (DNSSEC Bogus, ...)
    ede: yes
    # test. is one of unbound's default local zones (RFC 6761, always NXDOMAIN)
    local-zone: "test." nodefault
    trust-anchor: "{self.trust_anchor}"
    # no RFC 8145 key-tag or sentinel queries: there is no root here to send them to
    trust-anchor-signaling: no
    root-key-sentinel: no
    qname-minimisation: no
remote-control:
    control-enable: no
{stubs}""")

    async def _start_nsd(self) -> None:
        # A port picked free may be taken before NSD binds it: pick again, a few times.
        for _attempt in range(3):
            self.authority_port = free_dns_port()
            self._write_nsd_conf()
            self.nsd = Daemon("nsd", [self.nsd_binary, "-d", "-c",
                                      str(self.directory / "nsd.conf")],
                              self.directory, self.directory / "nsd.log")
            self.nsd.start()
            try:
                await self._wait_for_nsd()
                return
            except WorldError:
                if self.nsd.exited is None or "Address already in use" not in self.nsd.tail():
                    raise
                await self.nsd.stop()
        raise WorldError("nsd found no free port in 3 tries\n" + self.nsd.tail())

    async def _start_unbound(self) -> None:
        for _attempt in range(3):
            self.resolver_port = free_dns_port()
            self._write_unbound_conf()
            self.unbound = Daemon("unbound", [self.unbound_binary, "-d", "-c",
                                              str(self.directory / "unbound.conf")],
                                  self.directory, self.directory / "unbound.log")
            self.unbound.start()
            try:
                await self._wait_for_unbound()
                return
            except WorldError:
                if (self.unbound.exited is None
                        or "Address already in use" not in self.unbound.tail()):
                    raise
                await self.unbound.stop()
        raise WorldError("unbound found no free port in 3 tries\n" + self.unbound.tail())

    async def _wait_for_nsd(self) -> None:
        """Until NSD answers ``test. SOA`` with this generation's serial."""
        assert self.nsd is not None
        query = dns.message.make_query(ORIGIN, "SOA")

        def ready(response: dns.message.Message) -> bool:
            return (response.rcode() == dns.rcode.NOERROR and bool(response.answer)
                    and response.answer[0][0].serial == self.generation)

        await self._wait(self.nsd, self.authority_port, query, ready)

    async def _wait_for_unbound(self) -> None:
        """Until unbound answers, then check it validates ``test. DNSKEY`` (AD): a world
        whose anchor does not match would fail every test in a way that hides the cause."""
        assert self.unbound is not None
        query = validating_query("test.", "DNSKEY")
        response = await self._wait(self.unbound, self.resolver_port, query, lambda _: True)
        if response.rcode() != dns.rcode.NOERROR or not response.flags & dns.flags.AD:
            raise WorldError(f"unbound does not validate test. DNSKEY against its trust "
                             f"anchor: {dns.rcode.to_text(response.rcode())}, flags "
                             f"{dns.flags.to_text(response.flags)}\n{self.unbound.tail()}")

    async def _wait(self, daemon: Daemon, port: int, query: dns.message.Message,
                    ready: Callable[[dns.message.Message], bool]) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            if daemon.exited is not None:
                raise WorldError(f"{daemon.name} exited with status {daemon.exited} at "
                                 f"start\n{daemon.tail()}")
            response = await probe(port, query)
            if response is not None and ready(response):
                return response
            if loop.time() > deadline:
                raise WorldError(f"{daemon.name} not ready on port {port} after "
                                 f"{START_TIMEOUT} s (last answer: {response})\n{daemon.tail()}")
            # A poll interval, not a guess at readiness: the loop ends on an answer.
            await asyncio.sleep(0.005)
