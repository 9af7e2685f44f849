"""harakapy: a Haraka-style mail server for strict outbound SMTP TLS.

The public API for plugins: ``hookimpl`` and the results a decision hook returns.
"""

from harakapy.config import Config, ConfigError
from harakapy.plugins import checked_config, hookimpl
from harakapy.results import Action, Result, deny, denydisconnect, denysoft, ok

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Config",
    "ConfigError",
    "Result",
    "Server",
    "__version__",
    "checked_config",
    "deny",
    "denydisconnect",
    "denysoft",
    "hookimpl",
    "ok",
]


def __getattr__(name: str) -> object:
    # Server pulls in aiosmtpd; plugins that only need hookimpl should not pay for it.
    if name == "Server":
        from harakapy.server import Server

        return Server
    raise AttributeError(name)
