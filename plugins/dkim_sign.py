"""dkim_sign: DKIM-sign outgoing mail (RFC 6376, RSA-SHA256 and Ed25519-SHA256).

Mail from a client that may relay (config/relay_acl_allow, or authenticated) is signed
once, at the end of data, before it enters the outbound queue: a DKIM-Signature for
each key config/dkim_sign.ini lists for the domain of its From: header. Mail from other
networks (not relaying), and mail from domains without keys, is left as it is.

    harakapy dkim keygen example.org s2026 -c DIR

writes DIR/config/dkim/example.org.s2026.key and prints the TXT record to publish and
the [sign example.org s2026] section to add.

Settings: config/dkim_sign.ini   Docs: docs/plugins/dkim_sign.md
"""

from __future__ import annotations

import asyncio

from harakapy import DkimSigner, checked_config, hookimpl

startup, config_reload = checked_config("dkim_sign.signer", DkimSigner.from_config)


@hookimpl
async def data_post(connection, transaction, server):
    if not connection.relaying or transaction.message is None:
        return None
    signer = server.config.derive("dkim_sign.signer", DkimSigner.from_config)
    # RSA signing takes a millisecond or so of CPU: not on the event loop.
    transaction.message = await asyncio.to_thread(signer.sign, transaction.message)
    return None
