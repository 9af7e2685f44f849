"""DNS lookups for delivery and policy discovery: MX, A/AAAA, TXT. The only module that
imports dnspython.

Answers come back as plain Python values; failures as our errors, each saying whether it
is the domain's fault (permanent) or the lookup's (temporary), so callers never guess.
Nameservers come from ``config/dns.ini`` (the system's resolv.conf when empty).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from harakapy.config import Config


class DnsError(Exception):
    """A lookup failed for a reason that may pass (timeout, SERVFAIL, refused): retry later.

    :ivar reason: Short text for logs and SMTP replies.
    """

    enhanced = "4.4.3"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoSuchDomain(DnsError):
    """NXDOMAIN: the name does not exist. Permanent."""

    enhanced = "5.1.2"


class Security(enum.StrEnum):
    """What DNSSEC says of an answer (RFC 4035 4.3), as a validating resolver tells it.

    There is no "bogus" or "indeterminate" here: a validating resolver answers those with
    SERVFAIL, which is a :class:`DnsError`, never an insecure answer.
    """

    SECURE = "secure"  # AD set by a resolver whose word we trust
    INSECURE = "insecure"  # provably unsigned, or a resolver we do not trust


@dataclass(frozen=True, slots=True)
class Validated:
    """An answer and its DNSSEC state.

    :ivar records: The records of the type asked for (dnspython rdata), ``()`` for none.
    :ivar security: The state of the whole answer: every CNAME step and the records, or
        the denial.
    :ivar name: The owner of the records: the name asked, or where its CNAMEs led.
    :ivar asked: The name asked (lower-case, no final dot).
    :ivar exists: False for NXDOMAIN.
    """

    records: tuple[Any, ...]
    security: Security
    name: str
    asked: str
    exists: bool = True

    @property
    def secure(self) -> bool:
        return self.security is Security.SECURE

    @property
    def expanded(self) -> bool:
        """CNAMEs led elsewhere."""
        return self.name != self.asked


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Resolver:
    """An async stub resolver.

    :param nameservers: IP addresses to ask; ``None`` or empty for the system's.
    :param port: Their port (53; tests serve DNS on a high port).
    :param timeout: Seconds for a whole lookup, retries included.
    """

    def __init__(self, nameservers: list[str] | None = None, *, port: int = 53,
                 timeout: float = 10.0, trust_ad: bool = False) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.port = port
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 3.0)
        # Ask for DNSSEC validation status (AD bit) from the validating resolver; DANE reads
        # it. EDNS0 so answers larger than 512 bytes need no TCP retry.
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        # The AD bit proves nothing that crossed a network an attacker may sit on: trusted
        # from a resolver on this host, or where config/dns.ini says the path is safe.
        self.nameservers = [str(server) for server in self._resolver.nameservers]
        self.trust_ad = trust_ad or (bool(self.nameservers) and all(
            _is_loopback(server) for server in self.nameservers))

    @classmethod
    def from_config(cls, config: Config) -> Resolver:
        ini = config.ini("dns.ini")
        ini.check_known(config.shipped_ini("dns.ini"))
        servers = ini.get_list("main", "nameservers")
        for server in servers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ini.error("main", "nameservers",
                                f"{server!r} is not an IP address") from None
        return cls(servers, port=ini.get_int("main", "port", 53, minimum=1),
                   timeout=ini.get_float("main", "timeout", 10.0, minimum=0.1),
                   trust_ad=ini.get_bool("main", "trust_ad", False))

    async def validated(self, name: str, rdtype: str) -> Validated:
        """``name``'s records of ``rdtype`` with their DNSSEC state, CNAMEs followed (the
        resolver hands back the chain; its AD bit covers all of it).

        :raises DnsError: SERVFAIL (bogus or indeterminate: the validator says no more),
            a timeout, a refusal. Never an insecure answer.
        """
        with _lookup_errors(name, rdtype):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False,
                                                      raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN as exc:
                responses = list(exc.responses().values())
                authenticated = bool(responses) and all(
                    response.flags & dns.flags.AD for response in responses)
                asked = name.rstrip(".").lower()
                return Validated((), self._security(authenticated), asked, asked,
                                 exists=False)
        authenticated = bool(answer.response.flags & dns.flags.AD)
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        owner = answer.canonical_name.to_text(omit_final_dot=True).lower()
        return Validated(records, self._security(authenticated), owner,
                         name.rstrip(".").lower())

    def _security(self, authenticated: bool) -> Security:
        return Security.SECURE if authenticated and self.trust_ad else Security.INSECURE

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or ``None`` for NODATA (the name exists, no such records)."""
        with _lookup_errors(name, rdtype):
            try:
                return await self._resolver.resolve(name, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                raise NoSuchDomain(f"{name}: no such domain (NXDOMAIN)") from None
            except dns.resolver.NoAnswer:
                return None

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """``[(preference, exchange), ...]`` as published; ``[]`` when the domain has no MX
        records (NODATA). Exchange names are lower-case without the final dot; the null MX
        is ``(0, "")``.

        :raises NoSuchDomain: NXDOMAIN.
        :raises DnsError: the lookup failed; try again later.
        """
        answer = await self._query(domain, "MX")
        if answer is None:
            return []
        return [(record.preference, record.exchange.to_text(omit_final_dot=True).lower()
                 if record.exchange != dns.name.root else "")
                for record in answer]

    async def txt(self, name: str) -> list[str]:
        """The TXT records at ``name`` (CNAMEs followed), each record's strings joined
        without separators (RFC 8461 3.1, RFC 8460 3); ``[]`` when the name has none or
        does not exist. Bytes that are not UTF-8 are replaced, so a hostile record reads
        as an invalid one, never as an error here.

        :raises DnsError: the lookup failed; try again later.
        """
        try:
            answer = await self._query(name, "TXT")
        except NoSuchDomain:
            return []
        if answer is None:
            return []
        return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]

    async def addresses(self, host: str, *, ipv4: bool = True, ipv6: bool = True) -> list[str]:
        """The host's IPv4 then IPv6 addresses (CNAMEs followed); ``[]`` when it has none.

        :raises NoSuchDomain: NXDOMAIN.
        :raises DnsError: a lookup failed; try again later.
        """
        found: list[str] = []
        failure: DnsError | None = None
        for wanted, rdtype in ((ipv4, "A"), (ipv6, "AAAA")):
            if not wanted:
                continue
            try:
                answer = await self._query(host, rdtype)
            except NoSuchDomain:
                raise
            except DnsError as exc:
                # One family failing (servers that mishandle AAAA exist) must not hide
                # the addresses the other found.
                failure = exc
                continue
            if answer is not None:
                found.extend(record.address for record in answer)
        if not found and failure is not None:
            raise failure
        return found


@contextmanager
def _lookup_errors(name: str, rdtype: str) -> Iterator[None]:
    """dnspython's failures as ours; NXDOMAIN and NODATA are the caller's to judge."""
    try:
        yield
    except dns.resolver.NoNameservers as exc:
        raise DnsError(f"{name} {rdtype}: no nameserver answered ({_first_error(exc)})"
                       ) from None
    except dns.exception.Timeout:
        raise DnsError(f"{name} {rdtype}: DNS timeout") from None
    except dns.name.NameTooLong:
        raise NoSuchDomain(f"{name}: name too long") from None
    except dns.exception.DNSException as exc:
        raise DnsError(f"{name} {rdtype}: {exc}") from None


def _first_error(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    for _server, _tcp, _port, error, *_ in errors:
        return str(error)[:120]
    return "SERVFAIL"
