"""Which hosts to try for a domain, in which order (RFC 5321 5.1, RFC 7505).

:func:`order_mx` is pure: preference order, random among equals, the null MX, our own host
in the list. :func:`resolve` adds the DNS lookups and maps their failures to permanent or
temporary ones. :func:`next_hops` asks ``get_mx`` plugins first. None of them knows about
connections or TLS.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harakapy.dns import DnsError, NoSuchDomain, Resolver
from harakapy.results import Result

if TYPE_CHECKING:
    from harakapy.dispatch import HookCaller
    from harakapy.spool.store import QueuedMessage


@dataclass(frozen=True, slots=True)
class MxHost:
    """One next hop: a host name (or IP literal) to connect to.

    :param hostname: The MX exchange, lower-case, no final dot.
    :param preference: Its MX preference (0 for an implicit MX or a route).
    :param port: TCP port (25 unless ``[main] port`` or a route says otherwise).
    :param lmtp: Speak LMTP (RFC 2033) instead of SMTP: for local backends.
    :param implicit: True when the domain had no MX and this is the domain itself.
    """

    hostname: str
    preference: int = 0
    port: int = 25
    lmtp: bool = False
    implicit: bool = False

    def __str__(self) -> str:
        return f"{self.hostname}:{self.port}"


class MxError(Exception):
    """No host can take mail for the domain. ``permanent`` ones bounce at once.

    :ivar enhanced: RFC 3463 status for the DSN or deferral.
    """

    def __init__(self, reason: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.enhanced = enhanced


def order_mx(records: Iterable[tuple[int, str]], *, domain: str, port: int,
             me: Iterable[str] = (), rng: random.Random | None = None) -> list[MxHost]:
    """Order MX records for trying.

    :param records: ``(preference, exchange)`` as from :meth:`Resolver.mx`; empty for none.
    :param domain: The recipient domain (the implicit MX when ``records`` is empty).
    :param port: The port to use for every host.
    :param me: Our own host names: they and every worse preference are dropped (RFC 5321
        5.1), so mail is never sent round in a loop.
    :raises MxError: null MX (5.1.10), or only ourselves left (5.4.6).
    """
    rng = rng or random.SystemRandom()
    records = list(records)
    if not records:
        return [MxHost(domain, 0, port, implicit=True)]
    if len(records) == 1 and records[0][1] == "":
        raise MxError(f"{domain} accepts no mail (null MX, RFC 7505)", permanent=True,
                      enhanced="5.1.10")
    # A null MX mixed with real ones breaks RFC 7505 section 3: ignore the "." entry.
    records = [(pref, host) for pref, host in records if host]
    ours = {name.lower().rstrip(".") for name in me}
    own = [pref for pref, host in records if host in ours]
    if own:
        records = [(pref, host) for pref, host in records if pref < min(own)]
        if not records:
            raise MxError(f"MX for {domain} points back to this host (mail loop)",
                          permanent=True, enhanced="5.4.6")
    by_preference: dict[int, list[str]] = {}
    for pref, host in records:
        by_preference.setdefault(pref, []).append(host)
    ordered = []
    for pref in sorted(by_preference):
        hosts = sorted(set(by_preference[pref]))
        rng.shuffle(hosts)  # RFC 5321 5.1: MUST randomise among equal preferences
        ordered.extend(MxHost(host, pref, port) for host in hosts)
    return ordered


async def resolve(resolver: Resolver, domain: str, *, port: int,
                  me: Iterable[str] = ()) -> list[MxHost]:
    """The hosts to try for ``domain``, best first.

    :raises MxError: permanent for NXDOMAIN (5.1.2) and null MX (5.1.10); temporary
        (4.4.3) when DNS failed, which defers the mail and never guesses.
    """
    try:
        records = await resolver.mx(domain)
    except NoSuchDomain as exc:
        raise MxError(exc.reason, permanent=True, enhanced="5.1.2") from None
    except DnsError as exc:
        raise MxError(exc.reason, permanent=False, enhanced="4.4.3") from None
    return order_mx(records, domain=domain, port=port, me=me)


async def next_hops(hooks: HookCaller, resolver: Resolver, domain: str, *, port: int,
                    me: str, message: QueuedMessage | None = None
                    ) -> tuple[list[MxHost], bool]:
    """The hosts to try for ``domain``, and whether a ``get_mx`` plugin routed them.

    :param hooks: The plugin manager, for ``get_mx``.
    :param me: Our own host name (an MX pointing at it ends the list).
    :raises MxError: no host (null MX, no such domain), or a plugin or DNS failure.
    """
    answer = await hooks.call_first("get_mx", message=message, domain=domain)
    if isinstance(answer, Result):  # a plugin failed: never guess a route
        raise MxError(f"get_mx plugin failed for {domain}", permanent=False,
                      enhanced="4.3.0")
    if answer is not None:
        return _routes(answer, port), True
    return await resolve(resolver, domain, port=port, me=[me]), False


def _routes(answer: object, port: int) -> list[MxHost]:
    """A ``get_mx`` answer as hosts: an MxHost, ``"host"``, ``"host:port"``, or a list."""
    items = answer if isinstance(answer, list | tuple) else [answer]
    hosts = []
    for item in items:
        if isinstance(item, MxHost):
            hosts.append(item)
        elif isinstance(item, str):
            hosts.append(_parse_route(item, port))
        else:
            raise MxError(f"get_mx returned {item!r}", permanent=False, enhanced="4.3.0")
    return hosts


def _parse_route(text: str, port: int) -> MxHost:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        number = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
    else:
        host, number = text, ""
    if number and not (number.isdigit() and 0 < int(number) <= 65535):
        raise MxError(f"get_mx returned a bad port in {text!r}", permanent=False,
                      enhanced="4.3.0")
    return MxHost(host, 0, int(number) if number else port)
