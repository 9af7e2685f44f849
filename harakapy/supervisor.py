"""The supervisor: ``[main] workers`` server processes over one config directory.

Rules:

1. The supervisor opens the listening sockets, one per address for each worker with
   ``SO_REUSEPORT``, and hands each worker its own (inherited descriptors): the kernel
   spreads new connections evenly over them. While a worker is being replaced, its
   socket stays open in the supervisor, so its share of clients waits in the backlog
   instead of being refused. The supervisor speaks no SMTP.
2. Each worker is a whole server (inbound, outbound queue, control socket) in slot ``k``
   of ``n``. A message belongs to the slot whose worker accepted it, and only that slot's
   worker delivers it (rule 6 of ``spool/store.py``), so no two workers ever deliver the
   same recipient; a worker holds ``queue/slot-<k>.lock`` while it runs. The halves meet
   in the spool: nothing passes between workers.
3. A worker that dies is started again in its slot, 1 s later, doubling to 60 s while it
   keeps dying within a minute of its start; the new one recovers the slot's messages from
   the spool. Plugins' background tasks move to a surviving worker by their own lock
   (``tasks.py``).
4. SIGTERM and SIGINT go to every worker, and the supervisor exits 0 once all have
   finished. SIGHUP goes to every worker; each reloads as a single server does. If the
   supervisor itself dies, the kernel sends each worker SIGTERM (``PR_SET_PDEATHSIG``).
5. Before any worker runs, the supervisor clears the spool's orphan journals (what a
   single server does at its start); a worker that fails before it is ready (a config,
   plugin or spool error) stops the start, and the supervisor exits with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harakapy import metrics, privileges
from harakapy.config import Config
from harakapy.inbound.settings import InboundSettings, ListenAddress
from harakapy.spool.store import Spool
from harakapy.status.settings import status_settings
from harakapy.systemd import Notifier, child_environment

log = logging.getLogger("harakapy.supervisor")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0  # seconds a worker must live for its next death to count as new
READY_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """The group could not start; ``code`` is the exit code for ``harakapy run``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Worker:
    slot: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Task[None] | None = None


def bind(addresses: tuple[ListenAddress, ...], copies: int) -> list[list[socket.socket]]:
    """Open ``copies`` listening sockets on each address (port 0: the port the first one
    got); ``[copy][address]``.

    :raises StartError: an address cannot be bound (exit code 1).
    """
    opened: list[socket.socket] = []
    sockets: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            port = _free_port(family, address)
            for copy in sockets:
                sock = socket.socket(family, socket.SOCK_STREAM)
                opened.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((address.host, port))
                    sock.listen(1024)
                except OSError as exc:
                    raise StartError(f"cannot listen on {address}: {exc.strerror or exc}",
                                     1) from exc
                port = sock.getsockname()[1]
                sock.setblocking(False)
                copy.append(sock)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return sockets


def _free_port(family: socket.AddressFamily, address: ListenAddress) -> int:
    """The port to listen on, after checking that nothing listens there yet: with
    SO_REUSEPORT alone a second harakapy could share a port the first one has."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            raise StartError(f"cannot listen on {address}: {exc.strerror or exc}", 1) from exc
        return probe.getsockname()[1]


def die_with_parent(parent: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies (Linux), and stop at once if
    it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs and watches the workers.

    :param root: The config directory (``None``: the shipped defaults).
    :param settings: Its ``[main]`` (``workers``, ``listen``, ``shutdown_grace``).
    :param worker_args: ``harakapy run`` options every worker gets (log format, level).
    """

    def __init__(self, root: Path | None, config: Config, settings: InboundSettings,
                 worker_args: list[str], *, check: Callable[[], object] = lambda: None
                 ) -> None:
        self.check = check
        self.root = root
        self.config = config
        self.settings = settings
        self.worker_args = worker_args
        self.workers = [Worker(slot) for slot in range(settings.workers)]
        self._sockets: list[list[socket.socket]] = []
        self._stopping = asyncio.Event()
        self.notifier = Notifier()

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM, stop them; the exit code.

        :raises StartError: the group could not start.
        """
        self._sockets = bind(self.settings.listen, len(self.workers))
        try:
            # Bound as root; the rest, workers included, runs as [main] user.
            privileges.prepare(self.settings.identity(),
                               [self.config.queue_dir(), self.config.state_dir()])
            privileges.drop(self.settings.identity())
            self.check()
            metrics.prepare_multiprocess(self.config)  # before any worker starts
            for address, sock in zip(self.settings.listen, self._sockets[0], strict=True):
                port = sock.getsockname()[1]
                log.info("listening on %s%s", ListenAddress(address.host, port),
                         " (implicit TLS)" if address.implicit_tls else "")
            spool = Spool(self.config.queue_dir())
            spool.create()
            spool.remove_orphan_journals()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            watchdog = loop.create_task(self.notifier.keep_alive())
            serving = (loop.create_task(metrics.serve(self.config))
                       if metrics.metrics_settings(self.config).enabled else None)
            page = None
            if status_settings(self.config).enabled:
                from harakapy.status import web as status_web

                page = loop.create_task(status_web.serve(self.config))
            try:
                await self._start_all()
                log.info("harakapy ready with %d workers (pids %s)", len(self.workers),
                         ", ".join(str(w.process.pid) for w in self.workers if w.process))
                self.notifier.ready(f"serving with {len(self.workers)} workers")
                await self._watch()
            finally:
                watchdog.cancel()
                for task in (serving, page):
                    if task is not None:
                        task.cancel()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
                await self._stop_all()
        finally:
            for copy in self._sockets:
                for sock in copy:
                    sock.close()
        log.info("stopped")
        return 0

    async def _start_all(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        waiting = {asyncio.ensure_future(w.ready.wait()): w for w in self.workers}
        exits = {asyncio.ensure_future(w.process.wait()): w for w in self.workers
                 if w.process is not None}
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while waiting:
                done, _ = await asyncio.wait([*waiting, *exits, stop],
                                             timeout=deadline - time.monotonic(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise StartError("workers did not become ready in time", 1)
                if stop in done:
                    raise StartError("stopped while starting", 0)
                for future in done:
                    if future in exits:
                        worker = exits[future]
                        code = future.result()
                        raise StartError(f"worker {worker.slot + 1} exited during start "
                                         f"(code {code})", code if code > 0 else 1)
                    waiting.pop(future, None)
        finally:
            for future in [*waiting, *exits, stop]:
                future.cancel()

    async def _spawn(self, worker: Worker) -> None:
        read_end, write_end = os.pipe()
        descriptors = [sock.fileno() for sock in self._sockets[worker.slot]]
        command = [sys.executable, "-m", "harakapy", "run",
                   *(["-c", str(self.root)] if self.root is not None else []),
                   *self.worker_args, "--worker", f"{worker.slot}/{len(self.workers)}",
                   "--parent", str(os.getpid()), "--ready-fd", str(write_end),
                   "--listen-fds", ",".join(map(str, descriptors))]
        worker.ready.clear()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[*descriptors, write_end], env=child_environment())
        finally:
            os.close(write_end)
        worker.started = time.monotonic()
        worker.reading = asyncio.get_running_loop().create_task(
            self._read_ready(worker, read_end))

    async def _read_ready(self, worker: Worker, read_end: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", 0))
        try:
            if (await reader.readline()).strip() == b"ready":
                worker.ready.set()
        finally:
            transport.close()

    async def _watch(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        # A worker waiting out its back-off must not keep the others' deaths unseen.
        restarts: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                exits = {asyncio.ensure_future(w.process.wait()): w for w in self.workers
                         if w.process is not None}
                done, _ = await asyncio.wait([*exits, *restarts, stop],
                                             return_when=asyncio.FIRST_COMPLETED)
                for future in exits:
                    if future not in done:
                        future.cancel()
                if stop in done:
                    return
                for future in done:
                    if future in exits:
                        worker = exits[future]
                        pid = worker.process.pid if worker.process else 0
                        worker.process = None  # seen once: the next round waits on the rest
                        restarts.add(asyncio.get_running_loop().create_task(
                            self._replace(worker, pid, future.result())))
                    else:
                        restarts.discard(future)
                        future.result()  # a failed start is the loop's to see
        finally:
            stop.cancel()
            for task in restarts:
                task.cancel()
            await asyncio.gather(*restarts, return_exceptions=True)

    async def _replace(self, worker: Worker, pid: int, code: int) -> None:
        metrics.process_dead(pid)
        lived = time.monotonic() - worker.started
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if lived >= STABLE_AFTER:
            worker.backoff = FIRST_BACKOFF  # a death after a good run starts afresh
        delay = worker.backoff
        worker.backoff = min(MAX_BACKOFF, worker.backoff * 2)
        log.warning("worker %d (pid %d) died (%s) after %.0fs; starting it again in %.0fs",
                    worker.slot + 1, pid, how, lived, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if not self._stopping.is_set():
            await self._spawn(worker)

    def _stop(self) -> None:
        self.notifier.stopping()
        self._stopping.set()

    def _reload(self) -> None:
        # Each worker reloads on its own (and keeps its old config if the new one is
        # wrong, logging why): systemd hears that the reload was passed on.
        self.notifier.reloading()
        self._pass_on(signal.SIGHUP)
        self.notifier.ready(f"serving with {len(self.workers)} workers (reload passed on)")

    def _pass_on(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _stop_all(self) -> None:
        self._pass_on(signal.SIGTERM)
        running = [w.process for w in self.workers
                   if w.process is not None and w.process.returncode is None]
        if not running:
            return
        grace = self.settings.shutdown_grace + 30
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running],
                                        timeout=grace)
        for process in running:
            if process.returncode is None:
                log.error("worker pid %d still running %.0fs after SIGTERM: killing it",
                          process.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if pending:
            await asyncio.wait(pending, timeout=10)
