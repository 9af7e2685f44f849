"""The control sockets: how ``harakapy queue flush|delete|stats`` reach a running server.

Each worker process listens on a UNIX socket in the spool directory, ``queue/control.sock``
for the first and ``queue/control-<slot>.sock`` for the others (mode 0600, in a 0700
directory, so only the spool's owner can steer them): one JSON request line, one JSON
answer line. A command goes to every worker, and their answers are combined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("harakapy.control")

SOCKET_NAME = "control.sock"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    # A deep spool directory can exceed sun_path; /proc/self/fd/N/name reaches the same
    # place through an open directory descriptor.
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def socket_name(slot: int) -> str:
    return SOCKET_NAME if slot == 0 else f"control-{slot}.sock"


async def serve(spool_dir: Path, handle: Callable[[dict[str, Any]], dict[str, Any]], *,
                slot: int = 0) -> asyncio.Server:
    path = spool_dir / socket_name(slot)
    path.unlink(missing_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                answer = handle(request) if isinstance(request, dict) else \
                    {"ok": False, "error": "expected a JSON object"}
            except ValueError:
                answer = {"ok": False, "error": "expected one JSON line"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    with _short_path(path) as address:
        server = await asyncio.start_unix_server(on_client, path=address)
    os.chmod(path, 0o600)
    return server


def request(spool_dir: Path, command: dict[str, Any], *, timeout: float = 10.0
            ) -> dict[str, Any] | None:
    """Send ``command`` to every worker running on ``spool_dir`` and combine their answers
    (counts added, ``ok`` when any says so, lists joined); ``None`` when none runs."""
    answers = [answer for path in sorted(spool_dir.glob("control*.sock"))
               if (answer := _ask(path, command, timeout)) is not None]
    if not answers:
        return None
    combined: dict[str, Any] = {}
    for answer in answers:
        for key, value in answer.items():
            old = combined.get(key)
            if key == "ok":
                combined[key] = bool(old) or bool(value)
            elif isinstance(value, bool) or old is None:
                combined.setdefault(key, value)
            elif isinstance(value, int | float):
                combined[key] = old + value
            elif isinstance(value, list):
                combined[key] = sorted({*old, *value})
    combined["workers"] = len(answers)
    return combined


def _ask(path: Path, command: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _short_path(path) as address:
                sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket left behind by a server that is gone
        sock.sendall(json.dumps(command).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data else None
