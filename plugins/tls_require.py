"""tls_require: per-destination TLS policy from config/tls_policy, in Postfix
smtp_tls_policy_maps syntax; a Postfix table works copied as it is.

    example.com        secure
    .example.com       encrypt
    [relay.example]:587  verify

Mail by MX records is looked up by recipient domain (then .parent entries); mail a get_mx
plugin routed, by [host]:port then [host]. No entry: the next plugin decides.

Settings: config/tls_policy   Docs: docs/plugins/tls_require.md
"""

from __future__ import annotations

from harakapy import Config, PolicyTable, checked_config, hookimpl


def load_table(config: Config) -> PolicyTable:
    found = config.text("tls_policy")
    if found is None:
        return PolicyTable({}, config.resolve("tls_policy"))
    path, text = found
    return PolicyTable.parse(path, text)


def _table(server) -> PolicyTable:
    return server.config.derive("tls_require.table", load_table)


startup, config_reload = checked_config("tls_require.table", load_table)


@hookimpl
def tls_policy(domain, hosts, routed, server):
    route = [(host.hostname, host.port) for host in hosts] if routed else None
    entry = _table(server).lookup(domain, route)
    return entry.policy if entry is not None else None
