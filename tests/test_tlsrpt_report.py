"""The report JSON (harakapy.tls.tlsrpt_report) against a JSON Schema written from RFC 8460
section 4 (field names, types, required members), with the jsonschema library; and how
sessions are keyed into days, policies and details (../shared/specs/tlsrpt.md cases 7-9).
"""

from __future__ import annotations

import datetime
import gzip
import json

import jsonschema
import pytest

from harakapy.tls.results import Failure, ResultType, TlsResult
from harakapy.tls.tlsrpt_report import (
    DetailKey,
    PolicyCounts,
    PolicyKey,
    compressed,
    file_name,
    report_json,
    session_key,
)

# RFC 8460 section 4.4 (and erratum 6241: mx-host is an array of strings).
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {
                "start-datetime": {"type": "string",
                                   "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
                "end-datetime": {"type": "string",
                                 "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
            },
            "additionalProperties": False,
        },
        "contact-info": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["policy", "summary"],
                "properties": {
                    "policy": {
                        "type": "object",
                        "required": ["policy-type", "policy-domain"],
                        "properties": {
                            "policy-type": {"enum": ["sts", "tlsa", "no-policy-found"]},
                            "policy-string": {"type": "array", "items": {"type": "string"}},
                            "policy-domain": {"type": "string", "minLength": 1},
                            "mx-host": {"type": "array", "items": {"type": "string"}},
                        },
                        "additionalProperties": False,
                    },
                    "summary": {
                        "type": "object",
                        "required": ["total-successful-session-count",
                                     "total-failure-session-count"],
                        "properties": {
                            "total-successful-session-count": {"type": "integer",
                                                               "minimum": 0},
                            "total-failure-session-count": {"type": "integer", "minimum": 0},
                        },
                        "additionalProperties": False,
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["result-type", "failed-session-count"],
                            "properties": {
                                "result-type": {"enum": [t.value for t in ResultType]},
                                "sending-mta-ip": {"type": "string"},
                                "receiving-mx-hostname": {"type": "string"},
                                "receiving-mx-helo": {"type": "string"},
                                "receiving-ip": {"type": "string"},
                                "failed-session-count": {"type": "integer", "minimum": 1},
                                "additional-information": {"type": "string"},
                                "failure-reason-code": {"type": "string"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

DAY = datetime.date(2026, 12, 2)
STS = PolicyKey("sts", "example.com", ("version: STSv1", "mode: enforce",
                                       "mx: mx1.example.com", "max_age: 604800"),
                ("mx1.example.com",))
TLSA = PolicyKey("tlsa", "mx2.example.com", ("3 1 1 " + "AB" * 32,))
NONE = PolicyKey("no-policy-found", "example.com")


def result(**overrides) -> TlsResult:
    fields = {"domain": "example.com", "level": "verify", "policy_type": "sts",
              "policy_domain": "example.com", "mx_hostname": "mx1.example.com",
              "receiving_ip": "192.0.2.7", "sending_ip": "192.0.2.10",
              "policy_strings": STS.strings, "mx_host_patterns": STS.mx}
    return TlsResult(**{**fields, **overrides})


def build(policies) -> dict:
    return report_json(organization="Example Sender", contact="tlsrpt@sender.example",
                       day=DAY, domain="example.com", policies=policies)


def test_a_report_with_every_kind_of_policy_validates():
    detail = DetailKey("certificate-expired", "192.0.2.10", "mx1.example.com",
                       "mx1.example.com", "192.0.2.7", "X509_V_ERR_CERT_HAS_EXPIRED")
    report = build({STS: PolicyCounts(412, 3, {detail: 3}), TLSA: PolicyCounts(57, 0),
                    NONE: PolicyCounts(4, 0)})
    jsonschema.validate(report, SCHEMA)
    assert report["date-range"] == {"start-datetime": "2026-12-02T00:00:00Z",
                                    "end-datetime": "2026-12-02T23:59:59Z"}
    assert report["report-id"] == "2026-12-02T00:00:00Z_example.com@sender.example"
    by_type = {p["policy"]["policy-type"]: p for p in report["policies"]}
    assert by_type["sts"]["policy"]["mx-host"] == ["mx1.example.com"]
    assert "policy-string" not in by_type["no-policy-found"]["policy"]
    assert "mx-host" not in by_type["tlsa"]["policy"]
    (failure,) = by_type["sts"]["failure-details"]
    assert failure["failed-session-count"] == 3 and failure["result-type"] == \
        "certificate-expired"


def test_one_policy_is_still_an_array_and_optional_fields_are_left_out():
    detail = DetailKey("starttls-not-supported", mx_hostname="mx1.example.com")
    report = build({STS: PolicyCounts(0, 1, {detail: 1})})
    jsonschema.validate(report, SCHEMA)
    assert isinstance(report["policies"], list) and len(report["policies"]) == 1
    assert report["policies"][0]["failure-details"] == [
        {"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx1.example.com",
         "failed-session-count": 1}]


def test_the_schema_refuses_what_the_rfc_does_not_allow():
    report = build({STS: PolicyCounts(1, 0)})
    broken = json.loads(json.dumps(report))
    broken["policies"][0]["policy"]["mx-host"] = "mx1.example.com"  # a string: pre-erratum
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_sessions_either_side_of_utc_midnight_go_into_two_days():
    midnight = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC).timestamp()
    before = session_key(result(), midnight - 0.001)
    after = session_key(result(), midnight)
    assert before.day == datetime.date(2026, 12, 2) and after.day == datetime.date(2026, 12, 3)


def test_successes_and_failures_are_keyed_by_policy_and_detail():
    failed = Failure(ResultType.CERTIFICATE_EXPIRED, "expired", "X509_V_ERR_CERT_HAS_EXPIRED")
    other = Failure(ResultType.STARTTLS_NOT_SUPPORTED, "no starttls")
    keys = [session_key(result(), 0) for _ in range(3)]
    keys += [session_key(result(failure=failed), 0) for _ in range(2)]
    keys.append(session_key(result(failure=other), 0))
    counts: dict[PolicyKey, PolicyCounts] = {}
    for key in keys:
        entry = counts.setdefault(key.policy, PolicyCounts())
        if key.detail is None:
            entry.success += 1
        else:
            entry.failure += 1
            entry.details[key.detail] = entry.details.get(key.detail, 0) + 1
    (entry,) = counts.values()
    assert (entry.success, entry.failure) == (3, 3)
    assert sorted(entry.details.values()) == [1, 2]
    report = build(counts)
    jsonschema.validate(report, SCHEMA)
    assert [d["failed-session-count"] for d in report["policies"][0]["failure-details"]] \
        == [2, 1]


def test_a_dane_session_is_under_its_tlsa_base_domain_in_the_recipient_domains_report():
    key = session_key(result(policy_type="tlsa", policy_domain="mx2.example.com",
                             policy_strings=TLSA.strings, mx_host_patterns=()), 0)
    assert key.domain == "example.com" and key.policy == TLSA


def test_the_file_name_and_the_compressed_body():
    name = file_name("sender.example", "example.com", DAY, "1")
    assert name == "sender.example!example.com!1796169600!1796255999!1.json.gz"
    report = build({STS: PolicyCounts(1, 0)})
    body = compressed(report)
    assert json.loads(gzip.decompress(body)) == report
    assert compressed(report) == body  # the same bytes for every retry
