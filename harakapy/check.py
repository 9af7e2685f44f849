"""``harakapy check``: would this config directory start? Every error, not the first.

The same checks as ``harakapy run`` and a SIGHUP reload (``harakapy.server``): the core's
files one by one (``SETTINGS_CHECKS``), the plugin list, each plugin's ``startup`` on its
own, then the inbound TLS context. Nothing listens, the spool is not opened, no
background task runs and no plugin can queue mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harakapy.clock import Clock
from harakapy.config import Config, ConfigError
from harakapy.fleet import FleetDown, FleetError, fleet_link, fleet_settings
from harakapy.inbound.settings import InboundSettings
from harakapy.plugins import PluginManager
from harakapy.server import SETTINGS_CHECKS, inbound_context
from harakapy.spool.store import SpoolError

log = logging.getLogger("harakapy.check")


@dataclass
class Report:
    """What the check found: ``errors`` as ``file:line: message``, and the plugins."""

    errors: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not stopping a start

    @property
    def ok(self) -> bool:
        return not self.errors


class _NoQueue:
    """The server's side of the plugins' views during a check: no queue to submit to."""

    def __init__(self) -> None:
        self.notes: dict[str, Any] = {}
        self.clock = Clock()

    async def submit(self, *args: object, **kwargs: object) -> Any:
        raise SpoolError("harakapy check queues nothing")

    async def enqueue(self, *args: object, **kwargs: object) -> Any:
        raise SpoolError("harakapy check queues nothing")


async def check_directory(root: Path | None) -> Report:
    report = Report()
    try:
        config = Config.load(root)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    for check in SETTINGS_CHECKS:
        try:
            check(config)
        except ConfigError as exc:
            report.errors.append(str(exc))
    try:
        settings: InboundSettings | None = InboundSettings.from_config(config)
    except ConfigError:
        settings = None  # said above; the plugins are still checked
    try:
        plugins = PluginManager.load(
            config, timeout=settings.plugin_timeout if settings else 30.0)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    report.plugins = [plugin.name for plugin in plugins.plugins]
    plugins.bind(config.value("me") or "localhost", _NoQueue())
    failures = await plugins.call_each("startup")
    for plugin, exc in failures:
        if isinstance(exc, ConfigError):
            report.errors.append(str(exc))
        else:
            log.debug("startup of %s failed", plugin, exc_info=exc)
            report.errors.append(str(plugins.error(
                plugin, f"startup failed: {type(exc).__name__}: {exc}")))
    if not failures and settings is not None:
        try:
            await inbound_context(plugins, settings, config)
        except ConfigError as exc:
            report.errors.append(str(exc))
    note = await fleet_note(config)
    if note:
        report.notes.append(note)
    return report


async def fleet_note(config: Config) -> str:
    """Whether the fleet's Redis answers, when ``config/redis.ini`` names one: a node
    runs without it (on its own copies), so this is a note, not an error."""
    try:
        settings = fleet_settings(config)
    except ConfigError:
        return ""  # reported with the other files
    if settings is None:
        return ""
    link = fleet_link(config)
    assert link is not None
    try:
        await link.run(lambda client: client.ping())
    except FleetDown as exc:
        return (f"fleet: Redis ({settings.where}) cannot be reached: {exc.reason}; this "
                f"node would run on its own copies until it can")
    except FleetError as exc:
        return f"fleet: Redis ({settings.where}): {exc}"
    finally:
        await link.close()
    return f"fleet: Redis ({settings.where}) answers; this node is {settings.node!r}"
