"""dane: DANE for SMTP (RFC 7672): TLSA records in DNSSEC-signed zones say which key or
CA an MX host must prove.

For mail to a domain whose MX records are DNSSEC-secure, each MX host with secure TLSA
records must offer STARTTLS and present a certificate those records designate, or it is
not used and the mail waits; a bogus or failed TLSA lookup rules the MX out, never
downgrades it. MX hosts without TLSA records get the policy of the plugins after this
one (mta_sts, then the default). The DNSSEC state comes from the resolvers of
config/dns.ini, which must validate (unbound on 127.0.0.1); the start says so in one
line when they do not.

Listed before mta_sts (RFC 8461 section 2: MTA-STS must not override DANE).
config/tls_policy entries at dane or dane-only use this plugin's checks too.

Settings: config/dane.ini   Docs: docs/plugins/dane.md
"""

from __future__ import annotations

from harakapy import Dane, Server, background, checked_config, hookimpl

startup, config_reload = checked_config("dane.checked", Dane.check_config)


def _dane(server: Server) -> Dane:
    return server.config.derive("dane.authority",
                                lambda config: Dane.from_config(config, server.dns))


@hookimpl
def dane_authority(server):
    return _dane(server)


@hookimpl
async def tls_policy(domain, hosts, routed, message, server):
    async def next_policy():
        return await server.next_policy(domain, hosts, routed=routed, message=message)

    return await _dane(server).tls_policy(domain, hosts, routed=routed,
                                          next_policy=next_policy)


@background
async def check_resolver(server):
    """Say once, at start, when the resolver cannot serve DANE."""
    problem = await _dane(server).validation_problem()
    if problem:
        server.log.warning("%s", problem)
    else:
        server.log.info("DANE: the resolver validates DNSSEC")
