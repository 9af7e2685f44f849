"""The MTA-STS policy cache (harakapy.tls.sts_store): kept across restarts, shared by
processes, and never emptied by a failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harakapy.tls.mta_sts import parse_policy
from harakapy.tls.sts_store import CachedPolicy, SqliteStore

POLICY = b"version: STSv1\nmode: enforce\nmx: mail.good.test\nmax_age: 86400\n"
NOW = 1_800_000_000.0


def fetched(domain: str = "good.test", at: float = NOW) -> CachedPolicy:
    return CachedPolicy(domain).fetched_now(POLICY, parse_policy(POLICY), "id1", at)


def test_a_policy_is_kept_across_a_restart(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    store.put(fetched())
    store.close()
    again = SqliteStore(tmp_path / "sts.sqlite").get("good.test")
    assert again is not None and again.record_id == "id1"
    assert again.expires == NOW + 86400 and again.policy().mx == ("mail.good.test",)
    assert again.valid_at(NOW + 86399) and not again.valid_at(NOW + 86400)


def test_a_failed_fetch_keeps_the_policy_and_backs_off_that_id(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    store.put(fetched().failed_now("id2", "sts-policy-fetch-error: down", NOW + 10, 300))
    entry = store.get("good.test")
    assert entry.body == POLICY and entry.record_id == "id1" and entry.valid_at(NOW + 10)
    assert entry.error.startswith("sts-policy-fetch-error")
    assert not entry.retry_allowed("id2", NOW + 309)
    assert entry.retry_allowed("id2", NOW + 310)
    assert entry.retry_allowed("id3", NOW + 11)  # another id may be tried at once
    renewed = entry.fetched_now(POLICY, parse_policy(POLICY), "id2", NOW + 400)
    assert renewed.error == "" and renewed.expires == NOW + 400 + 86400


def test_a_failure_with_nothing_cached_is_remembered_without_a_policy(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    store.put(CachedPolicy("new.test").failed_now("a", "sts-webpki-invalid: x", NOW, 300))
    entry = store.get("new.test")
    assert entry.policy() is None and not entry.valid_at(NOW)


def test_use_is_noted_and_only_moves_forward(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    store.put(fetched())
    store.touch("good.test", NOW + 5)
    store.touch("good.test", NOW + 1)
    assert store.get("good.test").used == NOW + 5


def test_delete_and_list(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    for domain in ("b.test", "a.test", "c.test"):
        store.put(fetched(domain))
    store.delete("b.test")
    assert [e.domain for e in store.entries()] == ["a.test", "c.test"]
    assert store.get("b.test") is None


def test_a_stored_body_that_no_longer_parses_is_not_applied(tmp_path):
    store = SqliteStore(tmp_path / "sts.sqlite")
    store.put(CachedPolicy("odd.test", body=b"garbage", expires=NOW + 10))
    assert store.get("odd.test").policy() is None


def test_processes_share_one_store(tmp_path):
    # Worker processes write the same file at once: every write lands, none is lost to
    # a lock (the busy timeout waits), and each sees the others'.
    path = tmp_path / "sts.sqlite"
    SqliteStore(path)
    writer = textwrap.dedent(f"""
        import sys
        from harakapy.tls.mta_sts import parse_policy
        from harakapy.tls.sts_store import CachedPolicy, SqliteStore
        store = SqliteStore({str(path)!r})
        body = {POLICY!r}
        for n in range(150):
            store.put(CachedPolicy(f"{{sys.argv[1]}}{{n}}.test").fetched_now(
                body, parse_policy(body), "id", 0.0))
    """)
    processes = [subprocess.Popen([sys.executable, "-c", writer, name])
                 for name in ("one", "two", "three")]
    assert [process.wait(timeout=60) for process in processes] == [0, 0, 0]
    domains = {entry.domain for entry in SqliteStore(path).entries()}
    assert len(domains) == 450 and "two149.test" in domains
