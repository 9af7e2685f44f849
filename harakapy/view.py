"""What a plugin gets as ``server``: its own view of the running server, not the server.

Each plugin has one view, so its logger and state directory are its own. Through it a
plugin reads the config, ``me`` and the shared ``notes``, asks DNS, puts messages into the
outbound queue and asks what the plugins after it would decide. Listeners, connections and
the queue runner are not part of it: a plugin that could reach them could break the
invariants the server keeps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harakapy.dns import Resolver
from harakapy.outbound.tls_policy import find_policy

if TYPE_CHECKING:
    from harakapy.clock import Clock
    from harakapy.config import Config
    from harakapy.dispatch import HookCaller
    from harakapy.inbound.connection import Transaction
    from harakapy.outbound.mx import MxHost
    from harakapy.spool.store import QueuedMessage
    from harakapy.tls.policy import Policy


class Core(Protocol):
    """What the running server lends every view (``harakapy.server.MailServer``)."""

    @property
    def notes(self) -> dict[str, Any]: ...

    @property
    def clock(self) -> Clock: ...

    async def submit(self, sender: str, recipients: list[str], message: bytes, *,
                     id: str | None = None, requiretls: bool = False) -> QueuedMessage: ...

    async def enqueue(self, transaction: Transaction) -> QueuedMessage: ...


def plugin_folder(name: str) -> str:
    """A plugin's name as one path component: ``queue/smtp_forward`` →
    ``queue.smtp_forward``, as its docs page is named."""
    return name.replace("/", ".")


class Server:
    """A plugin's view of the server, passed to every hook as ``server``.

    :ivar name: The plugin's name in ``config/plugins``.
    :ivar config: The config this plugin set was loaded with (the new one during
        ``config_reload``).
    :ivar me: This host's name (``config/me``, else the system's).
    :ivar log: The plugin's logger, ``harakapy.plugin.<name>``.
    """

    __slots__ = ("_core", "_hooks", "_state_dir", "config", "log", "me", "name")

    def __init__(self, name: str, config: Config, me: str, hooks: HookCaller,
                 core: Core) -> None:
        self.name = name
        self.config = config
        self.me = me
        self.log = logging.getLogger(f"harakapy.plugin.{plugin_folder(name)}")
        self._hooks = hooks
        self._core = core
        self._state_dir: Path | None = None

    def __repr__(self) -> str:
        return f"<harakapy.Server view for plugin {self.name!r}>"

    @property
    def notes(self) -> dict[str, Any]:
        """Shared by every plugin and kept across reloads, as Haraka's ``server.notes``."""
        return self._core.notes

    @property
    def clock(self) -> Clock:
        """The server's time: ``clock.time()`` and ``await clock.sleep(seconds)``. Use it
        for expiry and schedules, so tests can move it."""
        return self._core.clock

    @property
    def dns(self) -> Resolver:
        """The resolver of ``config/dns.ini``, the one delivery uses."""
        return self.config.derive("outbound.resolver", Resolver.from_config)

    @property
    def state_dir(self) -> Path:
        """This plugin's folder for durable data, ``DIR/state/<name>/`` (mode 0700),
        created on first use. Keep SQLite files and caches here; it survives restarts and
        upgrades, and nothing else writes to it."""
        if self._state_dir is None:
            path = self.config.state_dir() / plugin_folder(self.name)
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._state_dir = path
        return self._state_dir

    async def submit(self, sender: str, recipients: list[str], message: bytes, *,
                     id: str | None = None, requiretls: bool = False) -> QueuedMessage:
        """Put a message this plugin made (a report, a notice) into the outbound queue.

        It is in the spool, fsynced, when this returns, and is delivered like any other.

        :param sender: The reverse path, ``""`` for the null sender (notices).
        :param recipients: Forward paths, ``local@domain``.
        :param message: The whole message, headers first, CRLF line ends.
        :param id: A queue id of the plugin's own (letters, digits, ``.``, ``_``, ``-``;
            start it with the plugin's name), for a message that must be queued once:
            a second submit with the same id, while the first is queued, is refused.
        :param requiretls: Deliver it only over validated TLS to servers that offer
            REQUIRETLS (RFC 8689): a list or forwarder re-sending a REQUIRETLS message
            passes its ``requiretls`` on.
        :raises SpoolError: it could not be stored, its ``id`` is queued already, or no
            queue runs in this command.
        """
        return await self._core.submit(sender, recipients, message, id=id,
                                       requiretls=requiretls)

    async def enqueue(self, transaction: Transaction) -> QueuedMessage:
        """Store a received message durably in the outbound queue, for a ``queue`` or
        ``queue_outbound`` plugin; answer ``ok()`` only after this returns.

        :raises SpoolError: it could not be stored; answer ``denysoft()``.
        """
        return await self._core.enqueue(transaction)

    async def next_policy(self, domain: str, hosts: list[MxHost], *, routed: bool,
                          message: QueuedMessage | None = None) -> Policy:
        """The TLS policy the plugins after this one (or the default) give ``domain``:
        for a ``tls_policy`` plugin that makes the others' answer stricter.

        :raises PolicyLookupError: one of them failed; let it propagate.
        """
        return await find_policy(self._hooks, self.config, domain, hosts, routed=routed,
                                 message=message, after=self.name)
