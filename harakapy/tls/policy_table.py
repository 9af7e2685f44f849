"""Postfix ``smtp_tls_policy_maps`` tables, read as they are written for Postfix.

A table maps a destination to a level and attributes::

    # comments and blank lines are ignored; a line starting with whitespace continues
    example.com          secure match=nexthop:dot-nexthop protocols=>=TLSv1.2
    .example.com         encrypt
    [smtp.relay.example]:587  verify match=smtp.relay.example
    bank.example         fingerprint
        match=sha256:3D:95:34:...|EC:3B:...

Lookup follows Postfix: the destination itself, then ``.parent`` entries for each parent
domain; for a routed next hop ``[host]:port``, then ``[host]``. Pure: no I/O but the
caller's text.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from harakapy.config import ConfigError
from harakapy.tls.policy import Level, Pin, Policy, cipher_list, parse_protocols

log = logging.getLogger("harakapy.tls.policy_table")

# Postfix attributes we accept without acting on them, and why.
_IGNORED = {
    "connection_reuse": "connections are always reused under the same policy",
    "tafile": "DANE trust anchors come from DNS (the dane plugin)",
    "enable_rpk": "raw public keys are not supported",
}


@dataclass(frozen=True, slots=True)
class TableEntry:
    key: str
    policy: Policy
    line: int


class PolicyTable:
    """A parsed table. Build with :meth:`parse`; ask with :meth:`lookup`."""

    def __init__(self, entries: dict[str, TableEntry], path: Path) -> None:
        self.entries = entries
        self.path = path

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def parse(cls, path: Path, text: str, *, name: str = "config/tls_policy") -> PolicyTable:
        """:raises ConfigError: naming the file and line of the first mistake."""
        entries: dict[str, TableEntry] = {}
        for line_no, logical in _logical_lines(text):
            fields = logical.split()
            if len(fields) < 2:
                raise ConfigError(path, line_no, None,
                                  f"{fields[0]!r} has no policy (expected: destination "
                                  f"level [attribute=value ...])")
            key = _check_key(path, line_no, fields[0])
            policy = _parse_policy(path, line_no, fields[1:],
                                   reason=f"{name}:{line_no}: {logical.strip()}")
            if key in entries:
                log.warning("%s:%d: %s is already in the table at line %d; the first entry "
                            "wins, as in Postfix", name, line_no, key, entries[key].line)
                continue
            entries[key] = TableEntry(key, policy, line_no)
        return cls(entries, path)

    def lookup(self, domain: str, route: list[tuple[str, int]] | None = None
               ) -> TableEntry | None:
        """The entry for a destination.

        :param domain: The recipient domain (for mail that went by MX records).
        :param route: ``(host, port)`` of each routed next hop when a ``get_mx`` plugin
            routed the mail: the keys are then ``[host]:port`` and ``[host]``.
        """
        for key in lookup_keys(domain, route):
            if key in self.entries:
                return self.entries[key]
        return None


def lookup_keys(domain: str, route: list[tuple[str, int]] | None = None) -> list[str]:
    """The keys to try, best first, as Postfix does for ``smtp_tls_policy_maps``:
    ``[host]:port`` then ``[host]`` for each routed next hop; else the domain, then
    ``.parent`` for each parent domain."""
    if route:
        keys = []
        for host, port in route:
            bracketed = f"[{host.strip('[]').lower()}]"
            keys += [f"{bracketed}:{port}", bracketed]
        return keys
    name = domain.lower().rstrip(".")
    labels = name.split(".")
    return [name] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Postfix table lines: ``#`` comment lines and blank lines skipped, a line starting
    with whitespace joined to the one before. Each with the number of its first line."""
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0].isspace() and lines:
            first, so_far = lines[-1]
            lines[-1] = (first, f"{so_far} {stripped}")
        else:
            lines.append((number, stripped))
    return lines


def _check_key(path: Path, line: int, key: str) -> str:
    key = key.lower()
    host = key
    if key.startswith("["):
        host, sep, port = key[1:].partition("]")
        if not sep or (port and (not port.startswith(":") or not port[1:].isascii()
                                 or not port[1:].isdigit()
                                 or not 0 < int(port[1:]) < 65536)):
            raise ConfigError(path, line, None, f"{key!r} is not [host] or [host]:port")
    elif key.startswith("."):
        host = key[1:]
    if ":" in host and not key.startswith("["):
        host = ""  # "example.com:587" would never match: Postfix writes [host]:port
    if "*" in host:
        raise ConfigError(path, line, None, f"{key!r}: no wildcards; .example.com means "
                                            f"every subdomain of example.com")
    if not host or any(not label for label in host.split(".")) or " " in host:
        raise ConfigError(path, line, None, f"{key!r} is not a domain, .domain, [host] "
                                            f"or [host]:port")
    return key


def _parse_policy(path: Path, line: int, fields: list[str], *, reason: str) -> Policy:
    level_name = fields[0].lower()
    try:
        level = Level(level_name)
    except ValueError:
        raise ConfigError(path, line, None,
                          f"unknown level {fields[0]!r} (known: "
                          f"{', '.join(v.value for v in Level)})") from None
    match: list[str] = []
    pins: list[Pin] = []
    exclude: list[str] = []
    ciphers = servername = ""
    low = high = None
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        name = name.lower()
        if not sep or not value:
            raise ConfigError(path, line, None, f"{field!r} is not attribute=value")
        if name == "match":
            if level is Level.FINGERPRINT:
                try:
                    pins += [Pin.parse(item) for item in value.split("|") if item]
                except ValueError as exc:
                    raise ConfigError(path, line, None, f"match: {exc}") from None
            else:
                match += [item for item in value.split(":") if item]
        elif name == "protocols":
            try:
                low, high = parse_protocols(value)
            except ValueError as exc:
                raise ConfigError(path, line, None, f"protocols: {exc}") from None
            if "!" in value and ">=" not in value and low is not None \
                    and low < ssl.TLSVersion.TLSv1_2:
                # Old tables carry "!SSLv2:!SSLv3" as boilerplate. Copied here, it must
                # not lower [outbound] min_version; ">=TLSv1" says so on purpose.
                low = None
        elif name == "ciphers":
            ciphers = value
        elif name == "exclude":
            exclude += [item for item in value.replace(",", ":").split(":") if item]
        elif name == "servername":
            servername = value.lower()
        elif name in _IGNORED:
            log.warning("%s: %s is ignored: %s", reason.split(": ", 1)[0], name,
                        _IGNORED[name])
        else:
            raise ConfigError(path, line, None,
                              f"unknown attribute {name!r} (known: match, protocols, "
                              f"ciphers, exclude, servername, {', '.join(_IGNORED)})")
    if level is Level.FINGERPRINT and not pins:
        raise ConfigError(path, line, None, "fingerprint needs match=<digest>[|<digest>...]")
    if match and not level.verifies_chain:
        raise ConfigError(path, line, None,
                          f"match= means nothing at level {level} (it names the certificate "
                          f"names verify and secure accept, or fingerprint's digests)")
    cipher_text = ""
    if ciphers or exclude:
        try:
            cipher_text = cipher_list(ciphers, exclude)
        except ValueError as exc:
            raise ConfigError(path, line, None, f"ciphers: {exc}") from None
    if servername == "hostname":
        servername = ""  # Postfix's "hostname": the MX host name, our default
    return Policy(level, match=tuple(match), pins=tuple(pins), min_protocol=low,
                  max_protocol=high, ciphers=cipher_text, servername=servername,
                  reason=reason)
