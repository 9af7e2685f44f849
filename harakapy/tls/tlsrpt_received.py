"""TLS reports other senders sent about our domains: parsed leniently, stored once, and
summed up per reporting organisation and per our MX host.

Rules:

1. A report is gzipped or plain JSON. Parsing is lenient where senders differ: ``mx-host``
   a string (before erratum 6241) or an array, optional members missing, unknown
   members ignored. What cannot be read as a report is refused with the reason.
2. A report is kept once: the same ``report-id`` from the same ``organization-name`` is a
   duplicate (a retry, or the same report by mail and HTTPS).
3. The summary adds up, per organisation and per receiving MX host, the sessions that
   succeeded and those that failed by result type; the worst (most failures) first.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harakapy.tls.sqlite_file import SqliteFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    organization TEXT NOT NULL,
    report_id TEXT NOT NULL,
    start TEXT NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (organization, report_id)
) WITHOUT ROWID;
"""


class ReportError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ReportError(f"a session count is not a number: {value!r}")
    return int(value)


def parse_report(data: bytes) -> dict[str, Any]:
    """Rule 1: the report as a dict with the members the summary uses.

    :raises ReportError: not gzip or JSON, or without the required members.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ReportError(f"not a gzip file: {exc}") from None
    try:
        report = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise ReportError("the report is not a JSON object")
    for key in ("organization-name", "report-id", "policies"):
        if key not in report:
            raise ReportError(f"no {key}")
    if not isinstance(report["policies"], list):
        raise ReportError("policies is not an array")
    for entry in report["policies"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("summary"), dict):
            raise ReportError("a policy without a summary")
        policy = entry.get("policy") or {}
        if isinstance(policy.get("mx-host"), str):
            policy["mx-host"] = [policy["mx-host"]]
        summary = entry["summary"]
        summary["total-successful-session-count"] = _count(
            summary.get("total-successful-session-count", 0))
        summary["total-failure-session-count"] = _count(
            summary.get("total-failure-session-count", 0))
        details = entry.get("failure-details") or []
        if not isinstance(details, list):
            raise ReportError("failure-details is not an array")
        for detail in details:
            detail["failed-session-count"] = _count(detail.get("failed-session-count", 0))
        entry["failure-details"] = details
    return report


@dataclass
class Summary:
    """Rule 3, for one organisation and one of our MX hosts."""

    organization: str
    mx: str
    reports: int = 0  # distinct reports that spoke of this MX
    succeeded: int = 0
    failed: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class ReceivedStore:
    """Received reports in SQLite (rule 2)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SqliteFile(path, synchronous="FULL", schema=_SCHEMA)
        self._connection = self._file.connection

    def add(self, report: dict[str, Any]) -> bool:
        """Store a parsed report; ``False`` for a duplicate."""
        start = str((report.get("date-range") or {}).get("start-datetime", ""))
        with self._connection() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO received (organization, report_id, start, report) "
                "VALUES (?, ?, ?, ?)", (str(report["organization-name"]),
                                        str(report["report-id"]), start, json.dumps(report)))
            return cursor.rowcount == 1

    def summary(self, since: str = "") -> list[Summary]:
        """Rule 3, over the reports whose day starts at or after ``since`` (ISO date)."""
        with self._connection() as db:
            rows = db.execute("SELECT report FROM received WHERE start >= ?",
                              (since,)).fetchall()
        found: dict[tuple[str, str], Summary] = {}
        counted: dict[tuple[str, str], set[str]] = {}
        for (text,) in rows:
            report = json.loads(text)
            organization = str(report["organization-name"])
            for entry in report["policies"]:
                policy = entry.get("policy") or {}
                hosts = policy.get("mx-host") or [policy.get("policy-domain", "-")]
                mx = ",".join(str(h) for h in hosts)
                item = found.setdefault((organization, mx), Summary(organization, mx))
                seen = counted.setdefault((organization, mx), set())
                if report["report-id"] not in seen:
                    seen.add(report["report-id"])
                    item.reports += 1
                item.succeeded += entry["summary"]["total-successful-session-count"]
                item.failed += entry["summary"]["total-failure-session-count"]
                for detail in entry["failure-details"]:
                    kind = str(detail.get("result-type", "?"))
                    item.by_type[kind] = item.by_type.get(kind, 0) + \
                        detail["failed-session-count"]
        return sorted(found.values(), key=lambda s: (-s.failed, s.organization, s.mx))

    def close(self) -> None:
        self._file.close()
