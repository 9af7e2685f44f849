"""``config/mta_sts.ini``: the MTA-STS client, its refresh, per-domain overrides, and the
policies we publish for our own domains (each key documented in the shipped file).

Sections:

- ``[main]``: the cache file, timeouts, how often a cached policy's TXT record is read.
- ``[refresh]``: the proactive refresh of policies that mail went to lately.
- ``[domain NAME]``: ``apply = enforce`` (a testing policy enforced) or ``ignore``.
- ``[publish NAME]``: a domain of ours: mode, ``mx``, ``max_age``, the TLSRPT ``rua``.
- ``[listen]``: the optional HTTPS listener that serves the published policies.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from harakapy.config import Config, ConfigError, IniFile
from harakapy.tls.mta_sts import MAX_MAX_AGE, Mode, StsError, check_mx_pattern
from harakapy.tls.sts_client import StsSettings

DOMAIN_PREFIX = "domain "
PUBLISH_PREFIX = "publish "


class Apply(enum.StrEnum):
    """What a ``[domain NAME]`` section does with that domain's policy."""

    AS_PUBLISHED = "as-published"
    ENFORCE = "enforce"  # a testing policy is enforced
    IGNORE = "ignore"  # the domain's policy is never looked up


@dataclass(frozen=True, slots=True)
class Refresh:
    """The proactive refresh (RFC 8461 3.3, 10.2).

    :ivar interval: Seconds between looks over the cache.
    :ivar after: A policy fetched longer ago than this is fetched again.
    :ivar idle_after: A domain no mail went to for this long is not refreshed.
    :ivar forget_after: An expired entry unused for this long leaves the cache.
    """

    interval: float = 3600.0
    after: float = 86400.0
    idle_after: float = 7 * 86400.0
    forget_after: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class Published:
    """A policy of ours (``[publish NAME]``).

    :ivar mx: ``mx`` patterns; empty means the domain's MX records, looked up when shown.
    :ivar rua: TLSRPT ``rua`` URIs for the ``_smtp._tls`` record; empty for none.
    """

    domain: str
    mode: Mode = Mode.TESTING
    mx: tuple[str, ...] = ()
    max_age: int = 7 * 86400
    rua: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Listener:
    """The HTTPS listener for published policies (``[listen]``)."""

    host: str
    port: int
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class StsConfig:
    """``config/mta_sts.ini`` as a whole.

    :ivar cache: The SQLite file of the policy cache; ``None`` for the plugin's state
        folder.
    """

    client: StsSettings
    cache: Path | None = None
    refresh: Refresh = Refresh()
    testing_as_enforce: bool = False
    overrides: dict[str, Apply] = field(default_factory=dict)
    published: dict[str, Published] = field(default_factory=dict)
    listener: Listener | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    def apply_for(self, domain: str) -> Apply:
        found = self.overrides.get(domain)
        if found is not None:
            return found
        return Apply.ENFORCE if self.testing_as_enforce else Apply.AS_PUBLISHED

    @classmethod
    def from_config(cls, config: Config, ca_file: Path | None,
                    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> StsConfig:
        """:param ca_file: ``[outbound] ca_file`` of ``config/tls.ini``: the policy hosts'
            trust anchors as the MX hosts'.
        :param min_version: ``[outbound] min_version``: policies ask for at least this,
            and never less than TLS 1.2.
        :raises ConfigError: naming the file, line and key.
        """
        ini = config.ini("mta_sts.ini")
        _check_keys(ini, config.shipped_ini("mta_sts.ini"))
        client = StsSettings(
            ca_file=ca_file,
            port=ini.get_port("main", "port", 443),
            connect_timeout=_positive(ini, "main", "connect_timeout", 10.0),
            timeout=_positive(ini, "main", "timeout", 60.0),
            retry_after=_at_least(ini, "main", "retry_after", 300.0, 300.0,
                                  "RFC 8461 3.3 asks for five minutes at least"),
            check_interval=ini.get_duration("main", "check_interval", 300.0))
        cache = config.resolve(ini.get_str("main", "cache")) if ini.get_str(
            "main", "cache") else None
        refresh = Refresh(
            interval=_positive(ini, "refresh", "interval", 3600.0),
            after=_positive(ini, "refresh", "after", 86400.0),
            idle_after=_positive(ini, "refresh", "idle_after", 7 * 86400.0),
            forget_after=_positive(ini, "refresh", "forget_after", 30 * 86400.0))
        overrides, published = {}, {}
        for section in ini.sections():
            if section.startswith(DOMAIN_PREFIX):
                name = _domain(ini, section, DOMAIN_PREFIX)
                overrides[name] = _apply(ini, section)
            elif section.startswith(PUBLISH_PREFIX):
                name = _domain(ini, section, PUBLISH_PREFIX)
                published[name] = _published(ini, section, name)
        return cls(client, cache, refresh, ini.get_bool("main", "testing_as_enforce"),
                   overrides, published, _listener(config, ini), min_version)


_SECTION_KEYS = {
    DOMAIN_PREFIX: ("apply",),
    PUBLISH_PREFIX: ("mode", "mx", "max_age", "rua"),
}


def _check_keys(ini: IniFile, shipped: IniFile) -> None:
    for section in ini.sections():
        prefix = next((p for p in _SECTION_KEYS if section.startswith(p)), None)
        if prefix is None:
            if section not in shipped.sections():
                raise ini.error(section, ini.keys(section)[0] if ini.keys(section) else "",
                                f"unknown section [{section}] (known: [main], [refresh], "
                                f"[listen], [domain NAME], [publish NAME])")
            known = shipped.keys(section)
        else:
            known = list(_SECTION_KEYS[prefix])
        for key in ini.keys(section):
            if key not in known:
                raise ini.error(section, key, f"unknown key (known in [{section}]: "
                                              f"{', '.join(known)})")


def _positive(ini: IniFile, section: str, key: str, default: float) -> float:
    value = ini.get_duration(section, key, default)
    if value <= 0:
        raise ini.error(section, key, "must be more than 0 seconds")
    return value


def _at_least(ini: IniFile, section: str, key: str, default: float, minimum: float,
              why: str) -> float:
    value = ini.get_duration(section, key, default)
    if value < minimum:
        raise ini.error(section, key, f"must be at least {minimum:g} seconds: {why}")
    return value


def _domain(ini: IniFile, section: str, prefix: str) -> str:
    name = section[len(prefix):].strip().rstrip(".").lower()
    try:
        check_mx_pattern(name)
        wrong = "a pattern: name a domain" if name.startswith("*.") else ""
    except StsError:
        wrong = "not a domain name"
    if wrong:
        keys = ini.keys(section)
        entry = ini.entry(section, keys[0]) if keys else None
        reason = f"[{section}]: {name!r} is {wrong}"
        raise entry.error(None, reason) if entry else ConfigError(ini.path, 0, None,
                                                                   reason)
    return name


def _apply(ini: IniFile, section: str) -> Apply:
    word = ini.get_str(section, "apply").lower()
    if word not in (Apply.ENFORCE, Apply.IGNORE, Apply.AS_PUBLISHED):
        raise ini.error(section, "apply", "expected enforce (a testing policy is "
                                          "enforced), ignore or as-published")
    return Apply(word)


def _published(ini: IniFile, section: str, domain: str) -> Published:
    mode_text = ini.get_str(section, "mode", "testing").lower()
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise ini.error(section, "mode", "expected testing, enforce or none") from None
    mx = []
    for pattern in ini.get_list(section, "mx"):
        try:
            mx.append(check_mx_pattern(pattern.rstrip(".")))
        except StsError as exc:
            raise ini.error(section, "mx", exc.reason) from None
    max_age = int(ini.get_duration(section, "max_age", 7 * 86400.0))
    if not 0 <= max_age <= MAX_MAX_AGE:
        raise ini.error(section, "max_age", f"must be 0 to {MAX_MAX_AGE} seconds (RFC 8461)")
    rua = tuple(ini.get_list(section, "rua"))
    for uri in rua:
        if not uri.startswith(("mailto:", "https://")):
            raise ini.error(section, "rua", f"{uri!r}: TLSRPT reports go to mailto: or "
                                            f"https:// URIs (RFC 8460 3)")
    return Published(domain, mode, tuple(mx), max_age, rua)


def _listener(config: Config, ini: IniFile) -> Listener | None:
    address = ini.get_str("listen", "address")
    if not address:
        return None
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ini.error("listen", "address", f"expected host:port, got {address!r}")
    host = host.strip("[]")
    paths = []
    for key in ("cert", "key"):
        if not ini.get_str("listen", key):
            raise ini.error("listen", "address", f"the HTTPS listener needs [listen] {key}")
        path = config.resolve(ini.get_str("listen", key))
        if not path.is_file():
            raise ini.error("listen", key, f"{path}: no such file")
        paths.append(path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths[0], paths[1])
    except (OSError, ssl.SSLError) as exc:
        raise ini.error("listen", "cert", f"cannot load the certificate and key: "
                                          f"{exc}") from None
    return Listener(host, int(port_text), paths[0], paths[1])
