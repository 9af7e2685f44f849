"""The benchmark suite's smoke run: a few hundred messages through harakapy, so bench/ can
not rot. Its numbers are not judged here (speed is measured in bench/, not asserted).

The smoke run uses the development install (``--harakapy dev``): the fresh venv that
``pip install .`` makes for the real runs is built once per source tree, which would cost
the suite a build at every edit. Its cache key is tested on its own below.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_quick_benchmark_writes_a_table(tmp_path, monkeypatch):
    from bench import run

    monkeypatch.setattr(sys, "argv", ["bench.run"])
    path = run.main(["--quick", "--peers", "harakapy", "--harakapy", "dev",
                     "--scenarios", "inbound+deliver,inbound,relay,queued",
                     "--out", str(tmp_path)])
    table = path.read_text()
    assert "| inbound+deliver c=50 5KB | delivered_per_s |" in table
    assert "| inbound accept-only c=50 5KB | msgs_per_s |" in table
    assert "| relay 200 msgs STARTTLS | delivered_per_s |" in table
    assert "| relay 200 msgs STARTTLS verify | delivered_per_s |" in table
    assert "| relay 200 msgs, 1000 queued | delivered_per_s |" in table
    assert "failed" not in table
    for line in table.splitlines():
        if line.startswith("| relay") and "| delivered |" in line:
            assert line.split("|")[3].strip() == "200"  # every message reached the sink
        if line.startswith("| inbound+deliver") and "| undelivered |" in line:
            assert line.split("|")[3].strip() == "0"


def test_turns_rotate_so_no_server_always_runs_first():
    from bench.run import turns

    assert [turns(["a", "b", "c"], n) for n in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_repeat_takes_turns_per_case_and_reports_medians(tmp_path, monkeypatch):
    from bench import peers, run

    calls: list[tuple[str, str]] = []

    class Fake:
        verifies = False

        def __init__(self, name: str) -> None:
            self.name = name

        def install(self) -> None:
            pass

        def describe(self) -> str:
            return self.name

    def measure(label: str):
        def one(peer, workdir):
            calls.append((label, peer.name))
            return {"rate": float(sum(1 for _, name in calls if name == peer.name))}
        return one

    monkeypatch.setattr(peers, "PEERS", {"harakapy": Fake, "other": lambda: Fake("other")})
    monkeypatch.setattr(run, "cases", lambda scenarios, verifiers, quick: [
        run.Case("one", measure("one")), run.Case("two", measure("two"))])
    monkeypatch.setattr(peers, "HarakapyPeer", lambda source: Fake("harakapy"))
    table = run.main(["--peers", "harakapy,other", "--repeat", "3", "--out",
                      str(tmp_path)]).read_text()
    assert calls == [("one", "harakapy"), ("one", "other"), ("one", "other"),
                     ("one", "harakapy"), ("one", "harakapy"), ("one", "other"),
                     ("two", "harakapy"), ("two", "other"), ("two", "other"),
                     ("two", "harakapy"), ("two", "harakapy"), ("two", "other")]
    assert "| one | rate | 2.0 | 2.0 | 1.00 |" in table  # medians of 1, 2, 3
    assert "| two | rate | 5.0 | 5.0 | 1.00 |" in table  # of 4, 5, 6


def test_set_ini_keeps_the_shipped_file_but_for_the_keys_set(tmp_path):
    from bench.peers import _set_ini

    ini = tmp_path / "smtp.ini"
    ini.write_text("; comment\n[main]\n; listen = old\nlisten = 127.0.0.1:2525\n"
                   "workers = 0\n\n; about tls\n[tls]\nkey =\n")
    _set_ini(ini, "main", {"listen": "127.0.0.1:9", "timeout": "5"})
    _set_ini(ini, "other", {"a": "1"})
    assert ini.read_text() == (
        "; comment\n[main]\n; listen = old\nlisten = 127.0.0.1:9\nworkers = 0\n"
        "timeout = 5\n\n; about tls\n[tls]\nkey =\n\n[other]\na = 1\n")
    haraka = tmp_path / "haraka.ini"
    haraka.write_text(";nodes=cpus\n;listen=[::0]:25\n")
    _set_ini(haraka, None, {"listen": "127.0.0.1:9"})
    assert haraka.read_text() == ";nodes=cpus\n;listen=[::0]:25\nlisten = 127.0.0.1:9\n"


def test_harakapy_venv_key_follows_the_installed_files(tmp_path):
    from bench.peers import source_key

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "harakapy").mkdir()
    (tmp_path / "harakapy" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = source_key(tmp_path)
    (tmp_path / "tests" / "test_x.py").write_text("")  # not installed: same key
    assert source_key(tmp_path) == clean
    (tmp_path / "harakapy" / "__init__.py").write_text("x = 2\n")
    assert source_key(tmp_path) != clean
    (tmp_path / "harakapy" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "harakapy" / "new.py").write_text("")  # untracked, but installed
    assert source_key(tmp_path) != clean
