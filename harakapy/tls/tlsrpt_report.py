"""TLS reports as RFC 8460 section 4 defines them: what one session adds, and the JSON,
file name and compressed body of one day's report for one domain.

Rules:

1. A session counts in the report of its next-hop domain (the recipient domain, or the
   routed host), for the UTC day it happened, under its policy (type, strings, policy
   domain, ``mx`` patterns): every policy seen for the domain is in that domain's
   report, DANE's per-MX policies included (as mox does).
2. A failure also counts under its detail: result type, our address, the MX host, its
   address and greeting name, the failure reason code.
3. The JSON uses the RFC's field names exactly; ``policies`` is always an array,
   ``mx-host`` an array (erratum 6241), and optional fields appear only when known.
4. The report-id is unique per domain and day and the same for every retry:
   ``<start-datetime>_<domain>@<submitter>``.
"""

from __future__ import annotations

import datetime
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from harakapy.tls.results import TlsResult

NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, slots=True)
class PolicyKey:
    """A policy as the report names it (``policies[].policy``)."""

    type: str
    domain: str
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        policy: dict[str, Any] = {"policy-type": self.type}
        if self.type != NO_POLICY_FOUND:
            policy["policy-string"] = list(self.strings)
        policy["policy-domain"] = self.domain
        if self.mx:
            policy["mx-host"] = list(self.mx)
        return policy


@dataclass(frozen=True, slots=True)
class DetailKey:
    """A failure detail (``failure-details[]`` without its count)."""

    result_type: str
    sending_ip: str = ""
    mx_hostname: str = ""
    mx_helo: str = ""
    receiving_ip: str = ""
    reason_code: str = ""

    def as_json(self, count: int) -> dict[str, Any]:
        detail: dict[str, Any] = {"result-type": self.result_type}
        for key, value in (("sending-mta-ip", self.sending_ip),
                           ("receiving-mx-hostname", self.mx_hostname),
                           ("receiving-mx-helo", self.mx_helo),
                           ("receiving-ip", self.receiving_ip)):
            if value:
                detail[key] = value
        detail["failed-session-count"] = count
        if self.reason_code:
            detail["failure-reason-code"] = self.reason_code
        return detail


@dataclass(slots=True)
class PolicyCounts:
    success: int = 0
    failure: int = 0
    details: dict[DetailKey, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionKey:
    """Where one session counts (rules 1 and 2)."""

    day: datetime.date
    domain: str
    policy: PolicyKey
    detail: DetailKey | None  # None for a success


def session_key(result: TlsResult, at: float) -> SessionKey:
    """Rules 1 and 2 for one ``tls_result``, at the time ``at`` (seconds since the epoch).
    """
    day = datetime.datetime.fromtimestamp(at, datetime.UTC).date()
    policy = PolicyKey(result.policy_type, (result.policy_domain or result.domain).lower(),
                       tuple(result.policy_strings) if result.policy_type != NO_POLICY_FOUND
                       else (), tuple(result.mx_host_patterns))
    detail = None
    if result.failure is not None:
        detail = DetailKey(result.result_type, result.sending_ip, result.mx_hostname,
                           result.receiving_helo, result.receiving_ip, result.failure.code)
    return SessionKey(day, result.domain.lower(), policy, detail)


def day_range(day: datetime.date) -> tuple[str, str]:
    """RFC 3339 UTC start and end of ``day``, as the RFC's example writes them."""
    return f"{day.isoformat()}T00:00:00Z", f"{day.isoformat()}T23:59:59Z"


def report_id(day: datetime.date, domain: str, submitter: str) -> str:
    """Rule 4."""
    return f"{day_range(day)[0]}_{domain}@{submitter}"


def report_json(*, organization: str, contact: str, day: datetime.date, domain: str,
                policies: dict[PolicyKey, PolicyCounts]) -> dict[str, Any]:
    """One day's report for ``domain`` (rule 3).

    :param contact: ``contact-info``: an address whose domain is the submitter.
    """
    start, end = day_range(day)
    submitter = contact.rpartition("@")[2].lower()
    entries = []
    for policy in sorted(policies, key=lambda p: (p.type, p.domain, p.strings, p.mx)):
        counts = policies[policy]
        details = sorted(counts.details.items(), key=lambda item: (-item[1], item[0].result_type,
                                                                   item[0].mx_hostname))
        entries.append({
            "policy": policy.as_json(),
            "summary": {"total-successful-session-count": counts.success,
                        "total-failure-session-count": counts.failure},
            "failure-details": [detail.as_json(count) for detail, count in details],
        })
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": start, "end-datetime": end},
        "contact-info": contact,
        "report-id": report_id(day, domain, submitter),
        "policies": entries,
    }


def file_name(submitter: str, domain: str, day: datetime.date, unique: str = "") -> str:
    """The RECOMMENDED file name (RFC 8460 5.3): ``submitter!domain!begin!end[!id].json.gz``
    with Unix times."""
    begin = int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp())
    end = begin + 86400 - 1
    tail = f"!{unique}" if unique else ""
    return f"{submitter}!{domain}!{begin}!{end}{tail}.json.gz"


def compressed(report: dict[str, Any]) -> bytes:
    """The report as gzipped JSON (RFC 8460 5.3: SHOULD), the same bytes every time."""
    body = json.dumps(report, separators=(",", ":"), ensure_ascii=True).encode()
    return gzip.compress(body, mtime=0)
