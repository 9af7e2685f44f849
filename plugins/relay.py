"""relay: let trusted clients relay to any domain.

A client connecting from a network in config/relay_acl_allow, or one that authenticated
(SMTP AUTH), is relaying: every recipient is accepted and the message goes to the
queue_outbound hook. Everyone else gets no help from this plugin, and a recipient no other
plugin accepts is refused with 550 5.7.1: never an open relay.

Settings: config/relay_acl_allow   Docs: docs/plugins/relay.md
"""

from __future__ import annotations

import ipaddress

from harakapy import Config, checked_config, hookimpl, ok

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def load_acl(config: Config) -> tuple[Network, ...]:
    networks = []
    for entry in config.list("relay_acl_allow"):
        try:
            networks.append(ipaddress.ip_network(entry.value, strict=False))
        except ValueError:
            raise entry.error(entry.value, "not an IP network (expected CIDR such as "
                                           "192.0.2.0/24 or 2001:db8::/32)") from None
    return tuple(networks)


def allowed(networks: tuple[Network, ...], ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _acl(server) -> tuple[Network, ...]:
    return server.config.derive("relay.acl", load_acl)


startup, config_reload = checked_config("relay.acl", load_acl)


@hookimpl
def connect(connection, server) -> None:
    if allowed(_acl(server), connection.remote_ip):
        connection.relaying = True


@hookimpl
def rcpt(connection):
    if connection.relaying:
        return ok()
    return None
