"""tls: offer STARTTLS (and serve implicit-TLS listeners) with the key and certificate in
config/tls.ini.

Without a key and certificate it makes a self-signed one for config/me, so opportunistic
TLS works on a fresh install; clients that verify need a real certificate.

Settings: config/tls.ini [main]   Docs: docs/plugins/tls.md
"""

from __future__ import annotations

import logging
import ssl

from harakapy import (
    Config,
    ConfigError,
    hookimpl,
    parse_tls_version,
    self_signed_context,
    server_context,
)

log = logging.getLogger("harakapy.plugin.tls")


def _context(config: Config, me: str) -> ssl.SSLContext:
    ini = config.ini("tls.ini")
    try:
        min_version = parse_tls_version(ini.get_str("main", "min_version", "TLSv1.2"))
    except ValueError as exc:
        raise ini.error("main", "min_version", str(exc)) from None
    if min_version < ssl.TLSVersion.TLSv1_2:
        raise ini.error("main", "min_version", "TLSv1.2 is the lowest we offer (RFC 8996)")
    ciphers = ini.get_str("main", "ciphers") or None
    if ciphers:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            raise ini.error("main", "ciphers", f"OpenSSL selects no cipher from {ciphers!r}"
                            ) from None
    key, cert = ini.get_str("main", "key"), ini.get_str("main", "cert")
    if not key and not cert:
        log.warning("no key/cert in config/tls.ini: offering STARTTLS with a self-signed "
                    "certificate for %s", me)
        return self_signed_context(me, min_version=min_version, ciphers=ciphers)
    if not key or not cert:
        given = "key" if key else "cert"  # point at the line the operator wrote
        raise ini.error("main", given, "key and cert go together; set both or neither")
    for name, value in (("cert", cert), ("key", key)):
        if not config.resolve(value).is_file():
            raise ini.error("main", name, f"no such file: {config.resolve(value)}")
    try:
        return server_context(config.resolve(cert), config.resolve(key),
                              min_version=min_version, ciphers=ciphers)
    except (OSError, ssl.SSLError) as exc:
        raise ini.error("main", "cert", f"cannot load key and certificate "
                                        f"(do they match?): {exc}") from None


def _load(server) -> ssl.SSLContext:
    # Reading key files is blocking I/O, but it happens once per config (startup and
    # SIGHUP), cached on the config object, never per connection.
    return server.config.derive("tls.context", lambda config: _context(config, server.me))


@hookimpl
def startup(server) -> None:
    _load(server)


@hookimpl
def config_reload(server) -> None:
    _load(server)


@hookimpl
def inbound_tls(server) -> ssl.SSLContext:
    return _load(server)


__all__ = ["ConfigError"]
