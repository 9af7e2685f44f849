"""``harakapy tls-policy``: the effective TLS policy for a domain, and with ``probe`` what
each MX does when delivery connects to it under that policy.

It asks the same hooks and runs the same connection step as delivery (``next_hops``,
:func:`routes_for`, :class:`Negotiator`), so what it shows is what delivery would do. A
probe sends EHLO, STARTTLS and QUIT: never MAIL FROM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harakapy.dns import DnsError, Resolver
from harakapy.outbound.client import SessionError, SmtpSession
from harakapy.outbound.delivery import Delivery
from harakapy.outbound.mx import MxError, MxHost, next_hops
from harakapy.outbound.negotiate import HostPlan, Negotiator, TlsFailure
from harakapy.outbound.settings import OutboundSettings
from harakapy.outbound.tls_policy import Route, find_policy, routes_for, tls_settings
from harakapy.tls.policy import Level, Policy
from harakapy.tls.results import TlsResult
from harakapy.tls.verify import CertificateFacts

if TYPE_CHECKING:
    from harakapy.outbound.queue import QueueHost


@dataclass
class Probe:
    """One connection to one MX address under the policy."""

    host: str
    ip: str
    port: int
    greeting: str = ""
    ehlo_name: str = ""
    starttls_offered: bool | None = None
    tls_version: str = ""
    cipher: str = ""
    certificate: CertificateFacts | None = None
    verdict: str = ""  # "pass" or "fail"
    result_type: str = ""
    reason: str = ""
    ca_verify: str = ""  # whether "verify" against the CA store would pass, and why not


@dataclass
class Diagnosis:
    domain: str
    policy: str = ""
    level: str = ""
    decided_by: str = ""
    why: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    routed: bool = False
    hosts: list[str] = field(default_factory=list)
    error: str = ""
    probes: list[Probe] = field(default_factory=list)
    # What policy plugins know beyond the policy (the MTA-STS cache entry), as the
    # command that fills it formats it: key to facts, and the lines of text.
    details: dict[str, Any] = field(default_factory=dict)
    next_hops: list[tuple[str, int]] = field(default_factory=list)
    detail_lines: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        facts = dataclasses.asdict(self)
        del facts["detail_lines"]
        return facts


async def diagnose(server: QueueHost, domain: str, *, probe: bool) -> Diagnosis:
    """What the ``tls_policy`` hook decides for ``domain``; with ``probe``, what each MX does.

    Never raises for what the network or DNS does: that goes into the diagnosis.
    """
    domain = domain.strip().rstrip(".").lower()
    settings = server.config.derive("outbound.settings", OutboundSettings.from_config)
    resolver = server.config.derive("outbound.resolver", Resolver.from_config)
    result = Diagnosis(domain)
    try:
        hosts, routed = await next_hops(server.plugins, resolver, domain, port=settings.port,
                                        me=server.me)
    except MxError as exc:
        hosts, routed = [], False
        result.error = exc.reason
    result.routed = routed
    result.next_hops = [(h.hostname, h.port) for h in hosts]
    result.hosts = [f"{h.hostname}:{h.port}" + (f" (MX {h.preference})" if not routed else "")
                    for h in hosts]
    routes = await routes_for(server.plugins, server.config, domain, hosts, routed=routed)
    policy = routes[0].policy if routes else await find_policy(
        server.plugins, server.config, domain, [], routed=False)
    result.policy, result.level = policy.describe(), policy.level.value
    result.decided_by, result.why = policy.decided_by, policy.reason
    result.source = dataclasses.asdict(policy.source)
    if routed:  # each routed next hop has a policy of its own
        result.hosts = [f"{text}: {r.policy.describe()} ({r.policy.decided_by or 'default'})"
                        for text, r in zip(result.hosts, routes, strict=True)]
    if probe:
        for route in routes:
            result.probes += await _probe_host(server, settings, resolver, route)
    return result


async def _probe_host(server: QueueHost, settings: OutboundSettings, resolver: Resolver,
                      route: Route) -> list[Probe]:
    policy, host, nexthop = route.policy, route.host, route.nexthop
    reports: list[TlsResult] = []

    async def collect(report: TlsResult) -> None:
        reports.append(report)

    negotiator = Negotiator(tls_settings(server.config), report=collect)
    delivery = Delivery(settings, resolver, server.me, negotiator)
    try:
        plan = await negotiator.plan(policy, host, nexthop)
    except TlsFailure as exc:
        return [Probe(host.hostname, "", host.port, verdict="fail",
                      result_type=exc.failure.result_type.value, reason=exc.reason)]
    try:
        addresses = await delivery.addresses(host)
    except DnsError as exc:
        return [Probe(host.hostname, "", host.port, verdict="fail",
                      reason=f"no address: {exc.reason}")]
    probes = []
    for ip in addresses:
        found = Probe(host.hostname, ip, host.port)
        reports.clear()
        session = await _connect(delivery, plan, ip, found)
        if session is not None:
            if reports and not reports[-1].success:
                found.verdict = "fail" if reports[-1].enforced else "pass (reported)"
                found.result_type, found.reason = (reports[-1].result_type,
                                                   reports[-1].failure.reason)
            else:
                found.verdict = "pass"
            _describe_session(session, found)
            await session.quit()
        elif reports and not reports[-1].success:
            found.result_type = reports[-1].result_type
            found.reason = reports[-1].failure.reason
            found.verdict = "fail"
            if reports[-1].certificate:
                found.certificate = CertificateFacts.of(reports[-1].certificate)
                found.tls_version = reports[-1].tls_version
        if found.certificate is None and found.starttls_offered is not False:
            # The handshake failed under the policy: look at what the server presents.
            found.certificate = await _presented_certificate(delivery, host, ip, nexthop)
        if found.starttls_offered and plan.level is not Level.VERIFY:
            found.ca_verify = await _would_verify(delivery, host, ip, nexthop)
        probes.append(found)
    return probes


async def _connect(delivery: Delivery, plan: HostPlan, ip: str, found: Probe
                   ) -> SmtpSession | None:
    try:
        session, _key, _pooled = await delivery.open_session(plan, ip, reuse=False)
    except TlsFailure as exc:
        found.starttls_offered = exc.failure.result_type.value != "starttls-not-supported"
        found.verdict, found.reason = "fail", exc.reason
        return None
    except SessionError as exc:
        found.verdict, found.reason = "fail", exc.reason
        return None
    return session


def _describe_session(session: SmtpSession, found: Probe) -> None:
    found.greeting = str(session.greeting or "")
    found.ehlo_name = session.server_name
    ssl_object = session.ssl_object
    found.starttls_offered = ssl_object is not None or session.supports("STARTTLS")
    if ssl_object is not None:
        found.tls_version = session.tls_version
        cipher = ssl_object.cipher()
        found.cipher = cipher[0] if cipher else ""
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            found.certificate = CertificateFacts.of(der)


async def _quiet_session(delivery: Delivery, host: MxHost, ip: str, nexthop: str,
                         level: Level) -> SmtpSession:
    """A session under ``level`` that reports to no one: for looking, not delivering.

    :raises SessionError: as :meth:`Delivery.open_session`.
    """
    quiet = Negotiator(delivery.tls.settings)
    side = Delivery(delivery.settings, delivery.resolver, delivery.me, quiet)
    plan = await quiet.plan(Policy(level), host, nexthop)
    session, _key, _pooled = await side.open_session(plan, ip, reuse=False)
    return session


async def _presented_certificate(delivery: Delivery, host: MxHost, ip: str,
                                 nexthop: str) -> CertificateFacts | None:
    """The server's certificate, from a handshake that checks nothing (level may)."""
    try:
        session = await _quiet_session(delivery, host, ip, nexthop, Level.MAY)
    except SessionError:
        return None
    ssl_object = session.ssl_object
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    await session.quit()
    return CertificateFacts.of(der) if der else None


async def _would_verify(delivery: Delivery, host: MxHost, ip: str, nexthop: str) -> str:
    """Whether level ``verify`` would pass against the CA store."""
    try:
        session = await _quiet_session(delivery, host, ip, nexthop, Level.VERIFY)
    except TlsFailure as exc:
        return f"no: {exc.failure.result_type.value}: {exc.reason}"
    except SessionError as exc:
        return f"unknown: {exc.reason}"
    await session.quit()
    return "yes"


def format_text(result: Diagnosis) -> str:
    """The diagnosis as an operator pastes it into a ticket."""
    lines = [f"domain:      {result.domain}",
             f"policy:      {result.policy}",
             f"decided by:  {result.decided_by or '(no plugin: the default)'}",
             f"why:         {result.why or '-'}",
             f"report as:   policy-type {result.source.get('type')}"
             + (f", policy-domain {result.source['domain']}" if result.source.get("domain")
                else "")]
    lines += result.detail_lines
    if result.error:
        lines.append(f"next hops:   none: {result.error}")
    else:
        label = "route" if result.routed else "MX hosts"
        lines.append(f"{label + ':':<12} {', '.join(result.hosts) or '-'}")
    for probe in result.probes:
        lines += ["", f"probe {probe.host} [{probe.ip or '-'}]:{probe.port}"]
        if probe.greeting:
            lines.append(f"  greeting:    {probe.greeting}")
        if probe.ehlo_name:
            lines.append(f"  EHLO name:   {probe.ehlo_name}")
        if probe.starttls_offered is not None:
            lines.append(f"  STARTTLS:    {'offered' if probe.starttls_offered else 'NOT offered'}")
        if probe.tls_version:
            lines.append(f"  TLS:         {probe.tls_version} {probe.cipher}".rstrip())
        cert = probe.certificate
        if cert is not None:
            lines += [f"  certificate: {cert.subject or '(empty subject)'}",
                      f"    issuer:    {cert.issuer}",
                      f"    names:     {', '.join(cert.names) or '(no DNS names)'}",
                      f"    valid:     {cert.not_before} to {cert.not_after}",
                      f"    sha256:    {cert.sha256}",
                      f"    key sha256: {cert.spki_sha256}"]
        verdict = probe.verdict.upper()
        if probe.result_type:
            verdict += f" ({probe.result_type})"
        lines.append(f"  policy:      {verdict}" + (f": {probe.reason}" if probe.reason else ""))
        if probe.ca_verify:
            lines.append(f"  would pass verify (CA store): {probe.ca_verify}")
    return "\n".join(lines)
