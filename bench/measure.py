"""Resource use of a server's process tree: CPU seconds and memory (PSS), from /proc."""

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


def pss_by_pid(pids: list[int]) -> dict[int, int]:
    """Proportional set size (PSS) of each process, in bytes: shared pages divided among
    the processes that share them, so Postfix's dozens of processes (or a server's
    forked workers) are not overcounted as plain RSS would."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        found[pid] = int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def rss_bytes(pids: list[int]) -> int:
    """PSS of the processes together (see :func:`pss_by_pid`)."""
    return sum(pss_by_pid(pids).values())


class PeakRss:
    """Samples the PSS of ``pids()`` every ``interval`` seconds in a thread.

    ``peak``: the largest total of the tree; ``processes``: how many there were at that
    sample; ``largest``: the largest single process seen (a server's worker, as opposed to
    the small helpers around it).
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self.peak = 0
        self.processes = 0
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample now (also done by the thread, and on exit)."""
        found = pss_by_pid(self._pids())
        if sum(found.values()) > self.peak:
            self.peak, self.processes = sum(found.values()), len(found)
        self.largest = max(self.largest, *found.values(), 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def metrics(self) -> dict[str, float]:
        """The three figures in MB, as the tables show them."""
        return {"peak_pss_mb": round(self.peak / 2**20, 1), "processes": self.processes,
                "largest_process_pss_mb": round(self.largest / 2**20, 1)}
