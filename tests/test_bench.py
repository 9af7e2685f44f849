"""The benchmark suite's smoke run: a few hundred messages through harakapy, so bench/ can
not rot. Its numbers are not judged here (speed is measured in bench/, not asserted)."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.timeout(300)
def test_quick_benchmark_writes_a_table(tmp_path, monkeypatch):
    from bench import run

    monkeypatch.setattr(sys, "argv", ["bench.run"])
    path = run.main(["--quick", "--peers", "harakapy", "--out", str(tmp_path)])
    table = path.read_text()
    assert "| inbound c=50 5KB | msgs_per_s |" in table
    assert "| relay 500 msgs STARTTLS | delivered_per_s |" in table
    assert "| relay 500 msgs STARTTLS verify | delivered_per_s |" in table
    for line in table.splitlines():
        if line.startswith("| relay") and "delivered |" in line:
            assert line.split("|")[3].strip() == "500"  # every message reached the sink
