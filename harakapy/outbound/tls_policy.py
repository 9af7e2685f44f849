"""Which TLS policy applies to a destination: the ``tls_policy`` hook, then the default.

Shared by the queue runner and ``harakapy tls-policy``, so that what the command shows is
what delivery does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harakapy.results import Result
from harakapy.tls.policy import Policy
from harakapy.tls.settings import TlsSettings

if TYPE_CHECKING:
    from harakapy.outbound.mx import MxHost
    from harakapy.server import Server
    from harakapy.spool.store import QueuedMessage


class PolicyLookupError(Exception):
    """A ``tls_policy`` plugin failed: the mail waits (4.7.0), it is never sent under a
    weaker policy."""


def tls_settings(server: Server) -> TlsSettings:
    return server.config.derive("tls.outbound", TlsSettings.from_config)


async def find_policy(server: Server, domain: str, hosts: list[MxHost], *, routed: bool,
                      message: QueuedMessage | None = None) -> Policy:
    """The policy for ``domain``, with ``decided_by`` naming the plugin that chose it.

    :raises PolicyLookupError: a plugin failed (the log has its traceback).
    """
    answer, plugin = await server.plugins.call_first_named(
        "tls_policy", domain=domain, hosts=hosts, routed=routed, message=message,
        server=server)
    if isinstance(answer, Result):
        raise PolicyLookupError(f"the TLS policy for {domain} could not be determined "
                                f"(plugin {plugin} failed)")
    if answer is not None:
        return answer.with_decider(plugin)
    level = tls_settings(server).default_level
    return Policy(level, reason="[outbound] default_level in config/tls.ini")
