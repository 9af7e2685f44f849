"""``config/status.ini``: the status page's listener and who may read it.

Rules:

1. Off by default; on, it listens on loopback unless told otherwise.
2. A listener on any address but loopback needs a way in: a bearer token
   (``token_file``) or a user with an Argon2id password hash (``harakapy passwd``
   makes one), or both. Without one the config is refused, naming ``[main] listen``.
3. ``cert`` and ``key`` make it HTTPS; without them it is HTTP, which suits loopback
   (an SSH tunnel, a reverse proxy on the same host).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from harakapy.config import Config

DEFAULT_LISTEN = "127.0.0.1:9126"


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """``config/status.ini``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9126
    token: str = ""
    user: str = ""
    password_hash: str = ""
    cert: Path | None = None
    key: Path | None = None
    retention_days: int = 8

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def guarded(self) -> bool:
        return bool(self.token or self.user)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.cert else 'http'}://{host}:{self.port}/"

    @classmethod
    def from_config(cls, config: Config) -> StatusSettings:
        ini = config.ini("status.ini")
        ini.check_known(config.shipped_ini("status.ini"))
        enabled = ini.get_bool("main", "enabled", False)
        host, port = ini.get_address("main", "listen", DEFAULT_LISTEN)
        token = ""
        token_file = ini.get_str("auth", "token_file")
        if token_file:
            path = config.resolve(token_file)
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ini.error("auth", "token_file",
                                f"cannot read {path}: {exc.strerror}") from None
            if len(token) < 16:
                raise ini.error("auth", "token_file", f"the token in {path} is shorter "
                                                      "than 16 characters")
        user = ini.get_str("auth", "user")
        password_hash = ini.get_str("auth", "password_hash")
        if bool(user) != bool(password_hash):
            raise ini.error("auth", "password_hash" if user else "user",
                            "a user needs a password_hash, and a password_hash a user")
        from harakapy.passwords import is_password_hash

        if password_hash and not is_password_hash(password_hash):
            raise ini.error("auth", "password_hash", "not an Argon2id hash (make one with "
                                                     "harakapy passwd)")
        paths = {key: config.resolve(ini.get_str("main", key)) if ini.get_str("main", key)
                 else None for key in ("cert", "key")}
        if (paths["cert"] is None) != (paths["key"] is None):
            raise ini.error("main", "cert" if paths["cert"] is None else "key",
                            "HTTPS needs both cert and key")
        if paths["cert"] is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    paths["cert"], paths["key"])
            except (OSError, ssl.SSLError) as exc:
                raise ini.error("main", "cert", f"cannot load the certificate and key: "
                                                f"{exc}") from None
        settings = cls(enabled=enabled, host=host, port=port, token=token, user=user,
                       password_hash=password_hash, cert=paths["cert"], key=paths["key"],
                       retention_days=ini.get_int("main", "retention_days", 8, minimum=1))
        if enabled and not settings.loopback and not settings.guarded:
            raise ini.error("main", "listen", f"{host} is not a loopback address: the page "
                                              "needs [auth] token_file or user and "
                                              "password_hash")
        return settings


def status_settings(config: Config) -> StatusSettings:
    """``config/status.ini``, checked."""
    return config.derive("status.settings", StatusSettings.from_config)
