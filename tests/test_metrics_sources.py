"""The metrics that come from the policy plugins: MTA-STS lookups and fetches, and the
DNSSEC states DANE saw, counted while real mail goes through the sts and DANE worlds
(tests/sts_world.py, tests/dane_world.py). The server runs in this process here, so the
counters are read from prometheus_client's registry, before and after."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from harakapy import metrics
from harakapy.config import Config
from tests.dane_world import MX_IP as DANE_MX
from tests.dane_world import dane_ee_zone, self_signed
from tests.harness import eventually
from tests.sts_world import MX_IP


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def counting(config_dir):
    metrics.enable(Config.load(config_dir({"metrics.ini": "[main]\nenabled = yes\n"})))


async def test_mta_sts_lookups_and_fetches_are_counted(counting, sts_world):
    misses = sample("harakapy_mta_sts_lookups_total", result="miss")
    hits = sample("harakapy_mta_sts_lookups_total", result="hit")
    fetched = sample("harakapy_mta_sts_fetches_total", outcome="ok")
    world = await sts_world()
    world.domain("a.test")
    mx = await world.mx(MX_IP, "mx.a.test")
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    await world.env.send("carol@a.test")
    await eventually(lambda: len(mx.messages) == 2)
    assert sample("harakapy_mta_sts_fetches_total", outcome="ok") - fetched == 1
    assert sample("harakapy_mta_sts_lookups_total", result="miss") - misses == 1
    assert sample("harakapy_mta_sts_lookups_total", result="hit") - hits >= 1


async def test_dnssec_states_seen_by_dane_are_counted(counting, dane_world, tmp_path):
    secure_mx = sample("harakapy_dane_dnssec_states_total", rdtype="MX", state="secure")
    secure_tlsa = sample("harakapy_dane_dnssec_states_total", rdtype="TLSA", state="secure")
    cert = self_signed(tmp_path, "mx.a.test")
    world = await dane_world(dane_ee_zone("a.test", cert))
    mx = await world.mx(DANE_MX, cert)
    await world.env.send("bob@a.test")
    await eventually(lambda: mx.messages)
    assert sample("harakapy_dane_dnssec_states_total", rdtype="MX",
                  state="secure") - secure_mx >= 1
    assert sample("harakapy_dane_dnssec_states_total", rdtype="TLSA",
                  state="secure") - secure_tlsa == 1
