"""The spool's own rules, on a real directory: group commit of directory fsyncs."""

from __future__ import annotations

import threading
import time

from harakapy.spool import store
from harakapy.spool.store import GroupSync


def test_group_sync_covers_every_writer_with_a_later_fsync(tmp_path, monkeypatch):
    real = store._fsync_dir
    syncs: list[tuple[float, float]] = []

    def slow_fsync(path):
        started = time.monotonic()
        real(path)
        time.sleep(0.01)  # a slow disk, so that writers overlap
        syncs.append((started, time.monotonic()))

    monkeypatch.setattr(store, "_fsync_dir", slow_fsync)
    group = GroupSync(tmp_path)
    calls: list[tuple[float, float]] = []
    barrier = threading.Barrier(40)

    def writer():
        barrier.wait()
        called = time.monotonic()
        group.sync()
        calls.append((called, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 40
    assert len(syncs) < 10  # batched: one fsync served many writers
    for called, returned in calls:
        assert any(called <= started and ended <= returned for started, ended in syncs)
