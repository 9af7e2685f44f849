"""What the ``dane`` plugin does: DANE for SMTP (RFC 7672 section 2) over the DNSSEC state
the validating resolver reports; the certificate checks are ``harakapy.tls.dane``.

Rules (../shared/specs/dane-smtp.md section 2):

1. A destination is a DANE candidate when its MX RRset is secure (a secure denial of MX
   records, for an implicit MX, counts), or when mail is routed to a host of its own.
   An insecure MX RRset is not (its names may be forged) unless ``insecure_mx = dane``;
   a failed MX lookup makes the mail wait. The policy is ``dane`` with the next plugins'
   policy (MTA-STS, the default) as its fallback for MX hosts without TLSA records.
2. Per MX host, TLSA records are looked up only when its addresses are secure. With
   every CNAME step secure, the expanded name is tried first, then the original; else
   only the original. The TLSA base domain is where records were found; it is the SNI
   name and the report's policy domain.
3. A failed TLSA lookup (bogus, SERVFAIL, timeout) makes that MX unusable: never a
   downgrade. A secure denial, or an insecure answer, is no TLSA: the fallback applies.
   Secure records none of which is usable mean TLS without authentication.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from harakapy import metrics
from harakapy.config import Config
from harakapy.dns import DnsError, Resolver, Validated
from harakapy.outbound.mx import MxHost
from harakapy.outbound.tls_policy import PolicyLookupError
from harakapy.results import Result, denysoft
from harakapy.tls import dane as checks
from harakapy.tls.policy import Level, Policy, PolicySource, TlsaLookup, TlsaRecord
from harakapy.tls.results import Failure, ResultType

log = logging.getLogger("harakapy.dane")

INSECURE_MX = ("off", "dane")


@dataclass(frozen=True, slots=True)
class DaneSettings:
    """``config/dane.ini``.

    :ivar insecure_mx: ``dane``: secure TLSA records of MX hosts named by an insecure MX
        RRset are honoured too (Postfix's ``smtp_tls_dane_insecure_mx_policy = dane``);
        ``off``: such destinations are not DANE candidates.
    :ivar probe: A name whose DNSKEY records the resolver must validate (the check at
        start, ``[main] dnssec_probe`` of ``dns.ini``).
    """

    insecure_mx: str = "off"
    probe: str = "."

    @classmethod
    def from_config(cls, config: Config) -> DaneSettings:
        ini = config.ini("dane.ini")
        ini.check_known(config.shipped_ini("dane.ini"))
        insecure_mx = ini.get_str("main", "insecure_mx", "off").lower()
        if insecure_mx not in INSECURE_MX:
            raise ini.error("main", "insecure_mx", "expected off or dane")
        dns_ini = config.ini("dns.ini")
        return cls(insecure_mx, dns_ini.get_str("main", "dnssec_probe", ".") or ".")


@dataclass(frozen=True, slots=True)
class HostLookup:
    """What :meth:`Dane.lookup` found for one MX, beyond the records: for the CLI."""

    hostname: str
    addresses: str  # "secure", "insecure" or the failure
    candidates: tuple[str, ...]
    tlsa: TlsaLookup
    answer: str = ""  # no records: "secure denial" or "insecure answer"


class Dane:
    """The DANE authority (``DaneAuthority``) and the ``tls_policy`` answer.

    :param resolver: A resolver whose AD bit is trusted (``Resolver.trust_ad``).
    :param settings: ``config/dane.ini``.
    """

    def __init__(self, resolver: Resolver, settings: DaneSettings) -> None:
        self.resolver = resolver
        self.settings = settings
        # What the lookups and checks found, per MX host, kept only where ``keep_facts``
        # is set (harakapy tls-policy): a server would keep every destination forever.
        self.keep_facts = False
        self.seen: dict[str, HostLookup] = {}
        self.matched: dict[str, str] = {}
        self.mx_seen: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver) -> Dane:
        return cls(resolver, config.derive("dane.settings", DaneSettings.from_config))

    @staticmethod
    def check_config(config: Config) -> DaneSettings:
        return config.derive("dane.settings", DaneSettings.from_config)

    # -- at start ----------------------------------------------------------------------------

    async def validation_problem(self) -> str:
        """Why the resolver cannot serve DANE, in one line; empty when it can."""
        servers = ", ".join(self.resolver.nameservers) or "the system's resolvers"
        if not self.resolver.trust_ad:
            return (f"DANE is on, but the resolver ({servers}) is not on a loopback address "
                    f"and [main] trust_ad in config/dns.ini is off: its DNSSEC answers are "
                    f"not trusted, and no destination gets DANE")
        probe = self.settings.probe
        try:
            answer = await self.resolver.validated(probe, "DNSKEY")
        except DnsError as exc:
            return (f"DANE is on, but the resolver ({servers}) could not be asked for the "
                    f"DNSKEY of {probe!r} ({exc.reason}): while this lasts, mail waits, "
                    f"since delivery asks the same resolver")
        if not answer.secure:
            return (f"DANE is on, but the resolver ({servers}) does not validate DNSSEC (no "
                    f"AD bit on the DNSKEY of {probe!r}): no destination gets DANE; run a "
                    f"validating resolver such as unbound (docs/plugins/dane.md)")
        return ""

    # -- the policy -----------------------------------------------------------------------------

    async def tls_policy(self, domain: str, hosts: list[MxHost], *, routed: bool,
                         next_policy: Callable[[], Awaitable[Policy]]
                         ) -> Policy | Result | None:
        """Rule 1."""
        if not self.resolver.trust_ad or any(_is_address(host.hostname) for host in hosts):
            return None  # nothing to validate; an address has no TLSA records
        if not routed:
            try:
                mx = await self.resolver.validated(domain, "MX")
            except DnsError as exc:
                metrics.dnssec("MX", "failed")
                self._note_mx(domain, exc.reason)
                return denysoft(f"the DNSSEC state of the MX records of {domain} is not "
                                f"known: {exc.reason}", enhanced="4.7.5")
            metrics.dnssec("MX", mx.security.value)
            self._note_mx(domain, mx.security.value)
            if not mx.secure and self.settings.insecure_mx != "dane":
                return None
            how = "secure MX records" if mx.secure else "insecure MX records, insecure_mx = dane"
        else:
            how = f"routed to {hosts[0].hostname}" if hosts else "routed"
        try:
            fallback = await next_policy()
        except PolicyLookupError as exc:
            return denysoft(str(exc), enhanced="4.7.0")  # the real reason, not "dane failed"
        return Policy(Level.DANE, dane=self, fallback=fallback,
                      source=PolicySource("tlsa", domain),
                      reason=f"DANE ({how}); without TLSA records: {fallback.describe()}")

    # -- the authority ----------------------------------------------------------------------------

    async def destination_failure(self, domain: str) -> Failure | None:
        """Why mandatory DANE (``dane-only``) cannot trust ``domain``'s MX hosts: its MX
        RRset is not secure, or its state is not known; ``None`` when it is secure."""
        try:
            mx = await self.resolver.validated(domain, "MX")
        except DnsError as exc:
            return Failure(ResultType.DNSSEC_INVALID, exc.reason, "mx-lookup-failed")
        if not mx.secure:
            return Failure(ResultType.DANE_REQUIRED,
                           f"the MX records of {domain} are not DNSSEC-signed",
                           "insecure-mx")
        return None

    async def lookup(self, hostname: str, port: int) -> TlsaLookup:
        """Rules 2 and 3 for one MX host."""
        found = await self.host_lookup(hostname, port)
        return found.tlsa

    async def host_lookup(self, hostname: str, port: int) -> HostLookup:
        name = hostname.strip("[]").rstrip(".").lower()
        if _is_address(name):
            return HostLookup(name, "an address", (), TlsaLookup())
        try:
            addresses = await self.resolver.validated(name, "A")
            if not addresses.records:
                addresses = await self.resolver.validated(name, "AAAA")
        except DnsError as exc:
            metrics.dnssec("A", "failed")
            return self._note(HostLookup(name, exc.reason, (), TlsaLookup(failure=Failure(
                ResultType.DNSSEC_INVALID, exc.reason, "address-lookup-failed"))))
        metrics.dnssec("A", addresses.security.value)
        if not addresses.secure:
            return self._note(HostLookup(name, "insecure", (), TlsaLookup()))
        candidates = _candidates(name, addresses)
        answers = []
        for base in candidates:
            owner = f"_{port}._tcp.{base}"
            try:
                answer = await self.resolver.validated(owner, "TLSA")
            except DnsError as exc:
                metrics.dnssec("TLSA", "failed")
                return self._note(HostLookup(name, "secure", candidates, TlsaLookup(
                    base_domain=base, failure=Failure(
                        ResultType.DNSSEC_INVALID, exc.reason, "tlsa-lookup-failed"))))
            metrics.dnssec("TLSA", answer.security.value)
            if not answer.secure or not answer.records:
                answers.append("secure denial" if answer.secure else "insecure answer")
                continue  # no TLSA here
            records = tuple(TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert))
                            for r in answer.records)
            usable = checks.usable_records(records)
            return self._note(HostLookup(name, "secure", candidates, TlsaLookup(
                records=usable or records, base_domain=base, unusable=not usable)))
        return self._note(HostLookup(name, "secure", candidates, TlsaLookup(),
                                     " then ".join(answers)))

    def verify(self, lookup: TlsaLookup, chain: Sequence[bytes], hostname: str,
               nexthop: str) -> Failure | None:
        """The chain against the records (``harakapy.tls.dane``)."""
        references = [lookup.base_domain or hostname, hostname, nexthop]
        outcome = checks.verify_chain(lookup.records, chain, references)
        if isinstance(outcome, Failure):
            return outcome
        if self.keep_facts:
            self.matched[hostname] = f"{outcome.record} (certificate at depth {outcome.depth})"
        return None

    def _note(self, found: HostLookup) -> HostLookup:
        if self.keep_facts:
            self.seen[found.hostname] = found
        return found

    def _note_mx(self, domain: str, state: str) -> None:
        if self.keep_facts:
            self.mx_seen[domain] = state


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _candidates(name: str, addresses: Validated) -> tuple[str, ...]:
    """Rule 2: the expanded name first when every step was secure, then the original."""
    if addresses.expanded and addresses.secure:
        return (addresses.name, name)
    return (name,)


async def describe(dane: Dane, domain: str, hosts: Sequence[tuple[str, int]]
                   ) -> dict[str, object]:
    """The DNSSEC state of each lookup and the TLSA records, for ``harakapy tls-policy``:
    what the last lookups found, looked up now where they were not made."""
    found = []
    for hostname, port in hosts:
        name = hostname.strip("[]").rstrip(".").lower()
        host = dane.seen.get(name) or await dane.host_lookup(name, port)
        tlsa = host.tlsa
        found.append({
            "host": host.hostname,
            "addresses": host.addresses,
            "candidates": list(host.candidates),
            "base_domain": tlsa.base_domain,
            "records": [str(record) for record in tlsa.records],
            "unusable": tlsa.unusable,
            "failure": tlsa.failure.reason if tlsa.failure else "",
            "answer": host.answer,
            "matched": dane.matched.get(hostname, dane.matched.get(name, "")),
        })
    return {"mx_records": dane.mx_seen.get(domain, ""), "hosts": found}


def format_description(facts: dict[str, object]) -> list[str]:
    lines = []
    if facts["mx_records"]:
        lines.append(f"DNSSEC:      MX records {facts['mx_records']}")
    for host in facts["hosts"]:  # type: ignore[attr-defined]
        if host["failure"]:
            state = f"TLSA lookup FAILED: {host['failure']}"
        elif host["records"]:
            state = (f"TLSA at {host['base_domain']}" +
                     (" (none usable: TLS without authentication)" if host["unusable"]
                      else ""))
        elif host["addresses"] == "secure":
            state = (f"no TLSA records ({host['answer']}): the fallback policy, or at "
                     f"dane-only no delivery")
        else:
            state = f"addresses {host['addresses']}: no DANE"
        lines.append(f"DANE:        {host['host']}: {state}")
        lines += [f"               {record}" for record in host["records"]]
        if host["matched"]:
            lines.append(f"               matched: {host['matched']}")
    return lines

