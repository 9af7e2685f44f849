"""queue/smtp_forward: hand mail for our own domains to a backend SMTP or LMTP server.

The usual inbound-gateway setup: harakapy takes mail for the domains in config/host_list
and forwards it to the mail store behind it (Dovecot's LMTP, an Exchange or Postfix
backend). The message is first stored in the durable outbound spool, so the client hears
250 only once it is safe, and the backend's refusals and outages get the queue's retries
and bounces. Relayed mail for those domains takes the same route.

Settings: config/smtp_forward.ini [main]   Docs: docs/plugins/queue.smtp_forward.md
"""

from __future__ import annotations

from harakapy import Config, MxHost, SpoolError, checked_config, denysoft, hookimpl, ok


def load_backend(config: Config) -> MxHost:
    ini = config.ini("smtp_forward.ini")
    ini.check_known(config.shipped_ini("smtp_forward.ini"))
    host = ini.get_str("main", "host").strip()
    if not host:
        raise ini.error("main", "host", "the backend's host name or IP address is required")
    return MxHost(host.strip("[]"), 0, ini.get_port("main", "port", 25),
                  lmtp=ini.get_bool("main", "lmtp", False))


def _backend(server) -> MxHost:
    return server.config.derive("smtp_forward.backend", load_backend)


def _local_domains(server) -> frozenset[str]:
    return server.config.derive("smtp_forward.domains", lambda config: frozenset(
        entry.value.lower().rstrip(".") for entry in config.list("host_list")))


startup, config_reload = checked_config("smtp_forward.backend", load_backend)


@hookimpl
async def queue(transaction, server):
    try:
        queued = await server.enqueue(transaction)
    except SpoolError:
        return denysoft("Cannot queue the message now; try again later", enhanced="4.3.0")
    return ok(f"Ok: queued as {queued.id}")


@hookimpl
def get_mx(domain, server):
    if domain.rstrip(".") in _local_domains(server):
        return _backend(server)
    return None
