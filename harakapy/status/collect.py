"""What the status page shows, as one JSON-ready dict (``/status.json``).

Rules:

1. Only metadata: queue counts, destination domains, MX host names, policy kinds, result
   types, reasons as the remote servers gave them; never a message's content, subject or
   sender.
2. Each part is read from where the server keeps it (the spool, the TLS outcomes file,
   the MTA-STS cache, the received reports); a part that cannot be read is reported as
   such (``errors``), and the rest is still shown.
3. Destinations are summed over the last day and the last week; the timeline counts
   each hour of the week, successes and failures by result type.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harakapy.config import Config
from harakapy.spool import report as spool_report
from harakapy.spool.store import RecipientState, Spool
from harakapy.tls.outcomes import HOUR, SOURCES, OutcomeStore, outcomes_path

DAY = 86400
WEEK = 7 * DAY
TOP_REASONS = 10


def collect(config: Config, now: float | None = None) -> dict[str, Any]:
    """Rules 1 to 3 (blocking: run it in a thread)."""
    now = time.time() if now is None else now
    errors: list[str] = []
    data: dict[str, Any] = {"generated": now,
                            "me": config.value("me") or socket.getfqdn(), "errors": errors}
    for name, part in (("queue", _queue), ("destinations", _destinations),
                       ("mta_sts", _mta_sts), ("reports_received", _received)):
        try:
            data.update(part(config, now))
        except Exception as exc:  # one part's failure must not blank the page
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            data.setdefault(name, [] if name != "queue" else {})
    return data


def _queue(config: Config, now: float) -> dict[str, Any]:
    spool = Spool(config.queue_dir())
    messages = spool_report.messages(spool) if spool.msg_dir.is_dir() else []
    states: Counter[str] = Counter()
    waiting: dict[str, dict[str, Any]] = {}
    reasons: Counter[str] = Counter()
    for message in messages:
        for recipient in message.recipients:
            states[str(recipient.state)] += 1
            if recipient.is_final:
                continue
            entry = waiting.setdefault(recipient.domain, {
                "domain": recipient.domain, "recipients": 0, "deferred": 0,
                "oldest": message.arrival, "last_reason": ""})
            entry["recipients"] += 1
            entry["oldest"] = min(entry["oldest"], message.arrival)
            if recipient.state is RecipientState.DEFERRED:
                entry["deferred"] += 1
                entry["last_reason"] = recipient.reply[:300]
                reasons[recipient.reply[:300]] += 1
    oldest = min(messages, key=lambda m: m.arrival) if messages else None
    return {"queue": {
        "messages": len(messages),
        "recipients": dict(states),
        "oldest": None if oldest is None else {
            "id": oldest.id, "age": round(now - oldest.arrival, 1),
            "domains": sorted({r.domain for r in oldest.recipients if not r.is_final})},
        "by_destination": sorted(waiting.values(), key=lambda e: (-e["recipients"],
                                                                    e["domain"])),
        "deferral_reasons": [{"reason": reason, "recipients": count}
                             for reason, count in reasons.most_common(TOP_REASONS)],
    }}


def _destinations(config: Config, now: float) -> dict[str, Any]:
    # The hour now and the 23 (or 167) before it: the day's (the week's) buckets, as
    # the chart shows them.
    current = int(now) // HOUR * HOUR
    day_start, week_start = current - 23 * HOUR, current - 167 * HOUR
    store = OutcomeStore(outcomes_path(config))
    try:
        rows = store.rows(week_start)
        failures = store.last_failures()
    finally:
        store.close()
    found: dict[str, dict[str, Any]] = {}
    hours: dict[int, Counter[str]] = {}
    for hour, domain, source, level, result, tls_version, count in rows:
        entry = found.setdefault(domain, {
            "domain": domain, "last_seen": 0, "day": _window(), "week": _window()})
        entry["last_seen"] = max(entry["last_seen"], hour)
        windows = [entry["week"]] + ([entry["day"]] if hour >= day_start else [])
        for window in windows:
            window["sources"][source] += count
            window["levels"][level] += count
            window["tls_versions"][tls_version or "none"] += count
            if result == "success":
                window["succeeded"] += count
            else:
                window["failed"] += count
                window["failures"][result] += count
        hours.setdefault(hour, Counter())[result] += count
    destinations = []
    for domain, entry in found.items():
        for key in ("day", "week"):
            window = entry[key]
            window["source"] = _strongest(window["sources"])
            window["level"] = window["levels"].most_common(1)[0][0] if window["levels"] \
                else ""
            for name in ("sources", "levels", "tls_versions", "failures"):
                window[name] = dict(window[name])
        failure = failures.get(domain)
        entry["last_failure"] = None if failure is None else {
            "at": failure.at, "mx": failure.mx, "result": failure.result,
            "reason": failure.reason}
        destinations.append(entry)
    destinations.sort(key=lambda e: (-e["week"]["failed"], e["domain"]))
    timeline = [{"hour": hour, "success": hours.get(hour, Counter())["success"],
                 "failures": {k: v for k, v in hours.get(hour, Counter()).items()
                              if k != "success"}}
                for hour in range(week_start, current + HOUR, HOUR)]
    return {"destinations": destinations, "timeline": timeline}


def _window() -> dict[str, Any]:
    return {"succeeded": 0, "failed": 0, "sources": Counter(), "levels": Counter(),
            "tls_versions": Counter(), "failures": Counter()}


def _strongest(sources: Counter[str]) -> str:
    """The strongest kind of policy that decided in the window (SOURCES' order)."""
    for source in SOURCES:
        if sources.get(source):
            return source
    return "none"


def _mta_sts(config: Config, now: float) -> dict[str, Any]:
    from harakapy.mta_sts import CACHE_NAME, STATE_FOLDER, sts_config
    from harakapy.tls.sts_store import SqliteStore

    path = sts_config(config).cache or config.state_dir() / STATE_FOLDER / CACHE_NAME
    if not Path(path).exists():
        return {"mta_sts": []}
    store = SqliteStore(Path(path))
    try:
        entries = store.entries()
    finally:
        store.close()
    rows = []
    for entry in entries:
        policy = entry.policy()
        rows.append({
            "domain": entry.domain,
            "mode": policy.mode.value if policy is not None else "",
            "mx": list(policy.mx) if policy is not None else [],
            "max_age": policy.max_age if policy is not None else 0,
            "fetched": entry.fetched or None,
            "expires": entry.expires or None,
            "valid": entry.valid_at(now),
            "last_error": entry.error,
        })
    return {"mta_sts": rows}


def _received(config: Config, now: float) -> dict[str, Any]:
    from harakapy.tls.tlsrpt_received import ReceivedStore
    from harakapy.tlsrpt import RECEIVED_NAME
    from harakapy.tlsrpt import STATE_FOLDER as TLSRPT_FOLDER

    path = config.state_dir() / TLSRPT_FOLDER / RECEIVED_NAME  # not made here
    if not path.exists():
        return {"reports_received": []}
    since = datetime.datetime.fromtimestamp(now - WEEK, datetime.UTC).date().isoformat()
    store = ReceivedStore(path)
    try:
        summary = store.summary(since)
    finally:
        store.close()
    return {"reports_received": [
        {"organization": s.organization, "mx": s.mx, "reports": s.reports,
         "succeeded": s.succeeded, "failed": s.failed, "by_type": s.by_type}
        for s in summary]}
