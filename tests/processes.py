"""``harakapy`` as a user runs it: a real subprocess, its stderr log, its exit code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# A plugin an operator might write: keep each queued message as a file, for the test to read.
MAILDROP_PLUGIN = '''
from pathlib import Path

from harakapy import hookimpl, ok


def _drop(server, transaction, kind):
    folder = server.config.root / "maildrop"
    folder.mkdir(exist_ok=True)
    (folder / f"{transaction.id}.{kind}.eml").write_bytes(transaction.message)
    return ok()


@hookimpl
def queue(server, transaction):
    return _drop(server, transaction, "local")


@hookimpl
def queue_outbound(server, transaction):
    return _drop(server, transaction, "outbound")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def harakapy(*args: str, env: dict[str, str] | None = None, input: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``harakapy ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "harakapy", *args], capture_output=True,
                          text=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})})


class ServerProcess:
    """``harakapy run`` in a subprocess; ``lines`` collects its stderr as it arrives."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> None:
        self.process = subprocess.Popen(
            [python, "-m", "harakapy", "run", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if text in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged; log so far:\n" + "\n".join(self.lines))

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            if self.process.stdout:
                self.process.stdout.close()
            if self.process.stderr:
                self.process.stderr.close()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def free_port_on(host: str) -> int:
    """A TCP port free on ``host`` now (a receiver on 127.0.0.x that a test starts later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def memory_of(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of ``/proc/<pid>/status`` in bytes: ``VmRSS`` now, ``VmHWM`` its
    peak (Linux)."""
    sizes = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            sizes[key] = int(value.split()[0]) * 1024
    return sizes
