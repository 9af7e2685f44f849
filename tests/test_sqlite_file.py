"""The SQLite file the stores share (harakapy/tls/sqlite_file.py), opened while another
connection is writing to it before it is in WAL mode, as happens when workers start
together on a new file: SQLite answers that switch "database is locked" at once, without
its busy timeout, and the file waits and tries again instead of failing the start."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from harakapy.tls.outcomes import OutcomeStore
from harakapy.tls.sqlite_file import SqliteFile


def test_opening_waits_for_a_writer_of_a_file_not_yet_in_wal_mode(tmp_path):
    path = tmp_path / "new.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE earlier (x)")  # a rollback-journal file, as new files are
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO earlier VALUES (1)")
    done = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    done.start()
    try:
        store = OutcomeStore(path)  # before the fix: OperationalError at once
        store.close()
    finally:
        done.join()
        other.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_writer_that_keeps_the_lock_past_the_timeout_is_an_error(tmp_path):
    path = tmp_path / "held.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE earlier (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO earlier VALUES (1)")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            SqliteFile(path, busy_timeout=0.2, schema="CREATE TABLE t (x)")
    finally:
        other.close()
