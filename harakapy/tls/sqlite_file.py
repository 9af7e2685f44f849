"""One SQLite file that several threads and processes share: the stores of the MTA-STS
cache and the TLS reports are built on it.

A connection per thread (sqlite3's rule), autocommit unless a store opens a
transaction itself, WAL so that readers never wait for a writer, and a busy timeout so
that a writer in another process is waited for rather than an error. Opening is retried
within the same timeout too: SQLite answers "database is locked" at once, without its
busy handler, to a process that switches a file to WAL or writes its schema while
another process does the same (workers starting together on a new file).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class SqliteFile:
    """:param synchronous: ``FULL`` where a write must survive power loss, ``NORMAL``
        where losing the last transactions to a power cut is acceptable.
    :param schema: SQL run once at opening (``CREATE TABLE IF NOT EXISTS ...``).
    """

    def __init__(self, path: Path, *, synchronous: str = "NORMAL",
                 busy_timeout: float = 10.0, schema: str = "") -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        if schema:
            with self.connection() as db:
                self._retried(lambda: db.executescript(schema))

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                 isolation_level=None)
            self._retried(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.db = db
        yield db

    def _retried(self, step: Callable[[], object]) -> None:
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
