"""Postfix ``smtp_tls_policy_maps`` tables (harakapy.tls.policy_table) and the policy model
they build (harakapy.tls.policy): pure, table-driven, no I/O."""

from __future__ import annotations

import hashlib
import logging
import ssl
from pathlib import Path

import pytest

from harakapy.config import ConfigError
from harakapy.tls.policy import (
    CIPHER_GRADES,
    DEFAULT_MATCH,
    Level,
    Pin,
    Policy,
    PolicySource,
    cipher_list,
    format_protocols,
    parse_protocols,
)
from harakapy.tls.policy_table import PolicyTable, lookup_keys

PATH = Path("/etc/harakapy/config/tls_policy")
V = ssl.TLSVersion

# Digests of fixed bytes: real SHA-256 / SHA-512 lengths, independent of the code under test.
SHA256_A = hashlib.sha256(b"certificate a").hexdigest()
SHA256_B = hashlib.sha256(b"certificate b").hexdigest()
SHA512_C = hashlib.sha512(b"key c").hexdigest()
MD5 = hashlib.md5(b"old postfix default").hexdigest()


def colons(hexdigest: str) -> str:
    """Postfix's fingerprint spelling: upper case, a colon between bytes."""
    return ":".join(hexdigest[i:i + 2] for i in range(0, len(hexdigest), 2)).upper()


# A table as a Postfix administrator writes it: comments, blank lines, continuation lines,
# every level, match lists, both protocols= syntaxes, cipher grades, attributes we ignore.
POSTFIX_TABLE = f"""\
# /etc/postfix/tls_policy -- smtp_tls_policy_maps = hash:/etc/postfix/tls_policy
#
# Our partners.

example.com          secure match=nexthop:dot-nexthop protocols=>=TLSv1.2
.example.com         encrypt
   # comment lines inside a multi-line entry are skipped
[smtp.relay.example]:587  verify match=smtp.relay.example
[smtp.relay.example] verify match=hostname:.relay.example

bank.example         fingerprint
    match={colons(SHA256_A)}|sha256:{SHA256_B}
    match=sha512:{SHA512_C}
legacy.example       may    protocols=!SSLv2:!SSLv3:!TLSv1 ciphers=medium
\t
plain.example        none
dane.example         dane
dane-only.example    dane-only tafile=/etc/postfix/ta.pem
pinned-sni.example   encrypt servername=mx.pinned-sni.example connection_reuse=yes
hostname-sni.example verify servername=hostname ciphers=high exclude=3DES:RC4
MiXeD.Example        VERIFY  Match=Mail.Mixed.Example
multi.example        secure match=nexthop
  match=.mail.multi.example
  protocols=<=TLSv1.2
"""


@pytest.fixture
def table() -> PolicyTable:
    return PolicyTable.parse(PATH, POSTFIX_TABLE)


def policy(table: PolicyTable, key: str) -> Policy:
    return table.entries[key].policy


# -- a realistic table -----------------------------------------------------------------


def test_a_postfix_table_parses_as_written(table):
    assert list(table.entries) == [
        "example.com", ".example.com", "[smtp.relay.example]:587", "[smtp.relay.example]",
        "bank.example", "legacy.example", "plain.example", "dane.example",
        "dane-only.example", "pinned-sni.example", "hostname-sni.example", "mixed.example",
        "multi.example",
    ]
    assert len(table) == 13
    assert table.path == PATH


def test_entries_keep_the_number_of_their_first_line(table):
    lines = POSTFIX_TABLE.splitlines()
    for key, entry in table.entries.items():
        assert entry.line >= 1
        assert lines[entry.line - 1].split()[0].lower() == key, key
    assert table.entries["bank.example"].line == 11
    assert table.entries["multi.example"].line == 22


def test_secure_with_nexthop_and_protocol_floor(table):
    got = policy(table, "example.com")
    assert got.level is Level.SECURE
    assert got.match == ("nexthop", "dot-nexthop")
    assert (got.min_protocol, got.max_protocol) == (V.TLSv1_2, None)
    assert got.pins == ()
    assert got.ciphers == ""
    assert got.enforce is True
    assert got.source == PolicySource()


def test_subdomain_entry_and_routed_entries(table):
    assert policy(table, ".example.com").level is Level.ENCRYPT
    with_port = policy(table, "[smtp.relay.example]:587")
    assert with_port.level is Level.VERIFY
    assert with_port.match == ("smtp.relay.example",)
    without = policy(table, "[smtp.relay.example]")
    assert without.match == ("hostname", ".relay.example")


def test_fingerprint_digests_from_several_match_attributes_accumulate(table):
    got = policy(table, "bank.example")
    assert got.level is Level.FINGERPRINT
    assert got.pins == (Pin("sha256", SHA256_A), Pin("sha256", SHA256_B),
                        Pin("sha512", SHA512_C))
    assert got.match == ()


def test_exclusion_list_protocols_and_cipher_grade(table):
    got = policy(table, "legacy.example")
    assert got.level is Level.MAY
    # "!SSLv2:!SSLv3:!TLSv1" is old Postfix boilerplate: it leaves the floor to
    # [outbound] min_version rather than lowering it to TLS 1.1.
    assert (got.min_protocol, got.max_protocol) == (None, None)
    assert got.ciphers == CIPHER_GRADES["medium"]


@pytest.mark.parametrize(("value", "low"), [
    ("!SSLv2:!SSLv3", None),  # would be TLS 1.0: left to min_version
    ("!SSLv2:!SSLv3:!TLSv1:!TLSv1.1", V.TLSv1_2),  # at or above the floor: kept
    (">=TLSv1", V.TLSv1),  # said on purpose: kept
])
def test_exclusion_lists_never_lower_the_configured_floor(value, low):
    parsed = PolicyTable.parse(Path("tls_policy"), f"old.example encrypt protocols={value}\n")
    assert parsed.lookup("old.example").policy.min_protocol == low


def test_every_level_is_read(table):
    levels = {key: entry.policy.level for key, entry in table.entries.items()}
    assert set(levels.values()) == set(Level)
    assert levels["plain.example"] is Level.NONE
    assert levels["dane.example"] is Level.DANE
    assert levels["dane-only.example"] is Level.DANE_ONLY


def test_servername_literal_and_hostname(table):
    assert policy(table, "pinned-sni.example").servername == "mx.pinned-sni.example"
    # Postfix's servername=hostname is the MX host name: our default, spelled empty.
    assert policy(table, "hostname-sni.example").servername == ""
    assert policy(table, "dane.example").servername == ""


def test_ciphers_with_exclusions(table):
    assert policy(table, "hostname-sni.example").ciphers == CIPHER_GRADES["high"] + ":!3DES:!RC4"


def test_keys_levels_and_attribute_names_are_case_insensitive_values_are_not_lowered(table):
    got = policy(table, "mixed.example")
    assert got.level is Level.VERIFY
    assert got.match == ("Mail.Mixed.Example",)  # verify compares names case-insensitively


def test_multiple_match_attributes_accumulate_for_names(table):
    got = policy(table, "multi.example")
    assert got.match == ("nexthop", ".mail.multi.example")
    assert (got.min_protocol, got.max_protocol) == (None, V.TLSv1_2)


def test_reason_names_the_table_line(table):
    # the line as written, continuation lines joined by one space
    assert policy(table, "example.com").reason == (
        "config/tls_policy:5: example.com          secure match=nexthop:dot-nexthop "
        "protocols=>=TLSv1.2")
    assert policy(table, "multi.example").reason == (
        "config/tls_policy:22: multi.example        secure match=nexthop "
        "match=.mail.multi.example protocols=<=TLSv1.2")
    other = PolicyTable.parse(PATH, "a.example may\n", name="tables/other")
    assert other.entries["a.example"].policy.reason == "tables/other:1: a.example may"


def test_ignored_postfix_attributes_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="harakapy.tls.policy_table"):
        got = PolicyTable.parse(PATH, "\n\na.example dane-only tafile=/x.pem\n"
                                      "b.example encrypt connection_reuse=yes enable_rpk=yes\n")
    assert len(got) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("config/tls_policy:3" in m and "tafile is ignored" in m for m in messages)
    assert any("config/tls_policy:4" in m and "connection_reuse is ignored" in m
               for m in messages)
    assert any("enable_rpk is ignored" in m for m in messages)


def test_an_empty_or_comment_only_table_has_no_entries():
    assert len(PolicyTable.parse(PATH, "")) == 0
    assert len(PolicyTable.parse(PATH, "# nothing\n\n   \n\t# still nothing\n")) == 0
    assert PolicyTable.parse(PATH, "# x\n").lookup("example.com") is None


def test_crlf_line_endings():
    got = PolicyTable.parse(PATH, "a.example secure\r\n  match=nexthop\r\nb.example may\r\n")
    assert policy(got, "a.example").match == ("nexthop",)
    assert got.entries["b.example"].line == 3


def test_describe_round_trips_through_the_parser(table):
    for key, entry in table.entries.items():
        again = PolicyTable.parse(PATH, f"{key} {entry.policy.describe()}\n")
        assert again.entries[key].policy == entry.policy, key


# -- lookup ------------------------------------------------------------------------------


def test_lookup_keys_for_a_domain():
    assert lookup_keys("a.b.Example.COM.") == ["a.b.example.com", ".b.example.com",
                                               ".example.com", ".com"]
    assert lookup_keys("example") == ["example"]


def test_lookup_keys_for_routed_next_hops_never_include_the_domain():
    keys = lookup_keys("example.com", [("Relay.Example", 587), ("[backup.example]", 25)])
    assert keys == ["[relay.example]:587", "[relay.example]",
                    "[backup.example]:25", "[backup.example]"]
    assert lookup_keys("example.com", []) == ["example.com", ".com"]


LOOKUP_TABLE = """\
example.com        secure
.example.com       encrypt
.org               may
deep.a.example.com verify
[relay.example]:587 fingerprint match=""" + SHA256_A + """
[relay.example]    verify
[other.example]:25 dane-only
"""


@pytest.mark.parametrize(("domain", "key"), [
    ("example.com", "example.com"),
    ("EXAMPLE.COM.", "example.com"),
    ("sub.example.com", ".example.com"),  # example.com does not cover subdomains
    ("a.b.example.com", ".example.com"),
    ("deep.a.example.com", "deep.a.example.com"),  # exact beats .parent
    ("x.deep.a.example.com", ".example.com"),  # deep.a.example.com is exact only
    ("example.org", ".org"),
    ("example.net", None),
    ("notexample.com", None),
    ("com", None),
])
def test_lookup_by_domain(domain, key):
    found = PolicyTable.parse(PATH, LOOKUP_TABLE).lookup(domain)
    assert (found.key if found else None) == key


@pytest.mark.parametrize(("route", "key"), [
    ([("relay.example", 587)], "[relay.example]:587"),
    ([("relay.example", 25)], "[relay.example]"),
    ([("RELAY.example", 2525)], "[relay.example]"),
    ([("unknown.example", 587), ("relay.example", 587)], "[relay.example]:587"),
    ([("other.example", 25)], "[other.example]:25"),
    ([("other.example", 587)], None),
    # routed: the domain's own entries never apply
    ([("mx.example.com", 25)], None),
])
def test_lookup_by_route(route, key):
    found = PolicyTable.parse(PATH, LOOKUP_TABLE).lookup("example.com", route)
    assert (found.key if found else None) == key


def test_lookup_returns_the_entry_with_its_policy_and_line():
    found = PolicyTable.parse(PATH, LOOKUP_TABLE).lookup("x.example.com")
    assert found is not None
    assert found.line == 2
    assert found.policy.level is Level.ENCRYPT


def test_a_duplicate_key_keeps_the_first_entry_and_warns(caplog):
    text = "example.com secure\n.example.com may\nEXAMPLE.com none\n"
    with caplog.at_level(logging.WARNING, logger="harakapy.tls.policy_table"):
        got = PolicyTable.parse(PATH, text)
    assert len(got) == 2
    assert got.lookup("example.com").policy.level is Level.SECURE
    assert got.lookup("example.com").line == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "config/tls_policy:3" in warnings[0]
    assert "line 1" in warnings[0]
    assert "first entry wins" in warnings[0]


# -- malformed tables ------------------------------------------------------------------


def fails(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        PolicyTable.parse(PATH, text)
    return caught.value


@pytest.mark.parametrize(("text", "line", "words"), [
    ("example.com secure-ish\n", 1, "unknown level 'secure-ish'"),
    ("# c\n\nexample.com\n", 3, "'example.com' has no policy"),
    ("a.example may\nexample.com match=nexthop\n", 2, "unknown level 'match=nexthop'"),
    ("example.com secure match\n", 1, "'match' is not attribute=value"),
    ("example.com secure match=\n", 1, "'match=' is not attribute=value"),
    ("example.com secure colour=blue\n", 1, "unknown attribute 'colour'"),
    ("[host.example verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]:99999 verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]:0 verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]: verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]587 verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]:58a verify\n", 1, "is not [host] or [host]:port"),
    ("[host.example]:\N{SUPERSCRIPT TWO}5 verify\n", 1, "is not [host] or [host]:port"),
    ("[] verify\n", 1, "is not a domain"),
    ("a..b verify\n", 1, "'a..b' is not a domain"),
    ("..example.com verify\n", 1, "is not a domain"),
    (". verify\n", 1, "is not a domain"),
    ("example.com. verify\n", 1, "is not a domain"),
    ("bank.example fingerprint\n", 1, "fingerprint needs match="),
    (f"bank.example fingerprint match={SHA256_A[:-2]}\n", 1, "62 hex digits"),
    (f"bank.example fingerprint match={SHA256_A[:-1]}x\n", 1, "is not a hex digest"),
    (f"bank.example fingerprint match={MD5}\n", 1, "32 hex digits"),
    (f"bank.example fingerprint match={colons(MD5)}\n", 1, "32 hex digits"),
    (f"bank.example fingerprint match=sha512:{SHA256_A}\n", 1, "is not a sha512 digest"),
    (f"bank.example fingerprint match=md5:{MD5}\n", 1, "is not a hex digest"),
    ("example.com encrypt match=nexthop\n", 1, "match= means nothing at level encrypt"),
    ("example.com may match=nexthop\n", 1, "match= means nothing at level may"),
    ("example.com dane match=nexthop\n", 1, "match= means nothing at level dane"),
    ("example.com secure protocols=!TLSv1.2:!TLSv1.3:!TLSv1.1:!TLSv1:!SSLv3\n", 1,
     "leave no protocol"),
    ("example.com secure protocols=>=TLSv1.3:<=TLSv1.2\n", 1, "leave no protocol"),
    ("example.com secure protocols=TLSv9\n", 1, "unknown protocol 'TLSv9'"),
    ("example.com secure ciphers=NO-SUCH-CIPHER\n", 1, "OpenSSL selects no cipher"),
    ("example.com secure ciphers=aNULL:!aNULL\n", 1, "OpenSSL selects no cipher"),
])
def test_a_malformed_line_names_file_and_line(text, line, words):
    error = fails(text)
    assert error.path == PATH
    assert error.line == line
    assert str(error).startswith(f"{PATH}:{line}: ")
    assert words in str(error)


def test_an_error_in_a_continuation_line_reports_the_entry_first_line():
    text = ("# header\n"
            "good.example may\n"
            "\n"
            "bad.example secure\n"          # line 4: the entry starts here
            "    match=nexthop\n"
            "    # a comment between continuation lines\n"
            "    protocols=>=TLSv1.9\n")    # line 7: the mistake
    error = fails(text)
    assert error.line == 4
    assert str(error).startswith(f"{PATH}:4: protocols: unknown protocol 'TLSv1.9'")


def test_the_first_mistake_is_reported():
    error = fails("a.example bogus\nb.example alsobogus\n")
    assert error.line == 1
    assert "'bogus'" in str(error)


def test_a_mistake_after_a_duplicate_is_still_reported():
    assert fails("a.example may\na.example nonsense\n").line == 2


def test_a_leading_continuation_line_with_nothing_before_it_is_its_own_entry():
    got = PolicyTable.parse(PATH, "  example.com secure\n")
    assert got.entries["example.com"].line == 1


# -- Level -------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "requires", "chain"), [
    (Level.NONE, False, False),
    (Level.MAY, False, False),
    (Level.ENCRYPT, True, False),
    (Level.DANE, False, False),
    (Level.DANE_ONLY, True, False),
    (Level.FINGERPRINT, True, False),
    (Level.VERIFY, True, True),
    (Level.SECURE, True, True),
])
def test_level_properties(level, requires, chain):
    assert level.requires_tls is requires
    assert level.verifies_chain is chain


def test_level_values_are_postfix_spellings():
    assert [v.value for v in Level] == ["none", "may", "encrypt", "dane", "dane-only",
                                        "fingerprint", "verify", "secure"]
    assert Level("dane-only") is Level.DANE_ONLY


# -- Pin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    SHA256_A,
    SHA256_A.upper(),
    colons(SHA256_A),
    f"sha256:{SHA256_A}",
    f"SHA256:{colons(SHA256_A)}",
    f"  sha256:{SHA256_A}\n",
])
def test_pin_parse_sha256_spellings(text):
    assert Pin.parse(text) == Pin("sha256", SHA256_A)


@pytest.mark.parametrize("text", [SHA512_C, colons(SHA512_C), f"sha512:{SHA512_C.upper()}"])
def test_pin_parse_sha512_spellings(text):
    pin = Pin.parse(text)
    assert pin == Pin("sha512", SHA512_C)
    assert str(pin) == f"sha512:{SHA512_C}"


@pytest.mark.parametrize(("text", "words"), [
    ("", "is not a hex digest"),
    ("sha256:", "is not a hex digest"),
    ("zz" * 32, "is not a hex digest"),
    (SHA256_A[:-1] + "g", "is not a hex digest"),
    ("sha1:" + hashlib.sha1(b"x").hexdigest(), "is not a hex digest"),
    (hashlib.sha1(b"x").hexdigest(), "40 hex digits"),
    (MD5, "32 hex digits"),
    (SHA256_A + "0", "65 hex digits"),
    (SHA256_A[:63], "63 hex digits"),
    (SHA512_C[:127], "127 hex digits"),
    (f"sha512:{SHA256_A}", "64 hex digits is not a sha512 digest"),
    (f"sha256:{SHA512_C}", "128 hex digits is not a sha256 digest"),
])
def test_pin_parse_refuses(text, words):
    with pytest.raises(ValueError, match="hex") as caught:
        Pin.parse(text)
    assert words in str(caught.value)


# -- Policy ------------------------------------------------------------------------------


def test_fingerprint_policy_needs_a_pin():
    with pytest.raises(ValueError, match="at least one pin"):
        Policy(Level.FINGERPRINT)
    assert Policy(Level.FINGERPRINT, pins=(Pin("sha256", SHA256_A),)).pins


def test_policy_level_may_be_given_as_its_spelling():
    assert Policy("dane-only").level is Level.DANE_ONLY
    with pytest.raises(ValueError):
        Policy("paranoid")


@pytest.mark.parametrize(("level", "expected"), [
    (Level.VERIFY, ("hostname",)),
    (Level.SECURE, ("nexthop", "dot-nexthop")),
    (Level.ENCRYPT, ()),
    (Level.MAY, ()),
    (Level.DANE_ONLY, ()),
])
def test_match_names_default_per_level(level, expected):
    assert Policy(level).match_names == expected
    assert DEFAULT_MATCH.get(level, ()) == expected


def test_explicit_match_replaces_the_default():
    assert Policy(Level.SECURE, match=("mx.example",)).match_names == ("mx.example",)
    assert Policy(Level.VERIFY, match=("nexthop",)).match_names == ("nexthop",)


def test_session_key_depends_on_the_nexthop_only_when_names_do():
    secure = Policy(Level.SECURE)  # nexthop, dot-nexthop by default
    assert secure.session_key("a.example") != secure.session_key("b.example")
    dotted = Policy(Level.VERIFY, match=("dot-nexthop",))
    assert dotted.session_key("a.example") != dotted.session_key("b.example")
    verify = Policy(Level.VERIFY)  # hostname
    assert verify.session_key("a.example") == verify.session_key("b.example")
    literal = Policy(Level.SECURE, match=("mx.example", ".example"))
    assert literal.session_key("a.example") == literal.session_key("b.example")
    encrypt = Policy(Level.ENCRYPT)
    assert encrypt.session_key("a.example") == encrypt.session_key("b.example")


def test_session_key_differs_with_what_the_session_was_opened_under():
    base = Policy(Level.VERIFY)
    others = [
        Policy(Level.SECURE, match=("hostname",)),
        Policy(Level.VERIFY, match=("mx.example",)),
        Policy(Level.VERIFY, min_protocol=V.TLSv1_3),
        Policy(Level.VERIFY, max_protocol=V.TLSv1_2),
        Policy(Level.VERIFY, ciphers="HIGH"),
        Policy(Level.VERIFY, mx_patterns=("*.example",)),
        Policy(Level.VERIFY, enforce=False),
        Policy(Level.VERIFY, servername="sni.example"),
    ]
    for other in others:
        assert other.session_key("a.example") != base.session_key("a.example"), other
    # reason and decided_by say why, not what the session is
    assert Policy(Level.VERIFY, reason="x").with_decider("p").session_key("a") == \
        base.session_key("a")


def test_with_decider_keeps_everything_else():
    original = Policy(Level.SECURE, match=("nexthop",), reason="table:1")
    decided = original.with_decider("tls_require")
    assert decided.decided_by == "tls_require"
    assert decided == original  # decided_by does not take part in equality
    assert (decided.level, decided.match, decided.reason) == (Level.SECURE, ("nexthop",),
                                                              "table:1")
    assert original.decided_by == ""


@pytest.mark.parametrize(("made", "text"), [
    (Policy(Level.MAY), "may"),
    (Policy(Level.SECURE), "secure"),
    (Policy(Level.SECURE, match=("nexthop", "dot-nexthop")),
     "secure match=nexthop:dot-nexthop"),
    (Policy(Level.VERIFY, min_protocol=V.TLSv1_2), "verify protocols=>=TLSv1.2"),
    (Policy(Level.ENCRYPT, min_protocol=V.TLSv1_1, max_protocol=V.TLSv1_2),
     "encrypt protocols=>=TLSv1.1:<=TLSv1.2"),
    (Policy(Level.ENCRYPT, max_protocol=V.SSLv3), "encrypt protocols=<=SSLv3"),
    (Policy(Level.FINGERPRINT, pins=(Pin("sha256", SHA256_A), Pin("sha512", SHA512_C))),
     f"fingerprint match=sha256:{SHA256_A}|sha512:{SHA512_C}"),
    (Policy(Level.ENCRYPT, ciphers="HIGH:!aNULL"), "encrypt ciphers=HIGH:!aNULL"),
    (Policy(Level.ENCRYPT, servername="mx.sni.example"), "encrypt servername=mx.sni.example"),
    (Policy(Level.VERIFY, mx_patterns=("mx.example", "*.example"), enforce=False),
     "verify mx=mx.example,*.example (report only)"),
])
def test_describe(made, text):
    assert made.describe() == text


# -- protocols ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bounds"), [
    ("", (None, None)),
    (">=TLSv1.2", (V.TLSv1_2, None)),
    (">=tlsv1.3", (V.TLSv1_3, None)),
    ("<=TLSv1.2", (None, V.TLSv1_2)),
    ("<=TLSv1.3", (None, None)),
    (">=TLSv1.1 <=TLSv1.2", (V.TLSv1_1, V.TLSv1_2)),
    (">=TLSv1.1:<=TLSv1.2", (V.TLSv1_1, V.TLSv1_2)),
    (">=SSLv3", (V.SSLv3, None)),
    ("!SSLv2:!SSLv3:!TLSv1", (V.TLSv1_1, None)),
    ("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1", (V.TLSv1_2, None)),
    ("!SSLv2 !SSLv3", (V.TLSv1, None)),
    ("!SSLv2", (None, None)),  # SSLv2 is gone: excluding it changes nothing
    (">=SSLv2", (None, None)),
    ("!TLSv1.3", (V.SSLv3, V.TLSv1_2)),
    ("TLSv1.2", (V.TLSv1_2, V.TLSv1_2)),
    ("TLSv1.2:TLSv1.3", (V.TLSv1_2, None)),
    ("SSLv2:TLSv1.2:TLSv1.3", (V.TLSv1_2, None)),
    ("TLSv1.2 !TLSv1.3", (V.TLSv1_2, V.TLSv1_2)),
    (">=TLSv1.2 !TLSv1.3", (V.TLSv1_2, V.TLSv1_2)),
    # Bounds cannot leave a hole: an excluded version in the middle must not be allowed,
    # so what is kept is the highest contiguous run.
    ("!TLSv1.1", (V.TLSv1_2, None)),
    ("!SSLv2:!SSLv3:!TLSv1.1", (V.TLSv1_2, None)),
    ("!TLSv1.2", (V.TLSv1_3, None)),
    ("TLSv1:TLSv1.2", (V.TLSv1_2, V.TLSv1_2)),
])
def test_parse_protocols(text, bounds):
    assert parse_protocols(text) == bounds


@pytest.mark.parametrize("text", [
    "!SSLv3:!TLSv1:!TLSv1.1:!TLSv1.2:!TLSv1.3",
    ">=TLSv1.3 <=TLSv1.2",
    "TLSv1.2 !TLSv1.2",
    # SSLv2 alone, or nothing above it, leaves nothing OpenSSL can speak.
    "SSLv2",
    "<=SSLv2",
])
def test_parse_protocols_leaving_nothing(text):
    with pytest.raises(ValueError, match="leave no protocol"):
        parse_protocols(text)


@pytest.mark.parametrize("text", ["TLSv1.4", "=TLSv1.2", "SSLv3.0", "tls1.2", ">TLSv1.2"])
def test_parse_protocols_unknown_names(text):
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_protocols(text)


@pytest.mark.parametrize(("low", "high"), [
    (None, V.TLSv1_2), (V.TLSv1_2, None), (V.TLSv1, V.TLSv1_1), (V.SSLv3, V.SSLv3)])
def test_format_protocols_round_trips(low, high):
    assert parse_protocols(format_protocols(low, high)) == (low, high)


# -- ciphers -----------------------------------------------------------------------------


def test_cipher_grades():
    assert cipher_list("high") == "HIGH:!aNULL:!eNULL"
    assert cipher_list("HIGH") == "HIGH:!aNULL:!eNULL"
    assert cipher_list("medium") == "HIGH:MEDIUM:!aNULL:!eNULL"


def test_cipher_list_passes_openssl_lists_through_and_appends_exclusions():
    assert cipher_list("ECDHE+AESGCM") == "ECDHE+AESGCM"
    assert cipher_list("high", ["3DES", "RC4"]) == "HIGH:!aNULL:!eNULL:!3DES:!RC4"
    assert cipher_list("", ["3DES"]) == "DEFAULT:!3DES"
    assert cipher_list("") == "DEFAULT"


def test_cipher_list_result_is_usable_by_openssl():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers(cipher_list("high", ["AES128"]))
    names = [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert names
    assert not any("AES128" in name for name in names)


@pytest.mark.parametrize(("grade", "exclude"), [
    ("NO-SUCH-CIPHER", ()),
    ("high", ("ALL",)),
    ("aNULL:!aNULL", ()),
])
def test_cipher_list_refuses_what_selects_nothing(grade, exclude):
    with pytest.raises(ValueError, match="OpenSSL selects no cipher"):
        cipher_list(grade, exclude)


@pytest.mark.parametrize(("key", "words"), [
    ("example.com:587", "[host]:port"),
    ("*.example.com", "no wildcards"),
])
def test_keys_that_could_never_match_are_refused(key, words):
    with pytest.raises(ConfigError) as caught:
        PolicyTable.parse(Path("tls_policy"), f"# x\n{key} verify\n")
    assert "tls_policy:2:" in str(caught.value) and words in str(caught.value)
