"""The TLS report data (harakapy.tls.tlsrpt_store): counts added by several processes at
once are all there, read back per policy and detail, and old days are removed."""

from __future__ import annotations

import datetime
import multiprocessing
from pathlib import Path

from harakapy.tls.tlsrpt_report import DetailKey, PolicyKey, SessionKey
from harakapy.tls.tlsrpt_store import DeliveryLog, SessionStore

DAY = datetime.date(2026, 12, 2)
STS = PolicyKey("sts", "example.com", ("version: STSv1", "mode: enforce"), ("mx.example.com",))
NONE = PolicyKey("no-policy-found", "other.example")
EXPIRED = DetailKey("certificate-expired", "192.0.2.10", "mx.example.com", "",
                    "192.0.2.7", "X509_V_ERR_CERT_HAS_EXPIRED")


def _writer(path: str, batches: int) -> None:
    store = SessionStore(Path(path))
    for _ in range(batches):
        store.add({SessionKey(DAY, "example.com", STS, None): 2,
                   SessionKey(DAY, "example.com", STS, EXPIRED): 1})
    store.close()


def test_counts_are_read_back_per_policy_and_detail(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite")
    store.add({SessionKey(DAY, "example.com", STS, None): 3,
               SessionKey(DAY, "example.com", STS, EXPIRED): 2,
               SessionKey(DAY, "other.example", NONE, None): 1})
    store.add({SessionKey(DAY, "example.com", STS, None): 1})
    assert store.domains(DAY) == ["example.com", "other.example"]
    counts = store.counts(DAY, "example.com")
    assert list(counts) == [STS]
    assert (counts[STS].success, counts[STS].failure) == (4, 2)
    assert counts[STS].details == {EXPIRED: 2}
    assert store.counts(DAY, "nobody.example") == {}


def test_several_processes_adding_at_once_lose_nothing(tmp_path):
    path = tmp_path / "sessions.sqlite"
    SessionStore(path).close()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(path), 200)) for _ in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    counts = SessionStore(path).counts(DAY, "example.com")[STS]
    assert (counts.success, counts.failure) == (3 * 200 * 2, 3 * 200)


def test_old_days_are_forgotten(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite")
    earlier = DAY - datetime.timedelta(days=3)
    store.add({SessionKey(earlier, "example.com", STS, None): 1,
               SessionKey(DAY, "example.com", STS, None): 1})
    assert store.forget(DAY) == 1
    assert store.days() == [DAY]


def test_the_delivery_log_of_old_days_is_forgotten(tmp_path):
    log = DeliveryLog(tmp_path / "sessions.sqlite")
    log.begin("2026-11-28T00:00:00Z_a.test@us.test", ["mailto:r@a.test"], 0.0)
    log.begin("2026-12-02T00:00:00Z_a.test@us.test", ["mailto:r@a.test"], 0.0)
    assert log.forget(datetime.date(2026, 12, 1)) == 1
    assert log.states("2026-12-02T00:00:00Z_a.test@us.test")
    assert not log.states("2026-11-28T00:00:00Z_a.test@us.test")
