"""The fleet: several nodes sharing MTA-STS policies and TLS reports through Redis
(``config/redis.ini``, docs/fleet.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harakapy.config import Config
from harakapy.fleet.errors import FleetDown, FleetError
from harakapy.fleet.settings import FleetSettings

if TYPE_CHECKING:
    from harakapy.fleet.link import RedisLink


def fleet_settings(config: Config) -> FleetSettings | None:
    """``config/redis.ini``, checked; ``None`` without a fleet."""
    return config.derive("fleet.settings", FleetSettings.from_config)


def fleet_link(config: Config) -> RedisLink | None:
    """The process's link to the fleet's Redis for this config; ``None`` without one
    (and then the Redis client is never imported)."""
    settings = fleet_settings(config)
    if settings is None:
        return None
    from harakapy.fleet.link import RedisLink

    return config.derive("fleet.link", lambda _: RedisLink(settings))


async def close_fleet_link(config: Config) -> None:
    """Close the link ``config`` made, if it made one (a stop, or a reload's old config:
    a service of that config still running reconnects on its next call)."""
    link = config.derived("fleet.link")
    if link is not None:
        await link.close()  # type: ignore[attr-defined]


__all__ = [
    "FleetDown",
    "FleetError",
    "FleetSettings",
    "RedisLink",
    "close_fleet_link",
    "fleet_link",
    "fleet_settings",
]
