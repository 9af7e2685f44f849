"""REQUIRETLS and ``TLS-Required: No`` (RFC 8689) in delivery: the engine's last word on
a destination's TLS policy for one message, after every ``tls_policy`` plugin spoke.

Rules (../shared/specs/requiretls.md; docs/requiretls.md for operators):

1. A message with REQUIRETLS goes to a destination only when its MX hosts can be trusted:
   the MX RRset is DNSSEC-secure (a secure denial, for an implicit MX, counts), or an
   MTA-STS policy of the next hop lists the host among its ``mx`` patterns (a ``testing``
   policy counts, enforced for this message), or a ``get_mx`` plugin routed the mail to
   a host the operator named. Neither: 5.7.30 at once, since waiting cannot help.
2. Every host's policy is raised to at least ``verify`` (a trusted chain naming the MX
   host); ``secure`` and DANE stand where they apply. It is enforced, needs
   ``REQUIRETLS`` in the EHLO reply after STARTTLS, and passes it on ``MAIL FROM``. No
   plugin's answer lowers it: this runs after them all.
3. A host that cannot give validated TLS with REQUIRETLS (no STARTTLS, a failed
   handshake or certificate, no ``REQUIRETLS`` after STARTTLS) gets QUIT and the next
   host is tried; when none is left the sender gets a notice at once (5.7.10, or 5.7.30
   for REQUIRETLS not offered), as Postfix and mox do. Hosts that cannot be reached and
   DNS failures are retried, as for any mail.
4. Routed to a loopback address or ``localhost`` (a backend on this machine, as
   ``queue/smtp_forward`` has it), the mail never leaves the host: exempt, unless
   ``[main] loopback = enforce``.
5. ``TLS-Required: No`` (every such header field, and no REQUIRETLS): the recipients'
   own policies (MTA-STS and DANE, policy types ``sts`` and ``tlsa``) only report for
   this message, which goes on with opportunistic TLS; the operator's ``tls_policy``
   and ``tls_pin`` entries stand unless ``operator_policy = relax``. Off with
   ``[tls_required] honour = no``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harakapy.config import Config
from harakapy.dns import DnsError, Resolver
from harakapy.outbound.tls_policy import PolicyLookupError, Route, find_policy, routes_for
from harakapy.tls.mta_sts import STS
from harakapy.tls.policy import Level, Policy

if TYPE_CHECKING:
    from harakapy.dispatch import HookCaller
    from harakapy.outbound.mx import MxHost
    from harakapy.spool.store import QueuedMessage

log = logging.getLogger("harakapy.outbound")

EXTENSION = "REQUIRETLS"
NOT_SUPPORTED = "5.7.30"  # RFC 8689 7: REQUIRETLS support required
ENCRYPTION_NEEDED = "5.7.10"  # RFC 3463 X.7.10: no validated TLS could be had
REQUIRETLS_STATUSES = (NOT_SUPPORTED, ENCRYPTION_NEEDED)
RECIPIENT_POLICIES = (STS, "tlsa")  # what a recipient domain publishes


@dataclass(frozen=True, slots=True)
class RequireTlsSettings:
    """``config/requiretls.ini``.

    :ivar offer: List ``REQUIRETLS`` in the EHLO reply of TLS sessions.
    :ivar loopback_exempt: Rule 4.
    :ivar honour_opt_out: Rule 5 at all.
    :ivar relax_operator: Rule 5 also for the operator's own entries (Postfix does).
    :ivar redact_notices: A notice about a REQUIRETLS message that cannot go back with
        REQUIRETLS is sent once more without it and without the original header; else
        it is dropped (logged).
    """

    offer: bool = True
    loopback_exempt: bool = True
    honour_opt_out: bool = True
    relax_operator: bool = False
    redact_notices: bool = True

    @classmethod
    def from_config(cls, config: Config) -> RequireTlsSettings:
        ini = config.ini("requiretls.ini")
        ini.check_known(config.shipped_ini("requiretls.ini"))
        choices = {("main", "loopback"): ("exempt", "enforce"),
                   ("tls_required", "operator_policy"): ("keep", "relax"),
                   ("notices", "fallback"): ("redacted", "drop")}
        chosen = {}
        for (section, key), allowed in choices.items():
            value = ini.get_str(section, key, allowed[0]).strip().lower()
            if value not in allowed:
                raise ini.error(section, key, f"expected {' or '.join(allowed)}")
            chosen[key] = value
        return cls(offer=ini.get_bool("main", "offer", True),
                   loopback_exempt=chosen["loopback"] == "exempt",
                   honour_opt_out=ini.get_bool("tls_required", "honour", True),
                   relax_operator=chosen["operator_policy"] == "relax",
                   redact_notices=chosen["fallback"] == "redacted")


def requiretls_settings(config: Config) -> RequireTlsSettings:
    return config.derive("requiretls.settings", RequireTlsSettings.from_config)


class RequireTlsRefused(Exception):
    """Rule 1: no host of the destination can satisfy REQUIRETLS; the recipients bounce
    now.

    :ivar status: The RFC 3463 code for the notice.
    :ivar why: A token for the delivery log (``!requiretls:<why>``).
    """

    def __init__(self, status: str, why: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.why = why
        self.reason = reason


_TLS_REQUIRED = re.compile(rb"(?im)^tls-required[ \t]*:(.*(?:\r?\n[ \t].*)*)")


def opts_out(message: bytes) -> bool:
    """Whether the header says ``TLS-Required: No`` in every field that names it (one at
    least); RFC 8689 3 defines no other value, and case does not matter."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    if b"tls-required" not in head.lower():
        return False
    values = [b" ".join(match.group(1).split()).lower()
              for match in _TLS_REQUIRED.finditer(head)]
    return bool(values) and all(value == b"no" for value in values)


async def routes(hooks: HookCaller, config: Config, resolver: Resolver, domain: str,
                 hosts: list[MxHost], *, routed: bool, message: QueuedMessage
                 ) -> list[Route]:
    """Each host with the policy it must meet for ``message`` (rules 1, 2, 4 and 5).

    :raises PolicyLookupError: a plugin failed, or the MX records' DNSSEC state is not
        known: the mail waits.
    :raises RequireTlsRefused: rule 1.
    """
    settings = requiretls_settings(config)
    if message.requiretls:
        if routed and settings.loopback_exempt and all(_on_this_host(h) for h in hosts):
            log.info("%s: REQUIRETLS: routed to this machine (%s): exempt", message.id,
                     ", ".join(h.hostname for h in hosts))
            return await routes_for(hooks, config, domain, hosts, routed=True,
                                    message=message)
        return await _required(hooks, config, resolver, domain, hosts, routed=routed,
                               message=message)
    if message.tls_optional and settings.honour_opt_out:
        return await _opted_out(hooks, config, domain, hosts, routed=routed,
                                message=message, operator=settings.relax_operator)
    return await routes_for(hooks, config, domain, hosts, routed=routed, message=message)


# -- REQUIRETLS ------------------------------------------------------------------------------


async def _required(hooks: HookCaller, config: Config, resolver: Resolver, domain: str,
                    hosts: list[MxHost], *, routed: bool, message: QueuedMessage
                    ) -> list[Route]:
    found = await routes_for(hooks, config, domain, hosts, routed=routed, message=message)
    if routed:
        return [replace(route, policy=required(route.policy)) for route in found]
    policy = found[0].policy if found else Policy(Level.VERIFY)
    if await _mx_secure(resolver, domain):
        return [replace(route, policy=required(policy)) for route in found]
    patterns = await _sts_patterns(hooks, config, domain, hosts, message, policy)
    if not patterns:
        raise RequireTlsRefused(
            NOT_SUPPORTED, "untrusted-mx",
            f"REQUIRETLS: the MX hosts of {domain} cannot be trusted: its MX records are "
            f"not DNSSEC-signed and it has no MTA-STS policy")
    return [replace(route, policy=required(policy, patterns)) for route in found]


def required(policy: Policy, mx_patterns: tuple[str, ...] = ()) -> Policy:
    """Rule 2: ``policy`` raised to what REQUIRETLS demands of a host."""
    level, match, pins, fallback = policy.level, policy.match, policy.pins, None
    if level in (Level.DANE, Level.DANE_ONLY):
        # Hosts without usable TLSA records need a trusted chain instead.
        fallback = required(policy.fallback or Policy(Level.VERIFY), mx_patterns)
    elif level not in (Level.VERIFY, Level.SECURE):
        level, match, pins = Level.VERIFY, (), ()
    return replace(
        policy, level=level, match=match, pins=pins, enforce=True,
        mx_patterns=policy.mx_patterns or mx_patterns, fallback=fallback, requiretls=True,
        waived="", required_extensions=_plus(policy.required_extensions, EXTENSION),
        mail_parameters=_plus(policy.mail_parameters, EXTENSION),
        reason=f"REQUIRETLS over {policy.describe()} ({policy.reason or 'the default'})")


def _plus(names: tuple[str, ...], name: str) -> tuple[str, ...]:
    return names if name in names else (*names, name)


async def _mx_secure(resolver: Resolver, domain: str) -> bool:
    """Whether ``domain``'s MX RRset (or its secure denial) is DNSSEC-secure.

    :raises PolicyLookupError: the validating resolver failed (bogus, SERVFAIL).
    """
    if not resolver.trust_ad:
        return False
    try:
        answer = await resolver.validated(domain, "MX")
    except DnsError as exc:
        raise PolicyLookupError(f"REQUIRETLS: the DNSSEC state of the MX records of "
                                f"{domain} is not known: {exc.reason}") from None
    return answer.secure


async def _sts_patterns(hooks: HookCaller, config: Config, domain: str,
                        hosts: list[MxHost], message: QueuedMessage, policy: Policy
                        ) -> tuple[str, ...]:
    """The ``mx`` patterns of an MTA-STS policy for ``domain``: the one the plugins chose
    (or DANE's fallback), else one the plugins after the decider give (the operator's
    table may have answered first)."""
    while True:
        for candidate in (policy, policy.fallback):
            if candidate is not None and candidate.source.type == STS and \
                    candidate.mx_patterns:
                return candidate.mx_patterns
        if not policy.decided_by:
            return ()
        policy = await find_policy(hooks, config, domain, hosts, routed=False,
                                   message=message, after=policy.decided_by)


def _on_this_host(host: MxHost) -> bool:
    name = host.hostname.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- TLS-Required: No (rule 5) -------------------------------------------------------------


async def _opted_out(hooks: HookCaller, config: Config, domain: str, hosts: list[MxHost],
                     *, routed: bool, message: QueuedMessage, operator: bool
                     ) -> list[Route]:
    waived = f"{message.id}: TLS-Required: No"
    try:
        found = await routes_for(hooks, config, domain, hosts, routed=routed,
                                 message=message)
    except PolicyLookupError as exc:
        if not operator:
            raise  # it may be the operator's own plugin that failed: that policy stands
        # Every policy is waived, and so is the one that could not be found.
        log.info("%s: delivered without waiting for the TLS policy of %s (%s)", waived,
                 domain, exc)
        policy = Policy(Level.MAY, waived=waived, reason=f"TLS-Required: No ({exc})")
        return [Route(host, policy, host.hostname.strip("[]") if routed else domain)
                for host in hosts]
    return [replace(route, policy=relaxed(route.policy, waived, operator=operator))
            for route in found]


def relaxed(policy: Policy, waived: str, *, operator: bool) -> Policy:
    """Rule 5: ``policy`` as report-only, when it is the recipient's (or ``operator``)."""
    fallback = relaxed(policy.fallback, waived, operator=operator) \
        if policy.fallback is not None else None
    if policy.source.type not in RECIPIENT_POLICIES and not operator:
        return policy if fallback is policy.fallback else replace(policy, fallback=fallback)
    if policy.level in (Level.NONE, Level.MAY) and fallback is None:
        return policy
    return replace(policy, enforce=False, waived=waived, fallback=fallback,
                   reason=f"{policy.reason}; report only: TLS-Required: No")
