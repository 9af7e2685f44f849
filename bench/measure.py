"""Resource use of a server's process tree: CPU seconds and peak memory, from /proc."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes, their reaped children included."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    """Proportional set size (PSS) of the processes: shared pages counted once across
    them, so Postfix's dozens of processes are not overcounted as plain RSS would."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakRss:
    """Samples the RSS of ``pids()`` every ``interval`` seconds in a thread."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self._pids()))
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._pids()))
