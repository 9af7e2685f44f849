"""The MTA-STS policy cache: what is known of each policy domain, kept across restarts.

Rules:

1. A stored policy is the raw policy file as fetched, its TXT ``id``, and when it was
   fetched and expires (``fetched + max_age``, RFC 8461 3.3: counted from the last
   successful fetch). It is parsed again when read: the store holds what the policy host
   said, never a looser reading of it.
2. A failure never removes a policy (RFC 8461 3.3, invariant 8): it is noted beside it
   (``error``, and ``retry_after`` with the ``id`` that failed), and the policy stays
   until it expires or a ``mode: none`` policy replaces it.
3. ``used`` is when mail last went to the domain: the refresh task renews only what was
   used lately, so an idle cache does not fetch forever.
4. :class:`PolicyStore` is the interface; :class:`SqliteStore` keeps it in one SQLite
   file that every worker process shares (WAL, a busy timeout, one short transaction
   per write). A fleet-wide store implements the same methods.

Calls block (SQLite is a file): the plugin runs them in a thread.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from harakapy.tls.mta_sts import StsError, StsPolicy, parse_policy
from harakapy.tls.sqlite_file import SqliteFile


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """One policy domain's entry.

    :ivar body: The policy file as fetched; empty when no policy was ever fetched (an
        entry that only remembers a failure).
    :ivar record_id: The TXT ``id`` the policy was fetched under.
    :ivar fetched: When it was fetched; ``expires`` is ``fetched + max_age``.
    :ivar checked: When the TXT record was last looked at.
    :ivar used: When mail last went to the domain.
    :ivar error: The last failure (``result-type: reason``), empty after a success.
    :ivar failed_id: The TXT ``id`` whose fetch failed, not to be tried before
        ``retry_after`` (RFC 8461 3.3: five minutes).
    """

    domain: str
    body: bytes = b""
    record_id: str = ""
    fetched: float = 0.0
    expires: float = 0.0
    checked: float = 0.0
    used: float = 0.0
    error: str = ""
    failed_id: str = ""
    retry_after: float = 0.0

    def policy(self) -> StsPolicy | None:
        """The stored policy, parsed; ``None`` for none (or a body that no longer
        parses, which cannot be applied)."""
        if not self.body:
            return None
        try:
            return parse_policy(self.body)
        except StsError:
            return None

    def valid_at(self, now: float) -> bool:
        """Whether it holds a policy that has not expired."""
        return bool(self.body) and now < self.expires

    def retry_allowed(self, record_id: str, now: float) -> bool:
        """Whether a fetch for ``record_id`` may be tried now (rule 2's back-off)."""
        return record_id != self.failed_id or now >= self.retry_after

    def fetched_now(self, body: bytes, policy: StsPolicy, record_id: str,
                    now: float) -> CachedPolicy:
        """This entry after a successful fetch."""
        return replace(self, body=body, record_id=record_id, fetched=now,
                       expires=now + policy.max_age, checked=now, error="", failed_id="",
                       retry_after=0.0)

    def failed_now(self, record_id: str, error: str, now: float,
                   backoff: float) -> CachedPolicy:
        """This entry after a failed fetch: the policy it held stays (rule 2)."""
        return replace(self, checked=now, error=error, failed_id=record_id,
                       retry_after=now + backoff)


def newer(mine: CachedPolicy | None, theirs: CachedPolicy | None) -> CachedPolicy | None:
    """Of two copies of an entry (a node's and a fleet's), the newer: the one fetched
    later, then checked later; ``mine`` when they are as new."""
    if theirs is None:
        return mine
    if mine is None or (theirs.fetched, theirs.checked) > (mine.fetched, mine.checked):
        return theirs
    return mine


class SharedPolicies(Protocol):
    """A cache shared with other nodes (a fleet's, harakapy.fleet.sts). None of its
    methods raises for a store that cannot be reached: it answers as said."""

    async def shared(self, domain: str) -> tuple[bool, CachedPolicy | None]:
        """``(reached, entry)``: whether the store answered, and its entry if any."""
        ...

    async def publish(self, entry: CachedPolicy, now: float) -> bool:
        """Share ``entry`` unless a newer copy is there; whether it did."""
        ...

    def turn(self, domain: str) -> AbstractAsyncContextManager[bool]:
        """The domain's turn to fetch, waiting while another node holds it; yields
        whether it is this node's."""
        ...


class PolicyStore(Protocol):
    """Where cached policies live (rule 4)."""

    def get(self, domain: str) -> CachedPolicy | None:
        """The entry for ``domain``, if any."""
        ...

    def put(self, entry: CachedPolicy) -> None:
        """Store ``entry``, replacing the domain's."""
        ...

    def touch(self, domain: str, now: float) -> None:
        """Note that mail went to ``domain`` at ``now`` (rule 3)."""
        ...

    def delete(self, domain: str) -> None:
        """Forget ``domain`` (``mode: none``, or an operator's command)."""
        ...

    def entries(self) -> list[CachedPolicy]:
        """Every entry, by domain."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    record_id TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL NOT NULL,
    checked REAL NOT NULL,
    used REAL NOT NULL,
    error TEXT NOT NULL,
    failed_id TEXT NOT NULL,
    retry_after REAL NOT NULL
)
"""
_COLUMNS = ("domain", "body", "record_id", "fetched", "expires", "checked", "used", "error",
            "failed_id", "retry_after")


class SqliteStore:
    """:class:`PolicyStore` in one SQLite file (rule 4).

    :param path: The database file (the plugin's state directory); created when missing.
    :param busy_timeout: Seconds to wait for another process's write to finish.
    """

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        # FULL: a stored policy survives power loss.
        self._file = SqliteFile(path, synchronous="FULL", busy_timeout=busy_timeout,
                                schema=_SCHEMA)
        self._connection = self._file.connection

    def get(self, domain: str) -> CachedPolicy | None:
        with self._connection() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM policies WHERE domain = ?",
                             (domain,)).fetchone()
        return CachedPolicy(*row) if row is not None else None

    def put(self, entry: CachedPolicy) -> None:
        values = tuple(getattr(entry, column) for column in _COLUMNS)
        with self._connection() as db:
            db.execute(f"INSERT OR REPLACE INTO policies ({', '.join(_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)

    def touch(self, domain: str, now: float) -> None:
        with self._connection() as db:
            db.execute("UPDATE policies SET used = ? WHERE domain = ? AND used < ?",
                       (now, domain, now))

    def delete(self, domain: str) -> None:
        with self._connection() as db:
            db.execute("DELETE FROM policies WHERE domain = ?", (domain,))

    def entries(self) -> list[CachedPolicy]:
        with self._connection() as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM policies "
                              "ORDER BY domain").fetchall()
        return [CachedPolicy(*row) for row in rows]

    def close(self) -> None:
        self._file.close()
