"""systemd's service notifications (sd_notify(3)) for ``Type=notify`` units, and the unit.

The main process says ``READY=1`` once every listener is bound and the spool recovered
(with workers: once every worker said so), ``RELOADING=1`` then ``READY=1`` around a
SIGHUP reload, ``STOPPING=1`` on SIGTERM, and ``WATCHDOG=1`` at half the interval
``WatchdogSec=`` asks for. Without ``NOTIFY_SOCKET`` (not under systemd) nothing is sent.
The datagrams go through ``sdnotify``, the small library that does exactly this.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

import sdnotify

ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """What the main process tells systemd; every method does nothing outside systemd."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET")) if enabled is None else enabled
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    @classmethod
    def disabled(cls) -> Notifier:
        return cls(enabled=False)

    def _send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: what systemd 253's Type=notify-reload wants with RELOADING=1.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={now}",
                   "STATUS=reloading the config directory")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping: finishing the transactions in flight")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives: half of ``WatchdogSec``; ``None`` without one (or
        when it is meant for another process)."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not self.enabled or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6 / 2

    async def keep_alive(self) -> None:
        """``WATCHDOG=1`` every :meth:`watchdog_interval` while the event loop runs: a
        loop that stops turning stops them, and systemd restarts the service."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)


def child_environment() -> dict[str, str]:
    """The environment for worker processes: only the main process talks to systemd."""
    return {key: value for key, value in os.environ.items() if key not in ENV}


def unit(root: Path, *, user: str = "", group: str = "") -> str:
    """A ``Type=notify`` unit running ``harakapy run -c ROOT``.

    :param user: ``[main] user`` of ``smtp.ini``: the server starts as root, binds its
        ports and drops to it; without one, systemd starts it as ``harakapy`` with the
        one capability it needs to bind port 25.
    """
    command = shlex.join([sys.executable, "-m", "harakapy", "run", "-c", str(root)])
    check = shlex.join([sys.executable, "-m", "harakapy", "check", "-c", str(root)])
    if user:
        who = ["# Starts as root, binds its ports, then drops to [main] user/group of",
               "# config/smtp.ini for good (docs/operations.md).",
               "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID "
               "CAP_CHOWN CAP_DAC_READ_SEARCH"]
    else:
        who = ["User=harakapy", f"Group={group or 'harakapy'}",
               "AmbientCapabilities=CAP_NET_BIND_SERVICE",
               "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"]
    lines = [
        "[Unit]",
        "Description=harakapy mail server",
        "Documentation=https://pypi.org/project/harakapy/",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"ExecStartPre={check}",
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=90",
        "WatchdogSec=60",
        *who,
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={root}",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitNOFILE=65536",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
