"""tlsrpt: SMTP TLS Reporting (RFC 8460): count every outbound TLS session, and send each
domain that asks for it (its _smtp._tls record) a daily report.

Results of the tls_result hook are counted in memory and written in batches to
DIR/state/tlsrpt/reports.sqlite (shared by the workers), and in a fleet
(config/redis.ini) handed to the fleet's Redis, so that one report covers every node.
After each UTC day, at a delay of its own, each domain's report goes to the mailto:
and https: addresses of its record: mail through the outbound queue from the null
sender, DKIM-signed with the keys of config/dkim_sign.ini for the domain of contact;
HTTPS as a POST. Report mail is delivered at the level may whatever the destination's
policy, and its sessions are not counted (RFC 8460 section 3). Listed before the TLS
policy plugins, so that its tls_policy answer for report mail comes first.

Settings: config/tlsrpt.ini   Docs: docs/plugins/tlsrpt.md
"""

from __future__ import annotations

from harakapy import Server, Tlsrpt, background, checked_config, hookimpl, ok

startup, config_reload = checked_config("tlsrpt.checked", Tlsrpt.check_config)


_current: list[Tlsrpt] = []  # the newest service: a reload's new one takes over


def _tlsrpt(server: Server) -> Tlsrpt:
    service = server.config.derive("tlsrpt.service", lambda config: Tlsrpt.from_config(
        config, server.dns, server.clock, server.submit))
    if not _current or _current[0] is not service:
        for old in _current:
            old.retire()  # what it counted is not lost with the old config
        _current[:] = [service]
    return service


@hookimpl
def tls_result(result, server):
    _tlsrpt(server).record(result)


@hookimpl
def tls_policy(message, server):
    if Tlsrpt.is_report(message):
        return Tlsrpt.report_policy()
    return None


@background(per_process=True)
async def flush(server):
    """Write this process's counts every flush_interval."""
    await _tlsrpt(server).run_flush()


@background
async def share(server):
    """Hand this node's counts to the fleet, when config/redis.ini names one."""
    await _tlsrpt(server).run_ship()


@background
async def send(server):
    """Send the reports that are due (one process of the installation)."""
    await _tlsrpt(server).run_sender()


async def _receive(transaction, server):
    """Reports other senders mail about our domains, to [receive] mailbox: stored, not
    delivered on."""
    service = _tlsrpt(server)
    if not service.for_mailbox([r.address for r in transaction.recipients]):
        return None
    what = await service.receive_mail(transaction.message,
                                      Tlsrpt.received_path(server.config))
    server.log.info("TLS report from <%s>: %s", transaction.sender.address, what)
    return ok()


@hookimpl
async def queue(transaction, server):
    return await _receive(transaction, server)


@hookimpl
async def queue_outbound(transaction, server):
    return await _receive(transaction, server)


@background
async def endpoint(server):
    """The HTTPS endpoint for reports POSTed to us, when [receive] listen says so."""
    await _tlsrpt(server).serve(Tlsrpt.received_path(server.config))


@hookimpl
async def shutdown(server):
    service = _tlsrpt(server)
    await service.flush()
    await service.ship()  # a node that stops hands its counts to the fleet
