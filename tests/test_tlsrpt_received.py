"""Reports other senders sent about our domains (harakapy.tls.tlsrpt_received, and
``harakapy tlsrpt import|received``): lenient parsing, one copy per report, the summary
per organisation and MX with the worst first."""

from __future__ import annotations

import gzip
import json

import pytest

from harakapy.tls.tlsrpt_received import ReceivedStore, ReportError, parse_report
from tests.processes import harakapy


def report(organization: str = "Big Mail", report_id: str = "r1", *, mx="mx.ours.test",
           succeeded: int = 10, failures=()) -> dict:
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": "2026-12-02T00:00:00Z",
                       "end-datetime": "2026-12-02T23:59:59Z"},
        "contact-info": "tlsrpt@big.example",
        "report-id": report_id,
        "policies": [{
            "policy": {"policy-type": "sts", "policy-domain": "ours.test", "mx-host": mx,
                       "policy-string": ["version: STSv1"]},
            "summary": {"total-successful-session-count": succeeded,
                        "total-failure-session-count": sum(c for _, c in failures)},
            "failure-details": [{"result-type": kind, "failed-session-count": count}
                                for kind, count in failures],
        }],
    }


def test_gzip_or_plain_and_mx_host_as_a_string_are_read():
    plain = parse_report(json.dumps(report(mx="mx.ours.test")).encode())
    assert plain["policies"][0]["policy"]["mx-host"] == ["mx.ours.test"]
    zipped = parse_report(gzip.compress(json.dumps(report(mx=["a", "b"])).encode()))
    assert zipped["policies"][0]["policy"]["mx-host"] == ["a", "b"]
    lean = report()
    del lean["policies"][0]["failure-details"], lean["date-range"], lean["contact-info"]
    assert parse_report(json.dumps(lean).encode())["policies"][0]["failure-details"] == []


@pytest.mark.parametrize(("data", "why"), [
    (b"not json", "not JSON"),
    (b"\x1f\x8b broken", "not a gzip"),
    (b"[]", "not a JSON object"),
    (json.dumps({"organization-name": "x", "report-id": "1"}).encode(), "no policies"),
    (json.dumps({"organization-name": "x", "report-id": "1", "policies": [{}]}).encode(),
     "without a summary"),
    (json.dumps(report(succeeded=-1)).encode(), "not a number"),
])
def test_what_is_not_a_report_is_refused_with_the_reason(data, why):
    with pytest.raises(ReportError, match=why):
        parse_report(data)


def test_a_report_is_kept_once_and_the_worst_comes_first(tmp_path):
    store = ReceivedStore(tmp_path / "received.sqlite")
    assert store.add(parse_report(json.dumps(report("Big Mail", "r1")).encode()))
    assert not store.add(parse_report(json.dumps(report("Big Mail", "r1")).encode()))
    store.add(parse_report(json.dumps(report(
        "Other", "r1", mx="mx2.ours.test", succeeded=3,
        failures=[("certificate-expired", 4), ("starttls-not-supported", 1)])).encode()))
    worst, best = store.summary()
    assert (worst.organization, worst.mx, worst.failed) == ("Other", "mx2.ours.test", 5)
    assert worst.by_type == {"certificate-expired": 4, "starttls-not-supported": 1}
    assert (best.organization, best.succeeded, best.reports) == ("Big Mail", 10, 1)


def test_import_and_received_from_the_command_line(config_dir, tmp_path):
    root = config_dir({"me": "ours.test\n"})
    good = tmp_path / "r1.json.gz"
    good.write_bytes(gzip.compress(json.dumps(report(
        failures=[("certificate-host-mismatch", 2)])).encode()))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    done = harakapy("tlsrpt", "import", str(good), str(bad), "-c", str(root))
    assert done.returncode == 1
    assert "stored (Big Mail, r1)" in done.stdout and "bad.json: not a TLS report" in \
        done.stderr
    again = harakapy("tlsrpt", "import", str(good), "-c", str(root))
    assert "already stored" in again.stdout and again.returncode == 0
    summary = harakapy("tlsrpt", "received", "-c", str(root))
    assert summary.stdout.strip() == ("Big Mail  mx.ours.test: 10 succeeded, 2 failed "
                                      "(2 certificate-host-mismatch); 1 report(s)")
    as_json = json.loads(harakapy("tlsrpt", "received", "-c", str(root), "--json").stdout)
    assert as_json[0]["by_type"] == {"certificate-host-mismatch": 2}
