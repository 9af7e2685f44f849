"""Outbound TLS settings: ``config/tls.ini`` ``[outbound]`` (each key documented there)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from harakapy.config import Config
from harakapy.tls.context import parse_tls_version
from harakapy.tls.policy import Level, cipher_list


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """:param default_level: The level when no plugin answers ``tls_policy``.
    :param min_version: Lowest protocol at the levels that require TLS.
    :param ciphers: OpenSSL cipher list at the levels that require TLS ("" = default).
    :param ca_file: The CAs that ``verify``/``secure`` trust; ``None`` for the system's.
    """

    default_level: Level
    min_version: ssl.TLSVersion
    ciphers: str
    ca_file: Path | None

    @classmethod
    def from_config(cls, config: Config) -> TlsSettings:
        ini = config.ini("tls.ini")
        ini.check_known(config.shipped_ini("tls.ini"))
        level = ini.get_str("outbound", "default_level", "may")
        try:
            default_level = Level(level.lower())
        except ValueError:
            raise ini.error("outbound", "default_level",
                            f"unknown level {level!r} (known: "
                            f"{', '.join(v.value for v in Level)})") from None
        if default_level in (Level.FINGERPRINT, Level.DANE, Level.DANE_ONLY):
            raise ini.error("outbound", "default_level",
                            f"{level} needs per-destination data (pins, TLSA records): set "
                            f"it per domain with a plugin (tls_require, tls_pin, dane)")
        try:
            min_version = parse_tls_version(ini.get_str("outbound", "min_version", "TLSv1.2"))
        except ValueError as exc:
            raise ini.error("outbound", "min_version", str(exc)) from None
        ciphers = ini.get_str("outbound", "ciphers")
        if ciphers:
            try:
                ciphers = cipher_list(ciphers)
            except ValueError as exc:
                raise ini.error("outbound", "ciphers", str(exc)) from None
        ca_file = None
        if ini.get_str("outbound", "ca_file"):
            ca_file = config.resolve(ini.get_str("outbound", "ca_file"))
            try:
                ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ini.error("outbound", "ca_file",
                                f"cannot load CA certificates from {ca_file}: {exc}") from None
        return cls(default_level, min_version, ciphers, ca_file)
