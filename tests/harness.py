"""Test parts that stand in for the world around harakapy: a config directory written as an
operator would write it, the real server running in this process, and SMTP clients.

Real sockets on loopback throughout; nothing here replaces a harakapy component.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.server import MailServer

# Every test server listens on an OS-chosen port: a fixed port flakes in parallel runs.
DEFAULT_SMTP_INI = "[main]\nlisten = 127.0.0.1:0\n"

# A queue plugin that keeps every message in server.notes, written into DIR/plugins the way
# an operator writes a plugin.
CAPTURE_PLUGIN = '''
from harakapy import hookimpl, ok


@hookimpl
def queue(transaction, server):
    server.notes.setdefault("captured", []).append(("queue", transaction))
    return ok()


@hookimpl
def queue_outbound(transaction, server):
    server.notes.setdefault("captured", []).append(("queue_outbound", transaction))
    return ok()
'''


def write_config_dir(root: Path, files: dict[str, str] | None = None,
                     plugins: dict[str, str] | None = None) -> Path:
    """Write ``root/config/<name>`` and ``root/plugins/<name>.py`` files (dedented)."""
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "plugins").mkdir(exist_ok=True)
    (root / "queue").mkdir(exist_ok=True)
    files = {"smtp.ini": DEFAULT_SMTP_INI, **(files or {})}
    for name, text in files.items():
        path = root / "config" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for name, text in (plugins or {}).items():
        path = root / "plugins" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@dataclass
class Running:
    server: MailServer
    root: Path
    ports: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def captured(self) -> list[tuple[str, object]]:
        return self.server.notes.setdefault("captured", [])


class ManualClock(Clock):
    """A clock that moves only when the test says so (``advance``)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        try:
            await future
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not future]

    def pending(self) -> list[float]:
        """The deadlines of the sleeps not yet over: a test waits for a task to be
        asleep before it moves the clock past that task's wake-up."""
        return [deadline for deadline, future in self._sleepers if not future.done()]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)


@asynccontextmanager
async def running_server(root: Path, *, clock: Clock | None = None) -> AsyncIterator[Running]:
    server = MailServer(Config.load(root), clock=clock)
    await server.start()
    running = Running(server, root, [address.port for address, _ in server.listeners])
    try:
        yield running
    finally:
        await server.stop(grace=1.0)


class RawClient:
    """An SMTP client that sends exactly the bytes it is given and reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1",
                      ssl_context: ssl.SSLContext | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context,
                                                       limit=1 << 20)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """One reply: ``(code, text)``, multi-line text joined with newlines."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionResetError("server closed the connection")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text[4:])
                if len(text) < 4 or text[3] != "-":
                    return int(text[:3]), "\n".join(lines)

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str | bytes) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        await self.send(line + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the connection (reads to EOF) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost"
                       ) -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def insecure_client_context() -> ssl.SSLContext:
    """A client context that accepts any certificate: for tests of *inbound* TLS, where the
    client's checks are not what is under test."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # inbound tests: we test the server, not the client
    return context


async def sendmail(port: int, sender: str, recipients: list[str], message: bytes, *,
                   host: str = "127.0.0.1", starttls: ssl.SSLContext | None = None,
                   mail_options: tuple[str, ...] = ()) -> dict:
    """Send one message with the standard library's smtplib, in a thread so the server in
    this event loop keeps running. Raises smtplib's exceptions as a user would see them."""

    def send() -> dict:
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            if starttls is not None:
                smtp.starttls(context=starttls)
            return smtp.sendmail(sender, recipients, message, mail_options=list(mail_options))

    return await asyncio.to_thread(send)


async def eventually(check, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Wait until ``check()`` is true (polling the real event loop, not sleeping a guess)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(interval)


async def advancing(clock: ManualClock, seconds: float, check, timeout: float = 30.0) -> None:
    """Move ``clock`` on by ``seconds`` at a time until ``check()`` is true: for what the
    server's tasks do on their own clock (a flush every few seconds)."""
    def moved() -> bool:
        if check():
            return True
        clock.advance(seconds)
        return False

    await eventually(moved, timeout)
