"""rcpt_to.in_host_list: accept recipients in the domains of config/host_list.

Those are the domains this server receives mail for; their messages go to the queue hook
(local delivery, such as queue/smtp_forward). Other recipients are left to later plugins.

Settings: config/host_list   Docs: docs/plugins/rcpt_to.in_host_list.md
"""

from __future__ import annotations

from harakapy import Config, hookimpl, ok


def load_hosts(config: Config) -> frozenset[str]:
    return frozenset(entry.value.lower().rstrip(".") for entry in config.list("host_list"))


@hookimpl
def rcpt(recipient, server):
    if recipient.domain.rstrip(".") in server.config.derive("host_list", load_hosts):
        return ok()
    return None
