"""tls_pin: pin the certificate (or public key) of a destination's servers.

config/tls_pin.ini has a section per destination (``[example.com]``, ``[.example.com]``
for its subdomains) with the digests to accept; list the next certificate's digest beside
the current one before rotating. Mail a get_mx plugin routed is left to tls_require (a
``fingerprint`` entry for ``[host]:port``).

    [bank.example]
    pins = sha256:1f6a...e2, sha256:9c03...41
    mode = enforce

``mode = report`` delivers whatever the certificate, and reports a mismatch to the
tls_result hook. The check is the fingerprint level's, so tls_require's ``fingerprint``
entries and these behave alike.

Settings: config/tls_pin.ini   Docs: docs/plugins/tls_pin.md
"""

from __future__ import annotations

from harakapy import Config, Level, Pin, Policy, checked_config, hookimpl, lookup_keys

MODES = ("enforce", "report")


def load_pins(config: Config) -> dict[str, Policy]:
    ini = config.ini("tls_pin.ini")
    default_mode = ini.get_str("main", "mode", "enforce").lower()
    if default_mode not in MODES:
        raise ini.error("main", "mode", "expected enforce or report")
    for key in ini.keys("main"):
        if key != "mode":
            raise ini.error("main", key, "unknown key (known in [main]: mode)")
    policies = {}
    for section in ini.sections():
        if section == "main":
            continue
        for key in ini.keys(section):
            if key not in ("pins", "mode"):
                raise ini.error(section, key, f"unknown key (known in [{section}]: pins, "
                                              f"mode)")
        mode = ini.get_str(section, "mode", default_mode).lower()
        if mode not in MODES:
            raise ini.error(section, "mode", "expected enforce or report")
        texts = ini.get_list(section, "pins")
        if not texts:
            raise ini.error(section, "pins" if ini.entry(section, "pins") else "mode",
                            "a destination needs pins = sha256:<hex>[, ...]")
        try:
            pins = tuple(Pin.parse(text) for text in texts)
        except ValueError as exc:
            raise ini.error(section, "pins", str(exc)) from None
        entry = ini.entry(section, "pins")
        where = f"{entry.path.name}:{entry.line}" if entry else "tls_pin.ini"
        policies[section.lower()] = Policy(
            Level.FINGERPRINT, pins=pins, enforce=mode == "enforce",
            reason=f"config/{where}: [{section}] {len(pins)} pin(s), mode {mode}")
    return policies


def _pins(server) -> dict[str, Policy]:
    return server.config.derive("tls_pin.pins", load_pins)


startup, config_reload = checked_config("tls_pin.pins", load_pins)


@hookimpl
def tls_policy(domain, hosts, routed, server):
    if routed:
        return None  # a routed next hop is pinned with a fingerprint entry in tls_policy
    pins = _pins(server)
    for key in lookup_keys(domain):
        if key in pins:
            return pins[key]
    return None
