"""8-bit message text made 7-bit (RFC 6152 3, RFC 2045 6): for a server without 8BITMIME.

Each body part that carries 8-bit octets is re-encoded, text as quoted-printable and
anything else as base64, with its Content-Transfer-Encoding changed to say so; every
other byte of the message (the header fields, 7-bit parts, preambles) stays as it was.
A header with 8-bit octets has no 7-bit form that means the same (RFC 2047 words are for
unstructured text only), so such a message cannot be converted. Pure: no I/O.
"""

from __future__ import annotations

import email.encoders
import email.parser
import email.policy
import quopri
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

# Parsed and written back with no refolding of long header lines and CRLF line ends, so
# that header fields come out as they went in.
_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def to_7bit(message: bytes) -> bytes | None:
    """``message`` with every line 7-bit; ``None`` when it cannot be: 8-bit octets in a
    header (of the message or of a part)."""
    end = message.find(b"\r\n\r\n")
    if not message[:end if end >= 0 else len(message)].isascii():
        return None
    parsed = email.parser.BytesParser(policy=_POLICY).parsebytes(message)
    for part in parsed.walk():
        if any(not str(value).isascii() for value in part.values()):
            return None  # an 8-bit header of a part (surrogate-escaped by the parser)
        if part.is_multipart():
            continue
        _encode(part)
    if parsed.get("MIME-Version") is None:
        # Plain RFC 5322 text: its encoding now needs MIME to be understood.
        parsed["MIME-Version"] = "1.0"
        if parsed.get("Content-Type") is None:
            parsed["Content-Type"] = f"text/plain; charset={_charset(message[end + 4:])}"
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(parsed)
    converted = out.getvalue()
    return converted if converted.isascii() else None


def _encode(part: Message) -> None:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes) or raw.isascii():
        return
    encoding = part.get("Content-Transfer-Encoding", "").strip().lower()
    if encoding in ("quoted-printable", "base64"):
        return  # already 7-bit in transfer (the 8-bit octets were its decoded form)
    del part["Content-Transfer-Encoding"]
    if part.get_content_maintype() == "text":
        # Line ends stay line ends (hard breaks in quoted-printable), not "=0D"; spaces
        # stay spaces where they may.
        encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n"), quotetabs=False)
        part.set_payload(encoded.decode("ascii"))
        part["Content-Transfer-Encoding"] = "quoted-printable"
    else:
        part.set_payload(raw)
        email.encoders.encode_base64(part)


def _charset(body: bytes) -> str:
    """What 8-bit text without a declared charset most likely is: UTF-8 if it decodes as
    such, else ``unknown-8bit`` (RFC 1428)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"
