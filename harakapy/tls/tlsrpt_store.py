"""The TLS report data: session counts per UTC day, domain, policy and failure detail,
kept in one SQLite file that every worker process adds to.

Rules:

1. Counts are added, never set: each process adds what it counted since its last flush
   in one transaction (``INSERT ... ON CONFLICT DO UPDATE SET count = count + ...``), so
   several writers never lose each other's sessions and a crash loses at most one
   process's unflushed batch.
2. A policy and a detail are stored as canonical JSON (sorted keys), which is also what
   tells two of them apart.
3. Days before a cut-off are removed once their reports are done or no longer wanted.
4. Each (day, domain) has a version that every batch adding to it raises, in the same
   transaction, and the version last handed to the fleet (``shipped``): what a fleet
   node has not yet shared is the pairs whose version is ahead (harakapy.fleet.tlsrpt).

Calls block (SQLite is a file): the plugin runs them in a thread.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from harakapy.tls.sqlite_file import SqliteFile
from harakapy.tls.tlsrpt_report import DetailKey, PolicyCounts, PolicyKey, SessionKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    policy TEXT NOT NULL,
    detail TEXT NOT NULL,   -- '' for successes
    count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy, detail)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    day TEXT NOT NULL,
    domain TEXT NOT NULL,
    version INTEGER NOT NULL,
    shipped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain)
) WITHOUT ROWID;
"""


def _policy_text(policy: PolicyKey) -> str:
    return json.dumps([policy.type, policy.domain, list(policy.strings), list(policy.mx)],
                      separators=(",", ":"))


def _detail_text(detail: DetailKey | None) -> str:
    if detail is None:
        return ""
    return json.dumps([detail.result_type, detail.sending_ip, detail.mx_hostname,
                       detail.mx_helo, detail.receiving_ip, detail.reason_code],
                      separators=(",", ":"))


def _policy_of(text: str) -> PolicyKey:
    kind, domain, strings, mx = json.loads(text)
    return PolicyKey(kind, domain, tuple(strings), tuple(mx))


def _detail_of(text: str) -> DetailKey | None:
    return DetailKey(*json.loads(text)) if text else None


def tally(rows: Iterable[tuple[str, str, int]]) -> dict[PolicyKey, PolicyCounts]:
    """Stored ``(policy, detail, count)`` rows as a report's counts, per policy; rows of
    the same policy and detail (from several nodes of a fleet) add up."""
    found: dict[PolicyKey, PolicyCounts] = {}
    for policy_text, detail_text, count in rows:
        entry = found.setdefault(_policy_of(policy_text), PolicyCounts())
        detail = _detail_of(detail_text)
        if detail is None:
            entry.success += count
        else:
            entry.failure += count
            entry.details[detail] = entry.details.get(detail, 0) + count
    return found


class SessionStore:
    """Session counts in SQLite (WAL, a busy timeout, one transaction per flush)."""

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._file = SqliteFile(path, busy_timeout=busy_timeout, schema=_SCHEMA)
        self._connection = self._file.connection

    def add(self, counts: Mapping[SessionKey, int]) -> None:
        """Rule 1: add a batch of session counts."""
        if not counts:
            return
        rows = [(key.day.isoformat(), key.domain, _policy_text(key.policy),
                 _detail_text(key.detail), count) for key, count in counts.items()]
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO sessions (day, domain, policy, detail, count) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, domain, policy, detail) "
                    "DO UPDATE SET count = count + excluded.count", rows)
                db.executemany(
                    "INSERT INTO versions (day, domain, version) VALUES (?, ?, 1) "
                    "ON CONFLICT (day, domain) DO UPDATE SET version = version + 1",
                    sorted({(row[0], row[1]) for row in rows}))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def domains(self, day: datetime.date) -> list[str]:
        with self._connection() as db:
            return [row[0] for row in db.execute(
                "SELECT DISTINCT domain FROM sessions WHERE day = ? ORDER BY domain",
                (day.isoformat(),))]

    def days(self) -> list[datetime.date]:
        with self._connection() as db:
            return [datetime.date.fromisoformat(row[0]) for row in db.execute(
                "SELECT DISTINCT day FROM sessions ORDER BY day")]

    def counts(self, day: datetime.date, domain: str) -> dict[PolicyKey, PolicyCounts]:
        """What one domain's report for ``day`` says, per policy."""
        return tally(self.rows(day, domain))

    def rows(self, day: datetime.date, domain: str) -> list[tuple[str, str, int]]:
        """The stored rows of one day and domain: ``(policy, detail, count)`` as stored
        (rule 2)."""
        with self._connection() as db:
            return db.execute("SELECT policy, detail, count FROM sessions WHERE day = ? "
                              "AND domain = ?", (day.isoformat(), domain)).fetchall()

    def unshipped(self) -> list[tuple[datetime.date, str, int]]:
        """Rule 4: ``(day, domain, version)`` of what changed since it was shipped."""
        with self._connection() as db:
            return [(datetime.date.fromisoformat(day), domain, version)
                    for day, domain, version in db.execute(
                        "SELECT day, domain, version FROM versions WHERE version > shipped "
                        "ORDER BY day, domain")]

    def shipped(self, day: datetime.date, domain: str, version: int) -> None:
        """Rule 4: ``version`` of the pair is in the fleet's hands."""
        with self._connection() as db:
            db.execute("UPDATE versions SET shipped = ? WHERE day = ? AND domain = ? AND "
                       "shipped < ?", (version, day.isoformat(), domain, version))

    def ship_again(self) -> None:
        """Rule 4: everything is to be shipped again (the fleet's Redis lost its data)."""
        with self._connection() as db:
            # Days counted before the versions were kept have none yet.
            db.execute("INSERT OR IGNORE INTO versions (day, domain, version) "
                       "SELECT DISTINCT day, domain, 1 FROM sessions")
            db.execute("UPDATE versions SET shipped = 0")

    def forget(self, before: datetime.date, domain: str | None = None) -> int:
        """Rule 3: remove days before ``before`` (for one domain, or all)."""
        where, values = ("day < ?", (before.isoformat(),)) if domain is None else \
            ("day < ? AND domain = ?", (before.isoformat(), domain))
        with self._connection() as db:
            db.execute(f"DELETE FROM versions WHERE {where}", values)
            return db.execute(f"DELETE FROM sessions WHERE {where}", values).rowcount

    def close(self) -> None:
        self._file.close()


_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    report_id TEXT NOT NULL,
    rua TEXT NOT NULL,        -- '' : the domain asked for no report (nothing to send)
    state TEXT NOT NULL,      -- pending, sent, gave-up, none
    attempts INTEGER NOT NULL DEFAULT 0,
    first_try REAL NOT NULL,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (report_id, rua)
) WITHOUT ROWID;
"""


class DeliveryLog:
    """What became of each report at each of its destinations, kept beside the counts:
    a report an endpoint accepted is marked ``sent`` and never sent again, across
    restarts too.

    :param path: The same SQLite file as the :class:`SessionStore`, or another.
    """

    PENDING, SENT, GAVE_UP, NONE = "pending", "sent", "gave-up", "none"

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self._file = SqliteFile(path, busy_timeout=busy_timeout, schema=_LOG_SCHEMA)

    def states(self, report_id: str) -> dict[str, tuple[str, int, float, float, str]]:
        """``rua -> (state, attempts, first_try, next_try, last_error)``."""
        with self._file.connection() as db:
            return {row[0]: tuple(row[1:]) for row in db.execute(
                "SELECT rua, state, attempts, first_try, next_try, last_error FROM "
                "deliveries WHERE report_id = ?", (report_id,))}

    def begin(self, report_id: str, ruas: list[str], now: float) -> None:
        """Note the destinations of a report (those already noted keep their state)."""
        with self._file.connection() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (report_id, rua, state, first_try, "
                "next_try) VALUES (?, ?, ?, ?, ?)",
                [(report_id, rua, self.PENDING if rua else self.NONE, now, now)
                 for rua in (ruas or [""])])

    def update(self, report_id: str, rua: str, state: str, *, next_try: float = 0.0,
               error: str = "") -> None:
        with self._file.connection() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, "
                       "next_try = ?, last_error = ? WHERE report_id = ? AND rua = ?",
                       (state, next_try, error[:500], report_id, rua))

    def reports(self) -> dict[str, dict[str, tuple[str, int, float, float, str]]]:
        """Every report's :meth:`states`, by report-id."""
        found: dict[str, dict[str, tuple[str, int, float, float, str]]] = {}
        with self._file.connection() as db:
            for row in db.execute("SELECT report_id, rua, state, attempts, first_try, "
                                  "next_try, last_error FROM deliveries"):
                found.setdefault(row[0], {})[row[1]] = tuple(row[2:])
        return found

    def forget(self, before: datetime.date) -> int:
        """Remove what is known of reports of days before ``before`` (report-ids begin
        with their day's start, ``YYYY-MM-DDT00:00:00Z``)."""
        with self._file.connection() as db:
            return db.execute("DELETE FROM deliveries WHERE report_id < ?",
                              (before.isoformat(),)).rowcount

    def done(self, report_id: str) -> bool:
        """Whether nothing is left to send for the report (it may never have begun)."""
        states = self.states(report_id)
        return bool(states) and all(s[0] != self.PENDING for s in states.values())

    def close(self) -> None:
        self._file.close()
