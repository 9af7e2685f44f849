"""DNS lookups for delivery and policy discovery: MX, A/AAAA, TXT. The only module that
imports dnspython.

Answers come back as plain Python values; failures as our errors, each saying whether it
is the domain's fault (permanent) or the lookup's (temporary), so callers never guess.
Nameservers come from ``config/dns.ini`` (the system's resolv.conf when empty).
"""

from __future__ import annotations

import ipaddress

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


class Resolver:
    """An async stub resolver.

    :param nameservers: IP addresses to ask; ``None`` or empty for the system's.
    :param port: Their port (53; tests serve DNS on a high port).
    :param timeout: Seconds for a whole lookup, retries included.
    """

    def __init__(self, nameservers: list[str] | None = None, *, port: int = 53,
                 timeout: float = 10.0) -> None:
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
                   timeout=ini.get_float("main", "timeout", 10.0, minimum=0.1))

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or ``None`` for NODATA (the name exists, no such records)."""
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as exc:
            raise DnsError(f"{name} {rdtype}: no nameserver answered ({_first_error(exc)})"
                           ) from None
        except dns.exception.Timeout:
            raise DnsError(f"{name} {rdtype}: DNS timeout") from None
        except dns.name.NameTooLong:
            raise NoSuchDomain(f"{name}: name too long") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"{name} {rdtype}: {exc}") from None

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


def _first_error(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    for _server, _tcp, _port, error, *_ in errors:
        return str(error)[:120]
    return "SERVFAIL"
