"""mta_sts: MTA-STS (RFC 8461): a domain's published demand for authenticated TLS.

For mail to a domain that publishes ``_mta-sts.<domain>`` and a policy at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``, the policy decides: in ``enforce``
mode only MX hosts matching its ``mx`` patterns are used, over STARTTLS with a trusted
certificate naming the MX host, or the mail waits; in ``testing`` mode every failure is
reported to ``tls_result`` and the mail goes on as usual. Policies are cached in
``DIR/state/mta_sts/policies.sqlite`` (shared by the workers), refreshed before they
expire while mail goes to the domain, and never dropped because the policy host or DNS
is down.

Listed after ``dane`` (RFC 8461 section 2: MTA-STS must not override DANE) and after
your own entries in ``config/tls_policy``. ``harakapy mta-sts list|refresh|publish`` and
``harakapy tls-policy DOMAIN`` show and steer the cache.

Settings: config/mta_sts.ini   Docs: docs/plugins/mta_sts.md
"""

from __future__ import annotations

from harakapy import MtaSts, Server, background, checked_config, hookimpl

startup, config_reload = checked_config("mta_sts.checked", MtaSts.check_config)


def _mta_sts(server: Server) -> MtaSts:
    return server.config.derive(
        "mta_sts.service", lambda config: MtaSts.from_config(config, server.dns, server.clock))


@hookimpl
async def tls_policy(domain, hosts, routed, message, server):
    async def next_policy():
        return await server.next_policy(domain, hosts, routed=routed, message=message)

    return await _mta_sts(server).tls_policy(domain, hosts, routed=routed, message=message,
                                             next_policy=next_policy)


@background
async def refresh(server):
    """Renew the policies mail went to lately, before they expire."""
    await _mta_sts(server).run_refresh()


@background
async def publish(server):
    """Serve our own policies over HTTPS when config/mta_sts.ini [listen] says so."""
    await _mta_sts(server).serve()
