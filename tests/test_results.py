"""Plugin results as SMTP replies, and the enhanced status codes every reply carries."""

from __future__ import annotations

import pytest

from harakapy import deny, denydisconnect, denysoft, ok
from harakapy.inbound.address import AddressError, parse_params, parse_path
from harakapy.results import add_enhanced, format_reply, reply_for


@pytest.mark.parametrize(("result", "reply"), [
    (deny(), "550 5.7.1 refused"),
    (denysoft(), "451 4.7.1 refused"),
    (denydisconnect(), "554 5.7.1 refused"),
    (ok(), "250 2.7.1 refused"),
    (deny("no such user", enhanced="5.1.1"), "550 5.1.1 no such user"),
    (denysoft("later", code=450), "450 4.7.1 later"),
    (deny("x", enhanced="4.1.1"), "550 5.1.1 x"),  # the class digit follows the code
])
def test_reply_for(result, reply):
    assert reply_for(result, default_message="refused", default_enhanced="5.7.1") == reply


def test_multiline_message():
    assert format_reply(550, "one\ntwo", "5.7.1") == "550-5.7.1 one\r\n550 5.7.1 two"


@pytest.mark.parametrize(("raw", "expected"), [
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ('500 Error: command "X" not recognized', '500 5.5.2 command "X" not recognized'),
    ("250 2.1.0 Ok", "250 2.1.0 Ok"),
    ("220 host ESMTP", "220 host ESMTP"),
    ("334 ", "334 "),
    ("250-multi", "250-multi"),
])
def test_add_enhanced(raw, expected):
    assert add_enhanced(raw) == expected


@pytest.mark.parametrize(("text", "null", "utf8", "expected"), [
    ("<a@Example.TEST>", False, False, ("a", "example.test", "")),
    ("<> SIZE=10", True, False, ("", "", "SIZE=10")),
    ("<@relay.test,@b.test:u@x.test>", False, False, ("u", "x.test", "")),
    ('<"a b"@x.test>', False, False, ('"a b"', "x.test", "")),
    ("<u@[192.0.2.1]>", False, False, ("u", "[192.0.2.1]", "")),
    ("<jörg@exämple.test> SMTPUTF8", False, True, ("jörg", "exämple.test", "SMTPUTF8")),
])
def test_parse_path(text, null, utf8, expected):
    address, rest = parse_path(text, allow_null=null, smtputf8=utf8)
    assert (address.local, address.domain, rest) == expected


@pytest.mark.parametrize(("text", "null", "utf8", "reason"), [
    ("a@x.test", False, False, "enclosed in <>"),
    ("<>", False, False, "empty address"),
    ("<a@>", False, False, "malformed"),
    ("<a b@x.test>", False, False, "malformed"),
    ("<a@x.test>SIZE=1", False, False, "expected a space"),
    ("<jörg@x.test>", False, False, "needs SMTPUTF8"),
    ("<" + "a" * 65 + "@x.test>", False, False, "local part too long"),
])
def test_parse_path_errors(text, null, utf8, reason):
    with pytest.raises(AddressError, match=reason):
        parse_path(text, allow_null=null, smtputf8=utf8)


def test_params():
    assert parse_params("size=10 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": True}
    with pytest.raises(AddressError, match="given twice"):
        parse_params("SIZE=1 size=2")
    with pytest.raises(AddressError, match="malformed"):
        parse_params("=x")
