"""What a fleet's Redis being unusable looks like to its callers (harakapy.fleet.link
raises them); apart, so that the callers need not import the Redis client, which a
single node never loads."""

from __future__ import annotations


class FleetDown(Exception):
    """Redis cannot be reached now; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FleetError(FleetDown):
    """Redis refused a command: as unusable as an outage, with Redis's words."""
