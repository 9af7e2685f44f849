"""queue/discard: accept every message and throw it away.

For tests and benchmarks of the inbound path. It answers both queue (local) and
queue_outbound (relayed) mail: a server with this plugin delivers nothing.

Docs: docs/plugins/queue.discard.md
"""

from __future__ import annotations

import logging

from harakapy import hookimpl, ok

log = logging.getLogger("harakapy.plugin.queue.discard")


@hookimpl
def queue(transaction):
    log.info("discarded %s (%d bytes)", transaction.id, len(transaction.message or b""))
    return ok()


@hookimpl
def queue_outbound(transaction):
    log.info("discarded %s (%d bytes)", transaction.id, len(transaction.message or b""))
    return ok()
