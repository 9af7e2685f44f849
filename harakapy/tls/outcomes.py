"""The TLS outcomes the status page shows: every outbound session's result, counted per
hour and destination, and each destination's last failure.

Rules:

1. Each ``tls_result`` is counted in memory by the process that delivered, under (hour,
   destination, policy source, level, result type, TLS version), and added to
   ``DIR/state/status/outcomes.sqlite`` every few seconds in one transaction (counts are
   added, never set: the workers share the file).
2. The policy source is one of :data:`SOURCES`: the kind of policy that decided, not the
   plugin's name, so that the page can say what protects a destination.
3. The last failure of a destination keeps its time, MX host, result type and reason;
   a later failure replaces it.
4. Hours older than ``retention_days`` are removed at the flush.
5. Until :func:`enable` (the server calls it when ``config/status.ini`` turns the
   status page on), :func:`record` returns at once: the delivery path pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.tls.results import TlsResult
from harakapy.tls.sqlite_file import SqliteFile

log = logging.getLogger("harakapy.status")

STATE_FOLDER = "status"
FILE_NAME = "outcomes.sqlite"
FLUSH_INTERVAL = 5.0
HOUR = 3600

# Rule 2, strongest first.
SOURCES = ("dane", "mta-sts enforce", "mta-sts testing", "static", "none")
STATIC_PLUGINS = frozenset({"tls_require", "tls_pin", "tls_policy"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    hour INTEGER NOT NULL,      -- the hour's start, Unix time
    domain TEXT NOT NULL,
    source TEXT NOT NULL,
    level TEXT NOT NULL,
    result TEXT NOT NULL,       -- 'success' or an RFC 8460 result type
    tls_version TEXT NOT NULL,  -- '' without TLS
    count INTEGER NOT NULL,
    PRIMARY KEY (hour, domain, source, level, result, tls_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_failures (
    domain TEXT PRIMARY KEY,
    at REAL NOT NULL,
    mx TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL
) WITHOUT ROWID;
"""


def policy_source(result: TlsResult) -> str:
    """Rule 2."""
    if result.policy_type == "tlsa":
        return "dane"
    if result.policy_type == "sts":
        return "mta-sts enforce" if result.enforced else "mta-sts testing"
    if result.decided_by in STATIC_PLUGINS or result.level not in ("may", "none", ""):
        return "static"
    return "none"


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    mx: str
    result: str
    reason: str


class OutcomeStore:
    """Rule 1's file. Calls block: run them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SqliteFile(path, schema=_SCHEMA)

    def add(self, counts: Counter, failures: dict[str, Failure]) -> None:
        if not counts and not failures:
            return
        with self._file.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
                    "(hour, domain, source, level, result, tls_version) DO UPDATE SET "
                    "count = count + excluded.count",
                    [(*key, count) for key, count in counts.items()])
                db.executemany(
                    "INSERT INTO last_failures VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) "
                    "DO UPDATE SET at = excluded.at, mx = excluded.mx, "
                    "result = excluded.result, reason = excluded.reason "
                    "WHERE excluded.at >= last_failures.at",
                    [(domain, f.at, f.mx, f.result, f.reason[:500])
                     for domain, f in failures.items()])
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def rows(self, since: float) -> list[tuple[int, str, str, str, str, str, int]]:
        """``(hour, domain, source, level, result, tls_version, count)`` from ``since``."""
        with self._file.connection() as db:
            return db.execute("SELECT hour, domain, source, level, result, tls_version, "
                              "count FROM outcomes WHERE hour >= ?",
                              (int(since) // HOUR * HOUR,)).fetchall()

    def last_failures(self) -> dict[str, Failure]:
        with self._file.connection() as db:
            return {row[0]: Failure(*row[1:]) for row in db.execute(
                "SELECT domain, at, mx, result, reason FROM last_failures")}

    def forget(self, before: float) -> None:
        """Rule 4."""
        with self._file.connection() as db:
            db.execute("DELETE FROM outcomes WHERE hour < ?", (int(before),))
            db.execute("DELETE FROM last_failures WHERE at < ?", (before,))

    def close(self) -> None:
        self._file.close()


def outcomes_path(config: Config) -> Path:
    folder = config.state_dir() / STATE_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / FILE_NAME


class Recorder:
    """Rules 1 and 3 for one process."""

    def __init__(self, store: OutcomeStore, clock: Clock, retention_days: int) -> None:
        self.store = store
        self.clock = clock
        self.retention = retention_days * 86400.0
        self._counts: Counter = Counter()
        self._failures: dict[str, Failure] = {}
        self._flushing = asyncio.Lock()

    def record(self, result: TlsResult) -> None:
        now = self.clock.time()
        result_type = result.failure.result_type.value if result.failure else "success"
        self._counts[(int(now) // HOUR * HOUR, result.domain, policy_source(result),
                      result.level, result_type, result.tls_version)] += 1
        if result.failure is not None:
            self._failures[result.domain] = Failure(now, result.mx_hostname, result_type,
                                                    result.failure.reason)

    async def flush(self) -> None:
        async with self._flushing:
            counts, self._counts = self._counts, Counter()
            failures, self._failures = self._failures, {}
            try:
                await asyncio.to_thread(self.store.add, counts, failures)
            except Exception:
                self._counts.update(counts)
                for domain, failure in failures.items():
                    self._failures.setdefault(domain, failure)
                raise
            await asyncio.to_thread(self.store.forget, self.clock.time() - self.retention)

    async def run(self) -> None:
        """Rule 1's flush, until cancelled (then once more)."""
        try:
            while True:
                await self.clock.sleep(FLUSH_INTERVAL)
                try:
                    await self.flush()
                except Exception:
                    log.exception("status: the TLS outcomes could not be written")
        finally:
            await asyncio.shield(self.flush())


_recorder: Recorder | None = None


def enable(config: Config, clock: Clock, retention_days: int) -> Recorder:
    """Rule 5: this process records (``config/status.ini`` turns the page on)."""
    global _recorder
    if _recorder is None or _recorder.store.path != outcomes_path(config):
        disable()
        _recorder = Recorder(OutcomeStore(outcomes_path(config)), clock, retention_days)
    return _recorder


def disable() -> None:
    """The process stops recording (the server stopped); its file is closed."""
    global _recorder
    if _recorder is not None:
        _recorder.store.close()
        _recorder = None


def recording() -> bool:
    """Whether :func:`record` keeps anything (so that a caller need not build a result
    for nothing)."""
    return _recorder is not None


def record(result: TlsResult) -> None:
    if _recorder is not None:
        _recorder.record(result)
