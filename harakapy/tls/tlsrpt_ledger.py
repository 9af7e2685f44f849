"""Where the report round reads the day's counts and keeps what became of each report:
the node's own SQLite file, or the fleet's Redis (``harakapy.fleet.tlsrpt``).

Rules:

1. A ledger answers for the sessions a report must cover: one node's, or every node's
   of a fleet. The round asks it, never the stores behind it.
2. ``lease`` gives the one sender of a report: on one node that is the process that
   runs the round (the background-task lock), so it always grants.
3. ``ready`` says whether a day's counts are all in: always on one node, whose workers
   have flushed by ``due_at``; a fleet may still wait for a node.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from harakapy.tls.tlsrpt_report import PolicyCounts, PolicyKey
from harakapy.tls.tlsrpt_store import DeliveryLog, SessionStore

State = tuple[str, int, float, float, str]  # state, attempts, first_try, next_try, error


class Lease(Protocol):
    """A report's sending turn (rule 2): ``held`` says whether it is this node's;
    :meth:`renew` keeps it while the report goes out, and says whether it still is."""

    held: bool

    async def renew(self) -> bool: ...


class Granted:
    """The lease of a single node: always its own."""

    held = True

    async def renew(self) -> bool:
        return True


class Ledger(Protocol):
    async def days(self) -> list[datetime.date]: ...

    async def domains(self, day: datetime.date) -> list[str]: ...

    async def counts(self, day: datetime.date, domain: str) -> dict[PolicyKey, PolicyCounts]:
        ...

    async def ready(self, day: datetime.date, now: float, due: float) -> str:
        """Empty when every session of ``day`` is counted (or waiting is over), else what
        is awaited; ``due`` is when the report fell due."""
        ...

    def lease(self, report_id: str) -> AsyncIterator[Lease]: ...

    async def states(self, report_id: str) -> dict[str, State]: ...

    async def begin(self, report_id: str, ruas: list[str], now: float) -> None: ...

    async def update(self, report_id: str, rua: str, state: str, *, next_try: float,
                     error: str) -> None: ...

    async def done(self, report_id: str) -> bool: ...

    async def forget(self, before: datetime.date) -> None: ...


class LocalLedger:
    """One node's ledger: the SQLite file its workers share."""

    def __init__(self, sessions: SessionStore, deliveries: DeliveryLog) -> None:
        self.sessions = sessions
        self.deliveries = deliveries

    async def days(self) -> list[datetime.date]:
        return await asyncio.to_thread(self.sessions.days)

    async def domains(self, day: datetime.date) -> list[str]:
        return await asyncio.to_thread(self.sessions.domains, day)

    async def counts(self, day: datetime.date, domain: str) -> dict[PolicyKey, PolicyCounts]:
        return await asyncio.to_thread(self.sessions.counts, day, domain)

    async def ready(self, day: datetime.date, now: float, due: float) -> str:
        return ""

    @asynccontextmanager
    async def lease(self, report_id: str) -> AsyncIterator[Lease]:
        yield Granted()

    async def states(self, report_id: str) -> dict[str, State]:
        return await asyncio.to_thread(self.deliveries.states, report_id)

    async def begin(self, report_id: str, ruas: list[str], now: float) -> None:
        await asyncio.to_thread(self.deliveries.begin, report_id, ruas, now)

    async def update(self, report_id: str, rua: str, state: str, *, next_try: float,
                     error: str) -> None:
        await asyncio.to_thread(self.deliveries.update, report_id, rua, state,
                                next_try=next_try, error=error)

    async def done(self, report_id: str) -> bool:
        return await asyncio.to_thread(self.deliveries.done, report_id)

    async def forget(self, before: datetime.date) -> None:
        await asyncio.to_thread(self.sessions.forget, before)
        # A day past retention has no counts left to send again: its log can go too.
        await asyncio.to_thread(self.deliveries.forget, before)
