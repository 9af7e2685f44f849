"""Decoding message text after DATA: pure, table-driven."""

from __future__ import annotations

import pytest

from harakapy.inbound.data import LINE_TOO_LONG, decode, too_big


@pytest.mark.parametrize(("raw", "content"), [
    (b"", b""),
    (b"a\r\n", b"a\r\n"),
    (b"..\r\n.x\r\n..y\r\nz\r\n", b".\r\nx\r\n.y\r\nz\r\n"),  # dot-unstuffing, RFC 5321 4.5.2
    (b"a\nb\r\n", b"a\r\nb\r\n"),  # bare LF normalised
    (b"a\n.\nMAIL FROM:<x@y>\r\n", b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"),  # smuggling is content
    (b"a\rb\r\n", b"a\rb\r\n"),  # bare CR kept
])
def test_decode(raw, content):
    assert decode(raw, 10_000) == (content, None)


def test_line_limit_counts_crlf_but_not_a_stuffing_dot():
    assert decode(b"x" * 998 + b"\r\n", 10_000)[1] is None
    assert decode(b"x" * 999 + b"\r\n", 10_000)[1] == LINE_TOO_LONG
    assert decode(b"." + b"x" * 998 + b"\r\n", 10_000)[1] is None


def test_size_limit():
    assert decode(b"x" * 100 + b"\r\n", 50) == (b"", too_big(50))
