"""The running server: one config, its plugins, the listeners, and the process lifecycle.

Owns start (check config, ``startup`` hook, listen), SIGHUP (load a new config and plugin
set, let plugins refuse it, then swap), and SIGTERM (stop accepting, let transactions in
flight finish within ``shutdown_grace``, exit). It owns every background task it starts,
the plugins' included (``tasks.py``). It is where the inbound and outbound halves are put
together; it does not speak SMTP (``inbound/protocol.py``) or read files (``config.py``).
Plugins never see it: they get their view (``view.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harakapy import metrics
from harakapy.clock import Clock
from harakapy.config import Config, ConfigError
from harakapy.dns import Resolver
from harakapy.fleet import close_fleet_link, fleet_link, fleet_settings
from harakapy.inbound.connection import Transaction
from harakapy.inbound.protocol import SmtpProtocol
from harakapy.inbound.settings import InboundSettings, ListenAddress, check_me
from harakapy.locks import ProcessLock
from harakapy.outbound import control
from harakapy.outbound.queue import OutboundQueue
from harakapy.outbound.requiretls import requiretls_settings
from harakapy.outbound.settings import OutboundSettings
from harakapy.plugins import PluginManager
from harakapy.spool.report import check_id
from harakapy.spool.store import QueuedMessage, Spool, SpoolError
from harakapy.status.settings import status_settings
from harakapy.systemd import Notifier
from harakapy.tasks import TaskRunner
from harakapy.tls import outcomes
from harakapy.tls.settings import TlsSettings
from harakapy.view import Core

log = logging.getLogger("harakapy.server")


class ListenError(Exception):
    """A listener could not be opened (address in use, not available, no permission)."""


@dataclass(frozen=True, slots=True)
class _State:
    """Everything a reload replaces at once."""

    config: Config
    settings: InboundSettings
    plugins: PluginManager
    me: str
    tls_context: ssl.SSLContext | None = None


# The core's own files, each checked on its own: a bad value stops the start (or the
# reload) with file:line, and ``harakapy check`` reports every file's errors, not the
# first. Each derives what it checks, so the server reads the file only once.
SETTINGS_CHECKS: tuple[Callable[[Config], object], ...] = (
    InboundSettings.from_config,
    lambda config: config.derive("tls.outbound", TlsSettings.from_config),
    lambda config: config.derive("outbound.settings", OutboundSettings.from_config),
    lambda config: config.derive("outbound.resolver", Resolver.from_config),
    requiretls_settings,
    metrics.metrics_settings,
    status_settings,
    fleet_settings,
    check_me,
)


def _build_state(config: Config, core: Core) -> _State:
    for check in SETTINGS_CHECKS:
        check(config)
    settings = InboundSettings.from_config(config)
    me = check_me(config) or socket.getfqdn()
    plugins = PluginManager.load(config, timeout=settings.plugin_timeout)
    plugins.bind(me, core)
    return _State(config, settings, plugins, me)


async def inbound_context(plugins: PluginManager, settings: InboundSettings,
                          config: Config) -> ssl.SSLContext | None:
    """The ``inbound_tls`` hook's context, checked.

    :raises ConfigError: the plugin failed, or implicit-TLS listeners have no context.
    """
    context = await plugins.call_first("inbound_tls")
    if context is not None and not isinstance(context, ssl.SSLContext):
        providers = [impl.plugin_name for impl in plugins.implementations("inbound_tls")]
        raise plugins.error(providers[0] if providers else None,
                            "failed to build the inbound TLS context "
                            "(the log above has the traceback)")
    if context is None and any(a.implicit_tls for a in settings.listen):
        ini = config.ini("smtp.ini")
        raise ini.error("main", "listen_tls", "implicit-TLS listeners need the 'tls' "
                                              "plugin (or another inbound_tls plugin)")
    return context


class MailServer:
    """The running server: listeners, connections, the outbound queue, plugins' tasks.

    :param config: A loaded config (see :meth:`Config.load`).
    :param clock: Time for the queue's schedules and plugins' tasks (tests pass one they
        move).
    :param slot: This process's worker slot and the number of workers (``(0, 1)``: the
        only process); see ``harakapy.supervisor``.
    :param sockets: Listening sockets opened by the supervisor, by address as configured;
        ``None`` to open them here.
    :raises ConfigError: when the config or a plugin is wrong.
    """

    def __init__(self, config: Config, *, clock: Clock | None = None,
                 slot: tuple[int, int] = (0, 1),
                 sockets: dict[ListenAddress, socket.socket] | None = None) -> None:
        self.clock = clock or Clock()
        self.slot = slot
        self._sockets = sockets
        self.notes: dict[str, Any] = {}
        self._state = _build_state(config, self)
        self.connections: set[SmtpProtocol] = set()
        self.draining = False
        self.listeners: list[tuple[ListenAddress, asyncio.Server]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._metrics_task: asyncio.Task[None] | None = None
        self._status_tasks: list[asyncio.Task[None]] = []
        self._fleet_tasks: list[asyncio.Task[None]] = []
        self._reloading: asyncio.Lock | None = None
        self.outbound: OutboundQueue | None = None
        self._control: asyncio.Server | None = None
        self.background = TaskRunner(self.clock, config.state_dir() / "background.lock")
        self._slot_lock = ProcessLock(config.queue_dir() / f"slot-{slot[0]}.lock")
        self._serving = False

    @classmethod
    def from_directory(cls, root: Path | None) -> MailServer:
        return cls(Config.load(root))

    # -- what the halves and the plugins' views use -----------------------------------

    @property
    def config(self) -> Config:
        return self._state.config

    @property
    def settings(self) -> InboundSettings:
        return self._state.settings

    @property
    def plugins(self) -> PluginManager:
        return self._state.plugins

    @property
    def me(self) -> str:
        """This host's name for the greeting, EHLO and ``Received:`` (``config/me``)."""
        return self._state.me

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The inbound TLS context from the ``inbound_tls`` hook, if a plugin gave one."""
        return self._state.tls_context

    @property
    def queues_outbound(self) -> bool:
        return self.outbound is not None

    async def submit(self, sender: str, recipients: list[str], message: bytes, *,
                     id: str | None = None, requiretls: bool = False) -> QueuedMessage:
        """A message made here (a DSN, a report) into the outbound queue."""
        if self.outbound is None:
            raise SpoolError("the outbound queue is not running in this command")
        if id is not None:
            check_id(id)  # a plugin's id names a spool file: nothing else
        return await self.outbound.submit(sender, recipients, message, id=id,
                                          requiretls=requiretls)

    @property
    def offers_requiretls(self) -> bool:
        return requiretls_settings(self.config).offer

    async def enqueue(self, transaction: Transaction) -> QueuedMessage:
        """A received message into the outbound queue (durable when this returns)."""
        if self.outbound is None:
            raise SpoolError("the outbound queue is not running in this command")
        assert transaction.message is not None
        addresses = [r.address for r in transaction.recipients]
        params = [transaction.rcpt_params.get(a, {}) for a in addresses]
        return await self.outbound.submit(
            transaction.sender.address, addresses, transaction.message, id=transaction.id,
            smtputf8=transaction.smtputf8, body_8bit=transaction.body_8bit,
            requiretls=transaction.requiretls, ret=transaction.ret, envid=transaction.envid,
            notify=[p.get("NOTIFY", "") for p in params],
            orcpt=[p.get("ORCPT", "") for p in params], client=transaction.id)

    async def _prepare(self, state: _State, hook: str) -> _State:
        # The plugins of ``state`` judge its config before it takes over: their views
        # show that config.
        await state.plugins.call_all(hook, raise_errors=True)
        context = await inbound_context(state.plugins, state.settings, state.config)
        return _State(state.config, state.settings, state.plugins, state.me, context)

    # -- lifecycle ----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Run ``startup``: plugins are ready. :meth:`start` does this first; commands
        that ask plugins without serving (``harakapy tls-policy``) do only this.

        :raises ConfigError: a plugin refused the config.
        """
        self._reloading = asyncio.Lock()
        self._state = await self._prepare(self._state, "startup")

    async def start(self) -> None:
        """Run ``startup``, then open every listener.

        :raises ConfigError: a plugin refused the config.
        :raises ListenError: an address could not be bound.
        """
        await self.prepare()
        if metrics.enable(self.config) and self.slot[1] == 1:
            # With workers, the supervisor serves every worker's metrics.
            self._metrics_task = asyncio.get_running_loop().create_task(
                metrics.serve(self.config))
        page = status_settings(self.config)
        if page.enabled:
            recorder = outcomes.enable(self.config, self.clock, page.retention_days)
            loop = asyncio.get_running_loop()
            self._status_tasks.append(loop.create_task(recorder.run()))
            if self.slot[1] == 1:  # with workers, the supervisor serves the page
                from harakapy.status import web as status_web

                self._status_tasks.append(loop.create_task(status_web.serve(self.config,
                                                                              self.clock)))
        await self._start_outbound()
        await self.background.start(self.plugins.background_tasks())
        loop = asyncio.get_running_loop()
        for address in self.settings.listen:
            # No ssl= here even for implicit TLS: the protocol does the handshake with the
            # context current at connect time, so SIGHUP can renew a certificate.
            def factory(implicit: bool = address.implicit_tls) -> SmtpProtocol:
                return SmtpProtocol(self, implicit_tls=implicit)

            try:
                if self._sockets is not None:
                    listener = await loop.create_server(factory, sock=self._sockets[address],
                                                        backlog=1024)
                else:
                    listener = await loop.create_server(
                        factory, address.host, address.port, reuse_address=True,
                        backlog=1024)
            except OSError as exc:
                await self._close_listeners()
                raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
            bound = listener.sockets[0].getsockname()
            actual = ListenAddress(address.host, bound[1], address.implicit_tls)
            self.listeners.append((actual, listener))
            if self.slot[1] == 1:  # the supervisor says it once for all workers
                log.info("listening on %s%s", actual, " (implicit TLS)"
                         if address.implicit_tls else "")
        self._serving = True
        plugins = ", ".join(p.name for p in self.plugins.plugins) or "none"
        if self.slot[1] == 1:
            log.info("harakapy ready as %s with plugins: %s", self.me, plugins)
        else:
            log.info("worker %d of %d ready (pid %d)", self.slot[0] + 1, self.slot[1],
                     os.getpid())

    async def _start_outbound(self) -> None:
        settings = OutboundSettings.from_config(self.config)
        spool = Spool(self.config.queue_dir(), fsync=settings.fsync)
        try:
            spool.create()
            await self._take_slot()
        except (SpoolError, OSError) as exc:
            raise ListenError(f"cannot use the spool {spool.root}: {exc}") from exc
        self.outbound = OutboundQueue(self, spool, clock=self.clock, slot=self.slot)
        link = fleet_link(self.config)
        if link is not None and link.settings.share_destinations:
            from harakapy.fleet.destinations import SharedSuspensions

            shared = SharedSuspensions(link, self.outbound.suspend)
            self.outbound.on_suspend = shared.suspended
            self._fleet_tasks.append(asyncio.get_running_loop().create_task(
                shared.listen()))
        try:
            await self.outbound.start()
        except (SpoolError, OSError) as exc:
            raise ListenError(f"cannot use the spool {spool.root}: {exc}") from exc
        self._control = await control.serve(spool.root, self._control_command,
                                            slot=self.slot[0])

    async def _take_slot(self) -> None:
        """Hold this slot's lock: no second process delivers the same messages. A worker
        started again waits for the one it replaces to have finished exiting."""
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace + 10
        while not self._slot_lock.try_acquire():
            if asyncio.get_running_loop().time() > deadline:
                raise SpoolError(f"another harakapy (pid {self._slot_lock.holder() or '?'})"
                                 f" is running on it ({self._slot_lock.path} is locked)")
            await asyncio.sleep(0.1)

    def _control_command(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.outbound is not None
        command, message_id = request.get("cmd"), request.get("id")
        if command == "flush":
            return {"ok": True, "count": self.outbound.flush(message_id)}
        if command == "delete" and isinstance(message_id, str):
            return {"ok": self.outbound.delete(message_id)}
        if command == "stats":
            return {"ok": True, **self.outbound.stats()}
        if command == "adopt" and isinstance(message_id, str):
            check_id(message_id)
            return {"ok": True, "count": int(self.outbound.adopt(message_id))}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task this server owns: kept alive, awaited on stop, and
        its exception logged."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("background task failed", exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    async def reload(self) -> bool:
        """Re-read the config directory and plugins; keep the old ones if anything is wrong.

        :returns: whether the new config took over.
        """
        assert self._reloading is not None
        async with self._reloading:
            try:
                config = Config.load(self.config.root)
                state = await self._prepare(_build_state(config, self), "config_reload")
            except ConfigError as exc:
                log.error("config reload refused, still running the old config: %s", exc)
                return False
            except Exception:
                log.exception("config reload failed, still running the old config")
                return False
            old_listen, old_config = self.settings.listen, self.config
            self._state = state
            self.spawn(close_fleet_link(old_config))
            if state.settings.listen != old_listen:
                log.warning("listen addresses changed; they take effect after a restart")
            log.info("config reloaded; plugins: %s",
                     ", ".join(p.name for p in self.plugins.plugins) or "none")
            if self._serving:  # not only prepared (harakapy tls-policy)
                await self.background.start(self.plugins.background_tasks())
            return True

    def request_stop(self) -> None:
        self._stopped.set()

    async def serve(self, *, install_signals: bool = True,
                    notifier: Notifier | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then drain and stop.

        :param notifier: Tells systemd of reloads and the stop (the main process of a
            single-process server); its watchdog runs while this serves.
        """
        loop = asyncio.get_running_loop()
        notifier = notifier or Notifier.disabled()

        def stop() -> None:
            notifier.stopping()
            self.request_stop()

        async def reload() -> None:
            notifier.reloading()
            done = await self.reload()
            notifier.ready("serving" if done else "serving the old config: the reload "
                           "was refused (see the log)")

        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, stop)
            loop.add_signal_handler(signal.SIGINT, stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(reload()))
        watchdog = loop.create_task(notifier.keep_alive())
        try:
            await self._stopped.wait()
        finally:
            watchdog.cancel()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self.stop()

    async def _close_listeners(self) -> None:
        for _address, listener in self.listeners:
            listener.close()
        self.listeners.clear()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish within ``grace`` seconds
        (``[main] shutdown_grace``), cut off the rest, and run ``shutdown``."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.draining = True
        for _address, listener in self.listeners:
            listener.close()
        self.listeners.clear()
        for protocol in list(self.connections):
            protocol.begin_drain()
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("cutting off %d connection(s) still busy after %.0fs",
                        len(self.connections), grace)
            for protocol in list(self.connections):
                protocol.abort()
            await asyncio.sleep(0)
        await self.background.stop()
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            await asyncio.gather(self._metrics_task, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(grace, 1.0))
        if self._control is not None:
            self._control.close()
            (self.config.queue_dir() / control.socket_name(self.slot[0])).unlink(
                missing_ok=True)
        if self.outbound is not None:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await self.outbound.stop(grace=remaining)
        # After the queue: the sessions of its last deliveries are written too.
        for task in self._status_tasks:
            task.cancel()
        await asyncio.gather(*self._status_tasks, return_exceptions=True)
        if self._status_tasks:
            outcomes.disable()
        for task in self._fleet_tasks:
            task.cancel()
        await asyncio.gather(*self._fleet_tasks, return_exceptions=True)
        self._slot_lock.release()
        await self.plugins.call_all("shutdown")
        await close_fleet_link(self.config)
        log.info("stopped")
