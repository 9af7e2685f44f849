"""Which TLS policy applies to a destination: the ``tls_policy`` hook, then the default.

Shared by the queue runner and ``harakapy tls-policy``, so that what the command shows is
what delivery does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harakapy.results import PLUGIN_FAILED, Result
from harakapy.tls.policy import Level, Policy
from harakapy.tls.settings import TlsSettings

if TYPE_CHECKING:
    from harakapy.config import Config
    from harakapy.dispatch import HookCaller
    from harakapy.outbound.mx import MxHost
    from harakapy.spool.store import QueuedMessage


@dataclass(frozen=True, slots=True)
class Route:
    """One host to try, with the policy it must meet.

    :ivar nexthop: The next hop's name as Postfix means it: the recipient domain for mail
        that went by MX records; the host itself for routed mail (``secure``'s ``nexthop``
        match, the policy domain in reports).
    """

    host: MxHost
    policy: Policy
    nexthop: str


class PolicyLookupError(Exception):
    """A ``tls_policy`` plugin failed: the mail waits (4.7.0), it is never sent under a
    weaker policy."""


def tls_settings(config: Config) -> TlsSettings:
    return config.derive("tls.outbound", TlsSettings.from_config)


async def find_policy(hooks: HookCaller, config: Config, domain: str, hosts: list[MxHost], *,
                      routed: bool, message: QueuedMessage | None = None,
                      after: str = "") -> Policy:
    """The policy for ``domain``, with ``decided_by`` naming the plugin that chose it.

    :param hooks: The plugin manager.
    :param config: For ``[outbound] default_level``.
    :param after: Ask only the plugins after this one in ``config/plugins``: a plugin
        that makes the policy stricter for some messages (REQUIRETLS) asks what the
        others decide, then answers with more.
    :raises PolicyLookupError: a plugin failed (the log has its traceback).
    """
    answer, plugin = await hooks.call_first_named(
        "tls_policy", after=after, domain=domain, hosts=hosts, routed=routed,
        message=message)
    if isinstance(answer, Result):
        # A plugin's own denysoft() says why the mail waits; a plugin that raised has
        # its traceback in the log.
        why = answer.message if answer.message and answer.message != PLUGIN_FAILED else \
            f"plugin {plugin} failed"
        raise PolicyLookupError(f"the TLS policy for {domain} could not be determined "
                                f"({why})")
    if answer is None:
        level = tls_settings(config).default_level
        return Policy(level, reason="[outbound] default_level in config/tls.ini")
    policy = answer.with_decider(plugin)
    if policy.level in (Level.DANE, Level.DANE_ONLY) and policy.dane is None:
        authority, provider = await hooks.call_first_named("dane_authority")
        if isinstance(authority, Result) or (authority is not None and not (
                callable(getattr(authority, "lookup", None))
                and callable(getattr(authority, "verify", None)))):
            raise PolicyLookupError(f"the DANE verifier for {domain} is not available "
                                    f"(plugin {provider} failed, or answered without "
                                    f"lookup() and verify())")
        if authority is not None:
            policy = replace(policy, dane=authority)
    if policy.level is Level.DANE_ONLY and policy.dane is not None and not routed:
        # Mandatory DANE trusts the MX names only when DNSSEC signs them: a forged MX
        # could otherwise name a host in the forger's own signed zone, TLSA and all.
        check = getattr(policy.dane, "destination_failure", None)
        failure = await check(domain) if check is not None else None
        if failure is not None:
            raise PolicyLookupError(f"DANE is required for {domain}, but {failure.reason}")
    return policy


async def routes_for(hooks: HookCaller, config: Config, domain: str, hosts: list[MxHost], *,
                     routed: bool, message: QueuedMessage | None = None) -> list[Route]:
    """Each host with its policy: one policy for a domain's MX hosts; for routed mail, one
    per host, as Postfix looks up each next hop (``[relay-a]`` and ``[relay-b]`` may
    differ).

    :raises PolicyLookupError: a plugin failed.
    """
    if not routed:
        policy = await find_policy(hooks, config, domain, hosts, routed=False,
                                   message=message)
        return [Route(host, policy, domain) for host in hosts]
    return [Route(host, await find_policy(hooks, config, domain, [host], routed=True,
                                          message=message), host.hostname.strip("[]"))
            for host in hosts]
