"""The inbound server's settings, read once per config from ``config/smtp.ini``.

Building them checks every value, so a bad one stops ``harakapy run`` (or a SIGHUP reload)
with ``file:line: [main] key: why`` before anything listens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from harakapy.config import Config, ConfigError, IniFile
from harakapy.privileges import Identity, identity

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    implicit_tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(ini: IniFile, key: str, *, implicit_tls: bool) -> list[ListenAddress]:
    """``host:port`` items, IPv6 hosts in brackets: ``127.0.0.1:2525,[::1]:2525``."""
    addresses = []
    for item in ini.get_list("main", key):
        match = _ADDRESS.match(item)
        if match is None:
            raise ini.error("main", key, f"{item!r} is not host:port ([v6]:port for IPv6)")
        port = int(match.group("port"))
        if not 0 <= port <= 65535:
            raise ini.error("main", key, f"port {port} out of range")
        host = match.group("v6") or match.group("host") or "0.0.0.0"
        addresses.append(ListenAddress(host, port, implicit_tls))
    return addresses


@dataclass(frozen=True, slots=True)
class InboundSettings:
    """``config/smtp.ini [main]``; the shipped file documents each key."""

    listen: tuple[ListenAddress, ...]
    max_connections: int
    timeout: float
    data_timeout: float
    max_message_bytes: int
    max_recipients: int
    max_hops: int
    max_auth_failures: int
    smtputf8: bool
    plugin_timeout: float
    shutdown_grace: float
    workers: int
    postmaster: str = ""
    allow_untrusted_routing: bool = False
    user: str = ""
    group: str = ""

    def identity(self) -> Identity | None:
        """``[main] user`` and ``group`` as uid and gid; ``None`` when no user is set."""
        return identity(self.user, self.group) if self.user else None

    @classmethod
    def from_config(cls, config: Config) -> InboundSettings:
        ini = config.ini("smtp.ini")
        ini.check_known(config.shipped_ini("smtp.ini"))
        listen = (parse_listen(ini, "listen", implicit_tls=False)
                  + parse_listen(ini, "listen_tls", implicit_tls=True))
        if not listen:
            raise ini.error("main", "listen", "no address to listen on")
        return cls(
            listen=tuple(listen),
            max_connections=ini.get_int("main", "max_connections", 1000, minimum=1),
            timeout=ini.get_float("main", "timeout", 300.0, minimum=0.01),
            data_timeout=ini.get_float("main", "data_timeout", 600.0, minimum=0.01),
            max_message_bytes=ini.get_int("main", "max_message_bytes", 26214400, minimum=1024),
            max_recipients=ini.get_int("main", "max_recipients", 1000, minimum=1),
            max_hops=ini.get_int("main", "max_hops", 100, minimum=1),
            max_auth_failures=ini.get_int("main", "max_auth_failures", 3, minimum=1),
            smtputf8=ini.get_bool("main", "smtputf8", True),
            plugin_timeout=ini.get_float("main", "plugin_timeout", 30.0, minimum=0.01),
            shutdown_grace=ini.get_float("main", "shutdown_grace", 30.0, minimum=0.0),
            workers=ini.get_int("main", "workers", 0, minimum=0) or _cores(),
            postmaster=_postmaster(ini),
            allow_untrusted_routing=ini.get_bool("main", "allow_untrusted_routing", False),
            **_user_and_group(ini),
        )


def _user_and_group(ini: IniFile) -> dict[str, str]:
    user = ini.get_str("main", "user").strip()
    group = ini.get_str("main", "group").strip()
    if group and not user:
        raise ini.error("main", "group", "a group needs a user ([main] user)")
    if user:
        try:
            identity(user, group)
        except KeyError as exc:
            raise ini.error("main", "group" if "group" in str(exc) else "user",
                            exc.args[0]) from None
    return {"user": user, "group": group}


def _postmaster(ini: IniFile) -> str:
    """``[main] postmaster``: where ``RCPT TO:<postmaster>`` goes; empty for
    ``postmaster@`` this host's name (``config/me``)."""
    from harakapy.inbound.address import AddressError, parse_path

    value = ini.get_str("main", "postmaster").strip()
    if not value:
        return ""
    try:
        address, rest = parse_path(f"<{value.strip('<>')}>", allow_null=False, smtputf8=True)
    except AddressError as exc:
        raise ini.error("main", "postmaster", f"{value!r}: {exc}") from None
    if rest:
        raise ini.error("main", "postmaster", f"{value!r} is not one address")
    return address.address


def _cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_me(config: Config) -> str | None:
    """``config/me``: this host's name, or ``None`` to use the system's FQDN."""
    me = config.value("me")
    if me is not None and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$", me):
        entry = config.list("me").entries[0]
        raise ConfigError(entry.path, entry.line, None, f"{me!r} is not a host name")
    return me
