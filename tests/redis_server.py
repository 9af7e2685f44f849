"""A real ``redis-server`` (Debian's ``redis-server`` package) on loopback for the fleet
tests: started on a free port with a folder of its own, killed with SIGKILL and started
again on the same port, asked how many commands it ran."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.dnssec_world import require_binary
from tests.processes import free_port


class RedisServer:
    """``redis-server`` in ``folder``; no persistence (a restart comes back empty, the
    harder case for the fleet), unless ``persist``; ``password`` sets requirepass."""

    def __init__(self, folder: Path, *, password: str | None = None,
                 persist: bool = False) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--daemonize", "no", "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--logfile", str(self.folder / "redis.log")]
        if self.persist:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: what a crashed Redis looks like to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()

    def client(self) -> redis.Redis:
        """A synchronous client, for the test's own looks (in a thread when a server runs
        in the test's event loop)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=5)

    def commands_processed(self) -> int:
        with self.client() as client:
            return int(client.info("stats")["total_commands_processed"])

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def log_tail(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"
