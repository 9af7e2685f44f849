"""``config/redis.ini``: where the fleet's Redis is and what the nodes share through it.

Rules:

1. No ``[main] url`` and no ``[sentinel] hosts``: no fleet; nothing else is read, and a
   single node never needs Redis.
2. The URL's scheme says how: ``redis`` (TCP), ``rediss`` (TLS, checked against
   ``[tls] ca_file`` or the system's CAs) or ``unix`` (a socket path). Credentials come
   from ``username`` and ``password`` (or ``password_file``) rather than the URL, so that
   the URL can be logged.
3. A node's name is its key in the shared counts: by default the host's name and a digest
   of the installation's state folder, so that two installations never share one.
"""

from __future__ import annotations

import hashlib
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from harakapy.config import Config, ConfigError

SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """A fleet's Redis, as ``config/redis.ini`` gives it."""

    url: str
    node: str
    prefix: str = "harakapy:"
    username: str | None = None
    password: str | None = None
    timeout: float = 2.0
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_password: str | None = None
    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    share_mta_sts: bool = True
    share_tlsrpt: bool = True
    share_destinations: bool = False
    lease: float = 120.0
    settle: float = 3600.0

    @property
    def where(self) -> str:
        """Redis's address for log lines (no credentials)."""
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {self.service} at {hosts}"
        return self.url

    @classmethod
    def from_config(cls, config: Config) -> FleetSettings | None:
        """``config/redis.ini``; ``None`` when there is no fleet (rule 1).

        :raises ConfigError: naming the file, line and key.
        """
        ini = config.ini("redis.ini")
        ini.check_known(config.shipped_ini("redis.ini"))
        url = ini.get_str("main", "url").strip()
        sentinels = tuple(_host_port(ini, item) for item in ini.get_list("sentinel", "hosts"))
        if not url and not sentinels:
            return None
        service = ini.get_str("sentinel", "service").strip()
        if sentinels and not service:
            raise ini.error("sentinel", "service", "Sentinel needs the service name its "
                                                   "sentinels watch")
        parsed = urllib.parse.urlsplit(url or "redis://")
        if parsed.scheme not in SCHEMES:
            raise ini.error("main", "url", f"{url!r}: expected a redis://, rediss:// or "
                                           "unix:// URL")
        if parsed.password or parsed.username:
            raise ini.error("main", "url", "put the user and password in username and "
                                           "password (or password_file), not in the URL")
        if parsed.scheme == "unix" and not parsed.path:
            raise ini.error("main", "url", f"{url!r}: a unix:// URL names the socket's path")
        if parsed.scheme != "unix" and not sentinels and not parsed.hostname:
            raise ini.error("main", "url", f"{url!r} names no host")
        password = ini.get_str("main", "password") or None
        password_file = ini.get_str("main", "password_file")
        if password_file:
            if password:
                raise ini.error("main", "password_file", "give password or password_file, "
                                                         "not both")
            path = config.resolve(password_file)
            try:
                password = path.read_text().strip() or None
            except OSError as exc:
                raise ini.error("main", "password_file",
                                f"cannot read {path}: {exc.strerror}") from None
        timeout = ini.get_duration("main", "timeout", 2.0)
        lease = ini.get_duration("tlsrpt", "lease", 120.0)
        for key, value in (("timeout", timeout), ("lease", lease)):
            if value <= 0:
                raise ini.error("main" if key == "timeout" else "tlsrpt", key,
                                "must be more than 0 seconds")
        tls = {key: config.resolve(ini.get_str("tls", key)) if ini.get_str("tls", key)
               else None for key in ("ca_file", "cert", "key")}
        if (tls["cert"] is None) != (tls["key"] is None):
            raise ini.error("tls", "cert" if tls["cert"] is None else "key",
                            "a client certificate needs both cert and key")
        for key, path in tls.items():
            if path is not None and not path.is_file():
                raise ini.error("tls", key, f"{path} is not a file")
        return cls(
            url=url or "redis://",
            node=ini.get_str("main", "node").strip() or default_node(config),
            prefix=ini.get_str("main", "prefix", "harakapy:"),
            username=ini.get_str("main", "username") or None,
            password=password,
            timeout=timeout,
            sentinels=sentinels,
            service=service,
            sentinel_password=ini.get_str("sentinel", "password") or None,
            ca_file=tls["ca_file"], cert=tls["cert"], key=tls["key"],
            share_mta_sts=ini.get_bool("mta_sts", "share", True),
            share_tlsrpt=ini.get_bool("tlsrpt", "share", True),
            share_destinations=ini.get_bool("destinations", "share", False),
            lease=lease,
            settle=ini.get_duration("tlsrpt", "settle", 3600.0))


def default_node(config: Config) -> str:
    """Rule 3."""
    digest = hashlib.sha256(str(config.state_dir().resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}/{digest}"


def _host_port(ini, item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ini.error("sentinel", "hosts", f"expected host:port, got {item!r}")
    return host.strip("[]"), int(port)


__all__ = ["ConfigError", "FleetSettings", "default_node"]
