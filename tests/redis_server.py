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
    harder case for the fleet), unless ``persist``; ``password`` sets requirepass.

    :param unix: Listen on ``folder/redis.sock`` too.
    :param tls: ``(cert, key, ca)`` files: TLS only, on :attr:`port`.
    :param sentinel_of: Run as a Sentinel watching that server as ``mymaster``.
    """

    def __init__(self, folder: Path, *, password: str | None = None,
                 persist: bool = False, unix: bool = False,
                 tls: tuple[Path, Path, Path] | None = None,
                 sentinel_of: RedisServer | None = None) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.persist = persist
        self.socket = folder / "redis.sock" if unix else None
        self.tls = tls
        self.sentinel_of = sentinel_of
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _arguments(self) -> list[str]:
        if self.sentinel_of is not None:
            conf = self.folder / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
                            f"sentinel monitor mymaster 127.0.0.1 {self.sentinel_of.port} 1\n"
                            + (f"sentinel auth-pass mymaster {self.sentinel_of.password}\n"
                               if self.sentinel_of.password else ""))
            return [self.binary, str(conf), "--sentinel", "--daemonize", "no",
                    "--logfile", str(self.folder / "redis.log")]
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--daemonize", "no", "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--logfile", str(self.folder / "redis.log")]
        if self.persist:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        if self.tls is not None:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no"]
        return args

    def start(self) -> RedisServer:
        args = self._arguments()
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
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[2])} if self.tls else {}
        password = None if self.sentinel_of is not None else self.password
        return redis.Redis(host="127.0.0.1", port=self.port, password=password,
                           socket_timeout=5, **tls)

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
