"""MTA-STS text (harakapy.tls.mta_sts): the TXT record, the policy file, the mx patterns.

Pure and table-driven: the cases of ../shared/specs/mta-sts.md section 12 and the ugly
inputs a policy host or a DNS zone can serve (BOMs, IP addresses and trailing dots in mx,
absurd max_age, binary bodies).
"""

from __future__ import annotations

import pytest

from harakapy.tls.mta_sts import (
    MAX_POLICY_BYTES,
    Mode,
    StsError,
    parse_policy,
    parse_record,
    select_record,
)
from harakapy.tls.policy import Level
from harakapy.tls.verify import mx_pattern_matches

# -- the TXT record (RFC 8461 3.1) -----------------------------------------------------------

RECORDS = [
    # (records at _mta-sts.<domain>, the id, or None for no available policy)
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1;  id=abc ;  "], "abc"),
    (["v=STSv1 ; id=abc"], "abc"),  # erratum 6285: WSP before ";" is valid ABNF
    (["v=STSv1;\tid=abc"], "abc"),
    (["id=abc; v=STSv1;"], None),  # v=STSv1 must come first
    (["v=STSv1"], None),
    (["v=STSv1;"], None),
    (["v=STSv1; id="], None),
    (["v=STSv1; id=2016-08-31"], None),  # "-" is not allowed in an id
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=" + "a" * 32], "a" * 32),
    (["V=STSv1; id=a"], None),
    (["v=stsv1; id=a"], None),
    (["v=STSv10; id=a"], None),
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # exactly one
    (["v=spf1 -all", "v=STSv1; id=a"], "a"),
    (["v=STSv10; id=a", "v=STSv1; id=b"], "b"),  # a future version is not ours
    (["v=STSv1; " + "id=a"], "a"),  # one RR's strings joined without separators
    (["v=STSv1; id=a; id=b; foo=bar"], "a"),  # first id wins, extensions ignored
    (["v=STSv1; id=a; foo=b=c"], None),  # "=" is not allowed in an extension value
    (["v=STSv1; id=a; foo="], None),
    (["v=STSv1; id=a;; "], None),  # an empty field
    (["v=STSv1; id=a\x00"], None),  # control characters from a hostile zone
    (["v=STSv1; id=a\nid=b"], None),
    (["v=STSv1; id=ab c"], None),
    (["v=STSv1; id=é"], None),
    ([], None),
    (["hello world"], None),
]


@pytest.mark.parametrize(("texts", "expected"), RECORDS)
def test_sts_records(texts, expected):
    if expected is None:
        with pytest.raises(StsError):
            select_record(texts)
    else:
        assert select_record(texts).id == expected


def test_a_record_error_says_what_is_wrong():
    with pytest.raises(StsError, match="2 v=STSv1 records"):
        select_record(["v=STSv1; id=a", "v=STSv1; id=b"])
    with pytest.raises(StsError, match="no id"):
        parse_record("v=STSv1; foo=bar")


# -- the policy file (RFC 8461 3.2) ----------------------------------------------------------

RFC_EXAMPLE = (b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\n"
               b"mx: backupmx.example.com\nmax_age: 604800\n")


def body(*lines: str, end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode()


BASE = ("version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 86400")

POLICIES = [
    # (policy body, expected (mode, max_age, mx) or an StsError message fragment)
    (RFC_EXAMPLE, ("enforce", 604800,
                   ("mail.example.com", "*.example.net", "backupmx.example.com"))),
    (RFC_EXAMPLE.replace(b"\n", b"\r\n"),
     ("enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com"))),
    (b"version: STSv1\r\nmode: enforce\nmx: mail.example.com\r\nmax_age: 86400\n",
     ("enforce", 86400, ("mail.example.com",))),
    (RFC_EXAMPLE.rstrip(b"\n"),
     ("enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com"))),
    (b"version:STSv1\nmode:\tenforce\nmx:mail.example.com\nmax_age:86400",
     ("enforce", 86400, ("mail.example.com",))),
    (body("max_age: 86400", "mx: mail.example.com", "mode: testing", "version: STSv1"),
     ("testing", 86400, ("mail.example.com",))),  # any order; version last
    (body("version: STSv1", "mode: enforce  ", "mx: mail.example.com\t", "max_age: 86400 "),
     ("enforce", 86400, ("mail.example.com",))),  # WSP at the end of a line
    (body("version: STSv1", "mode : enforce", "mx: mail.example.com", "max_age: 86400"),
     "not key: value"),
    (body("version: STSv1", " mode: enforce", "mx: mail.example.com", "max_age: 86400"),
     "not key: value"),
    (body("version: STSv1", "Mode: enforce", "mx: mail.example.com", "max_age: 86400"),
     "no mode"),
    (body("version: STSv1", "mode: Enforce", "mx: mail.example.com", "max_age: 86400"),
     "not enforce, testing or none"),
    (body("version: STSv1", "mode: testing", "mode: enforce", "mx: a.example.com",
          "max_age: 1"), ("testing", 1, ("a.example.com",))),  # the first wins
    (body(*BASE[:3], "max_age: 31557600"), ("enforce", 31557600, ("mail.example.com",))),
    (body(*BASE[:3], "max_age: 0"), ("enforce", 0, ("mail.example.com",))),
    (body(*BASE[:3], "max_age: 31557601"), "max_age"),
    (body(*BASE[:3], "max_age: -1"), "max_age"),
    (body(*BASE[:3], "max_age: +5"), "max_age"),
    (body(*BASE[:3], "max_age: 1e5"), "max_age"),
    (body(*BASE[:3], "max_age: 86400s"), "max_age"),
    (body(*BASE[:3], "max_age: 99999999999"), "max_age"),  # 11 digits
    (body(*BASE[:3], "max_age:"), "empty or unprintable"),
    (body(*BASE[:3]), "no max_age"),
    (body("version: STSv1", "mode: none", "max_age: 86400"), ("none", 86400, ())),
    (body("version: STSv1", "mode: enforce", "max_age: 86400"), "without any mx"),
    (body("version: STSv1", "mode: testing", "max_age: 86400"), "without any mx"),
    (body("version: STSv2", *BASE[1:]), "not STSv1"),
    (body(*BASE[1:]), "no version"),
    (body(*BASE, "foo: bar baz"), ("enforce", 86400, ("mail.example.com",))),
    (body(*BASE, "foo:"), "empty or unprintable"),
    (body("version: STSv1", "", *BASE[1:]), "not key: value"),  # a blank line
    (RFC_EXAMPLE + b"\n", "not key: value"),  # two line ends at the end
    (body(*BASE[:2], "mx: *.*.example.com", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: a.*.example.com", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: *example.com", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx:", "max_age: 1"), "empty or unprintable"),
    (body(*BASE[:2], "mx: mx.bücher.example", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: mx.xn--bcher-kva.example", "max_age: 1"),
     ("enforce", 1, ("mx.xn--bcher-kva.example",))),
    (body(*BASE[:2], "mx: MAIL.Example.COM", "max_age: 1"),
     ("enforce", 1, ("mail.example.com",))),
    (body(*BASE[:2], "mx: 192.0.2.25", "max_age: 1"), "IP address"),
    (body(*BASE[:2], "mx: [192.0.2.25]", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: 2001:db8::25", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: mail.example.com.", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: localhost", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: -mail.example.com", "max_age: 1"), "A-labels"),
    (body(*BASE[:2], "mx: mail.example.com mx2.example.com", "max_age: 1"), "A-labels"),
    ("\ufeff".encode() + RFC_EXAMPLE, "not key: value"),  # a byte order mark
    (b"version: STSv1\nmode: enforce\x00\nmx: a.example.com\nmax_age: 1\n",
     "empty or unprintable"),
    (b"version: STSv1\rmode: enforce\rmx: a.example.com\rmax_age: 1\r", "CR"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
    (b"<html><body>It works!</body></html>\n", "not key: value"),
    (b'{"version": "STSv1", "mode": "enforce"}', "not key: value"),  # not JSON
    (b"", "not key: value"),
    (RFC_EXAMPLE + b"x-pad: " + b"a" * MAX_POLICY_BYTES + b"\n", "over 65536 bytes"),
    (body(*BASE, "x-note: " + "a" * (MAX_POLICY_BYTES - 120)),
     ("enforce", 86400, ("mail.example.com",))),  # under the cap
]


@pytest.mark.parametrize(("text", "expected"), POLICIES)
def test_policy_files(text, expected):
    if isinstance(expected, str):
        with pytest.raises(StsError, match=expected):
            parse_policy(text)
        return
    policy = parse_policy(text)
    assert (policy.mode.value, policy.max_age, policy.mx) == expected


def test_there_are_at_least_forty_cases_of_each_kind():
    assert len(POLICIES) >= 40 and len(RECORDS) >= 25


def test_the_policy_lines_are_kept_for_reports():
    policy = parse_policy(RFC_EXAMPLE.replace(b"\n", b"\r\n"))
    assert policy.lines == ("version: STSv1", "mode: enforce", "mx: mail.example.com",
                            "mx: *.example.net", "mx: backupmx.example.com",
                            "max_age: 604800")


def test_an_enforce_policy_becomes_verify_by_mx_name_within_the_patterns():
    policy = parse_policy(RFC_EXAMPLE).policy("example.com")
    assert policy is not None
    assert policy.level is Level.VERIFY and policy.match == ("hostname",)
    assert policy.enforce and policy.mx_patterns == parse_policy(RFC_EXAMPLE).mx
    assert policy.source.type == "sts" and policy.source.domain == "example.com"
    assert policy.source.strings[1] == "mode: enforce"
    assert "mode enforce" in policy.reason


def test_testing_reports_only_unless_applied_as_enforce_and_none_is_no_policy():
    testing = parse_policy(RFC_EXAMPLE.replace(b"enforce", b"testing"))
    assert testing.mode is Mode.TESTING
    assert testing.policy("example.com").enforce is False
    assert testing.policy("example.com", enforce=True).enforce is True
    assert "applied as enforce" in testing.policy("example.com", enforce=True).reason
    none = parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n")
    assert none.policy("example.com") is None


# -- mx patterns (RFC 8461 4.1) --------------------------------------------------------------

MATCHES = [
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "MAIL.Example.COM.", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),  # one label only, unlike Postfix's .x
    ("*.example.com", "mail.example.com.evil.test", False),
    ("*.example.com", "mailexample.com", False),
    ("example.com", "mail.example.com", False),
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "mail.example.com.", True),
]


@pytest.mark.parametrize(("pattern", "host", "matches"), MATCHES)
def test_mx_patterns(pattern, host, matches):
    assert mx_pattern_matches(pattern, host) is matches
