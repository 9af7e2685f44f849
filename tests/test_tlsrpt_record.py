"""The ``_smtp._tls`` TXT record (harakapy.tls.tlsrpt): the RFC 8460 section 3 grammar,
the exactly-one rule, rua lists and schemes (../shared/specs/tlsrpt.md, test cases 1-6)."""

from __future__ import annotations

import pytest

from harakapy.tls.tlsrpt import Rua, TlsrptError, parse_record, select_record

VALID = [
    ("v=TLSRPTv1;rua=mailto:reports@example.com", ["mailto:reports@example.com"]),
    ("v=TLSRPTv1;rua=mailto:reports@example.com;", ["mailto:reports@example.com"]),
    ("v=TLSRPTv1; rua=mailto:a@x.example,https://r.x.example:8443/tlsrpt",
     ["mailto:a@x.example", "https://r.x.example:8443/tlsrpt"]),
    ("v=TLSRPTv1 ; rua=mailto:a@x.example , mailto:b@x.example",
     ["mailto:a@x.example", "mailto:b@x.example"]),
    ("v=TLSRPTv1; rua=mailto:a%2Cb@x.example", ["mailto:a,b@x.example"]),
    ("v=TLSRPTv1; ext=1; rua=mailto:a@x.example", ["mailto:a@x.example"]),
    ("v=TLSRPTv1; rua=mailto:a@x.example; rua=mailto:b@x.example", ["mailto:a@x.example"]),
    ("v=TLSRPTv1; rua=mailto:a@x.example?subject=tls", ["mailto:a@x.example"]),
    ("v=TLSRPTv1; rua=MAILTO:a@x.example", ["mailto:a@x.example"]),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_records(text, expected):
    assert [str(rua) for rua in parse_record(text).rua] == expected


INVALID = [
    ("v=TLSRPTv1", "no rua"),
    ("v=TLSRPTv1;", "no rua"),
    ("rua=mailto:a@x.example", "does not begin"),
    ("v=TLSRPTv2;rua=mailto:a@x.example", "does not begin"),
    ("v=tlsrptv1;rua=mailto:a@x.example", "does not begin"),
    ("v=TLSRPTv1; rua=", "no rua"),
    ("v=TLSRPTv1; rua=mailto:a@x.example,,mailto:b@x.example", "empty URI"),
    ("v=TLSRPTv1; rua=reports@example.com", "not a URI"),
    ("v=TLSRPTv1; rua=mailto:not-an-address", "not a mailto"),
    ("v=TLSRPTv1; rua=https:///no-host", "no host"),
    ("v=TLSRPTv1; rua=mailto:a@x.example; bad field", "malformed field"),
    ("v=TLSRPTv1; rua=mailto:a@x.example; x=\x07", "malformed field"),
]


@pytest.mark.parametrize(("text", "why"), INVALID)
def test_invalid_records(text, why):
    with pytest.raises(TlsrptError, match=why):
        parse_record(text)


def test_a_literal_comma_in_a_mailto_local_part_splits_the_list():
    # RFC 8460 3: "," inside a URI must be percent-encoded, so an unencoded one separates.
    with pytest.raises(TlsrptError):
        parse_record("v=TLSRPTv1; rua=mailto:a,b@x.example")


def test_schemes_we_cannot_send_to_are_skipped_not_errors():
    record = parse_record("v=TLSRPTv1; rua=ftp://x.example/r,mailto:a@x.example")
    assert record.rua == (Rua("mailto", "a@x.example"),)
    assert record.skipped == ("ftp://x.example/r",)
    assert parse_record("v=TLSRPTv1; rua=http://x.example/r").rua == ()


def test_exactly_one_record_must_remain():
    good = "v=TLSRPTv1;rua=mailto:r@x.example"
    assert select_record([good, "v=spf1 -all"]).rua == (Rua("mailto", "r@x.example"),)
    with pytest.raises(TlsrptError, match="2 v=TLSRPTv1 records"):
        select_record([good, "v=TLSRPTv1;rua=mailto:s@x.example"])
    with pytest.raises(TlsrptError, match="no v=TLSRPTv1"):
        select_record(["v=spf1 -all"])
    with pytest.raises(TlsrptError, match="no v=TLSRPTv1"):
        select_record([])


def test_the_strings_of_a_record_are_joined_before_parsing():
    # The resolver joins a record's strings without separators (Resolver.txt).
    assert parse_record("v=TLSRPTv1;" + "rua=mailto:r@x.example").rua
