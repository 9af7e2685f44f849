"""Time for schedules: the wall clock, and the way to wait for it.

The queue runner takes a :class:`Clock` so tests can move time forward instead of sleeping
(trio's MockClock idea).
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """The real clock."""

    def time(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
