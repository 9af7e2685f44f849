"""The fleet's TLS report ledger in Redis: every node's session counts, and one sender
per report.

Rules:

1. Each node keeps counting into its own SQLite file, as a single node does, and hands
   the fleet its *totals* per day and domain (a hash field per node, policy and detail,
   set, never added to): handing the same totals in twice changes nothing, so a retry,
   a crash between handing in and noting it, or a merge after an outage never counts a
   session twice, and what a node counted while Redis was away goes in when it returns.
2. Redis holds no data of its own: a Redis that restarted (its ``run_id`` changed,
   whatever it kept: nothing, a snapshot, an AOF) is given every node's totals again,
   and the delivery states the nodes keep, and no report is sent until every node has
   had ``grace`` seconds to do so.
3. A day's report counts every node's sessions: the fields of all nodes add up, and
   the sender waits, up to ``settle`` past the report's due time, for each node seen
   during that day to have handed in its counts from after the day.
4. One node sends a report: it holds ``PREFIX tlsrpt:lease:REPORT-ID`` (``lease``
   seconds, renewed while it sends) and writes each destination's outcome
   beside it in Redis before it moves on. A holder that dies leaves the lease to lapse;
   the next holder sends only what is not marked done. Between an endpoint's acceptance
   and that write lies the one window in which a report could go twice; its report-id
   is the same, which receivers use to tell duplicates apart (RFC 8460 4.4).
5. Redis being down: reports wait (a partial report is worse than a late one), counting
   goes on locally (:class:`FleetDown` is the caller's signal).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from harakapy.tls.tlsrpt_ledger import Lease, LocalLedger, State
from harakapy.tls.tlsrpt_report import PolicyCounts, PolicyKey
from harakapy.tls.tlsrpt_store import tally

if TYPE_CHECKING:
    from harakapy.fleet.link import RedisLink

log = logging.getLogger("harakapy.tlsrpt")

SEPARATOR = "\x1f"  # between node, policy and detail in a counts field
PAIRS_PER_PIPELINE = 200

def midnight_after(day: datetime.date) -> float:
    return datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(),
                                     datetime.UTC).timestamp()


class FleetLedger:
    """Rules 1 to 5 for one node.

    :param link: The node's Redis link.
    :param local: The node's own ledger: its counts, and a copy of the delivery states.
    :param lease: Seconds a report's sender holds it (``[tlsrpt] lease``).
    :param settle: Seconds past due that a report waits for late nodes.
    :param grace: Seconds after Redis came back empty before reports go again.
    :param flushed: Seconds after midnight by which every process of a node has written
        the day's last sessions to its file (two flush intervals).
    :param retention: Days kept, as ``[main] retention_days`` of tlsrpt.ini.
    """

    def __init__(self, link: RedisLink, local: LocalLedger, *, lease: float, settle: float,
                 grace: float, flushed: float, retention: int) -> None:
        self.link = link
        self.local = local
        self.lease_time = lease
        self.settle = settle
        self.grace = grace
        self.flushed = flushed
        self.keep = int((retention + 2) * 86400)
        self._epoch: str | None = None
        self._late_noted: set[str] = set()
        self._done: set[str] = set()

    def _key(self, *parts: str) -> str:
        return self.link.key("tlsrpt", *parts)

    # -- handing in (rules 1 and 2) ---------------------------------------------------------

    async def ship(self, now: float) -> int:
        """Hand in what changed here since the last time; how many (day, domain) pairs.

        :raises FleetDown: Redis cannot be reached (nothing is lost: the pairs stay due).
        """
        sessions = self.local.sessions
        epoch = await self._current_epoch(now)
        if epoch != self._epoch:
            # This process has not handed in to this Redis before, or Redis lost its data.
            await asyncio.to_thread(sessions.ship_again)
            await self._restore_deliveries()
        pending = await asyncio.to_thread(sessions.unshipped)
        for start in range(0, len(pending), PAIRS_PER_PIPELINE):
            chunk = pending[start:start + PAIRS_PER_PIPELINE]
            rows = [await asyncio.to_thread(sessions.rows, day, domain)
                    for day, domain, _ in chunk]

            async def hand_in(client, chunk=chunk, rows=rows):
                pipe = client.pipeline(transaction=True)
                for (day, domain, _), found in zip(chunk, rows, strict=True):
                    counts = self._key("counts", day.isoformat(), domain)
                    if found:
                        pipe.hset(counts, mapping={
                            SEPARATOR.join((self.link.node, policy, detail)): count
                            for policy, detail, count in found})
                        pipe.expire(counts, self.keep)
                    pipe.sadd(self._key("days"), day.isoformat())
                    pipe.sadd(self._key("domains", day.isoformat()), domain)
                    pipe.expire(self._key("domains", day.isoformat()), self.keep)
                return await pipe.execute()

            await self.link.run(hand_in)
            for day, domain, version in chunk:
                await asyncio.to_thread(sessions.shipped, day, domain, version)
        await self.link.run(lambda client: client.hset(
            self._key("nodes"), self.link.node, json.dumps({"shipped": now})))
        self._epoch = epoch
        return len(pending)

    async def _current_epoch(self, now: float) -> str:
        """``RUN-ID BEGAN``: the Redis process (its run_id changes at every restart,
        snapshot reload and failover, whatever it kept) and when a node first saw it."""
        info = await self.link.run(lambda client: client.info("server"))
        run_id = str(info.get("run_id", ""))
        key = self._key("epoch", run_id)
        await self.link.run(lambda client: client.set(key, repr(now), nx=True))
        began = await self.link.run(lambda client: client.get(key))
        return f"{run_id} {_text(began) if began is not None else repr(now)}"

    async def _restore_deliveries(self) -> None:
        """Rule 2: the delivery states this node kept. A final one (sent, given up)
        overwrites what Redis has, which may be an older snapshot's; a pending one only
        fills a gap."""
        reports = await asyncio.to_thread(self.local.deliveries.reports)
        if not reports:
            return

        async def restore(client):
            pipe = client.pipeline(transaction=False)
            for report_id, states in reports.items():
                key = self._key("delivery", report_id)
                for rua, state in states.items():
                    if state[0] == "pending":
                        pipe.hsetnx(key, rua, json.dumps(state))
                    else:
                        pipe.hset(key, rua, json.dumps(state))
                pipe.expire(key, self.keep)
            return await pipe.execute()

        await self.link.run(restore)

    # -- the counts (rule 3) ------------------------------------------------------------

    async def days(self) -> list[datetime.date]:
        found = await self.link.run(lambda client: client.smembers(self._key("days")))
        return sorted(datetime.date.fromisoformat(_text(day)) for day in found)

    async def domains(self, day: datetime.date) -> list[str]:
        found = await self.link.run(lambda client: client.smembers(
            self._key("domains", day.isoformat())))
        return sorted(_text(domain) for domain in found)

    async def counts(self, day: datetime.date, domain: str) -> dict[PolicyKey, PolicyCounts]:
        fields = await self.link.run(lambda client: client.hgetall(
            self._key("counts", day.isoformat(), domain)))
        rows = []
        for field, count in fields.items():
            _node, policy, detail = _text(field).split(SEPARATOR, 2)
            rows.append((policy, detail, int(count)))
        return tally(rows)

    async def node_states(self) -> dict[str, float]:
        """When each node last handed in its counts."""
        found = await self.link.run(lambda client: client.hgetall(self._key("nodes")))
        states = {}
        for node, text in found.items():
            try:
                states[_text(node)] = float(json.loads(text)["shipped"])
            except (ValueError, KeyError, TypeError):
                continue
        return states

    async def ready(self, day: datetime.date, now: float, due: float) -> str:
        epoch = await self._current_epoch(now)
        began = float(epoch.rsplit(" ", 1)[1])
        if epoch != self._epoch or now - began < self.grace:
            return (f"Redis began anew at {_utc(began)}: the nodes are handing in their "
                    f"counts again")
        day_start = midnight_after(day) - 86400
        # Counts handed in after this include every session of the day.
        settled = midnight_after(day) + self.flushed
        late = sorted(node for node, shipped in (await self.node_states()).items()
                      if day_start <= shipped < settled)
        if not late:
            return ""
        if now < due + self.settle:
            return f"waiting for {', '.join(late)} to hand in its counts"
        ident = f"{day}/{','.join(late)}"
        if ident not in self._late_noted:
            self._late_noted.add(ident)
            log.warning("TLSRPT: the reports for %s go without the sessions of %s, which "
                        "handed in nothing from after the day within [tlsrpt] settle",
                        day.isoformat(), ", ".join(late))
        return ""

    # -- sending (rule 4) ---------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, report_id: str) -> AsyncIterator[Lease]:
        from harakapy.fleet.link import Hold

        hold = Hold(self.link, self._key("lease", report_id), self.lease_time)
        keeping = asyncio.create_task(hold.keep()) if await hold.take() else None
        try:
            yield hold
        finally:
            if keeping is not None:
                keeping.cancel()
                await asyncio.gather(keeping, return_exceptions=True)
            await hold.release()

    async def states(self, report_id: str) -> dict[str, State]:
        found = await self.link.run(lambda client: client.hgetall(
            self._key("delivery", report_id)))
        return {_text(rua): tuple(json.loads(state)) for rua, state in found.items()}

    async def begin(self, report_id: str, ruas: list[str], now: float) -> None:
        await self.local.begin(report_id, ruas, now)
        local = await self.local.states(report_id)
        key = self._key("delivery", report_id)

        async def begin(client):
            pipe = client.pipeline(transaction=True)
            for rua in ruas or [""]:
                pipe.hsetnx(key, rua, json.dumps(local[rua]))
            pipe.expire(key, self.keep)
            return await pipe.execute()

        await self.link.run(begin)

    async def update(self, report_id: str, rua: str, state: str, *, next_try: float,
                     error: str) -> None:
        await self.local.update(report_id, rua, state, next_try=next_try, error=error)
        key = self._key("delivery", report_id)
        current = await self.link.run(lambda client: client.hget(key, rua))
        _, attempts, first_try, _, _ = json.loads(current) if current else \
            (state, 0, next_try, 0.0, "")
        await self.link.run(lambda client: client.hset(key, rua, json.dumps(
            [state, attempts + 1, first_try, next_try, error[:500]])))

    async def done(self, report_id: str) -> bool:
        if report_id in self._done:
            return True  # done stays done: no need to ask every round
        states = await self.states(report_id)
        finished = bool(states) and all(s[0] != "pending" for s in states.values())
        if finished:
            self._done.add(report_id)
        return finished

    async def forget(self, before: datetime.date) -> None:
        await self.local.forget(before)
        old = [day for day in await self.days() if day < before]
        if old:
            await self.link.run(lambda client: client.srem(
                self._key("days"), *(day.isoformat() for day in old)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _utc(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%H:%M:%S UTC")
