from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trustme

from tests.dane_world import dane_world_factory
from tests.dns_server import DnsServer
from tests.harness import write_config_dir
from tests.outbound_env import EnvFactory, start_tls_env
from tests.sts_world import sts_world_factory


@pytest.fixture
def config_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a config directory as an operator would: ``config_dir(files, plugins)``."""
    counter = 0

    def make(files: dict[str, str] | None = None,
             plugins: dict[str, str] | None = None) -> Path:
        nonlocal counter
        counter += 1
        return write_config_dir(tmp_path / f"hp{counter}", files, plugins)

    return make


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_cert(tls_ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` from the test CA, as key and cert files."""
    issued = tls_ca.issue_cert("localhost", "mx.example.test")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for extra in issued.cert_chain_pems[1:]:
        with cert.open("ab") as handle:
            handle.write(extra.bytes())
    return key, cert


@pytest.fixture
async def outbound_env(config_dir, tmp_path):
    """An outbound test's world: ``env = await outbound_env(zone, files=..., plugins=...)``
    starts a DNS server for the zone and harakapy pointed at it; ``await env.mta(host)`` a
    receiving server (tests/outbound_env.py). Everything stops with the test."""
    async with AsyncExitStack() as stack:
        yield EnvFactory(stack, config_dir, tmp_path)


@pytest.fixture
def tls_env(outbound_env):
    """``env = await tls_env("good.test verify\\n", tls_pin=..., plugins=...)``: the
    outbound world of the TLS policy tests (tests/outbound_env.py, ``start_tls_env``)."""
    return functools.partial(start_tls_env, outbound_env)


# dest.test, whose one MX is 127.0.0.2: the zone of the tests that run harakapy in a
# subprocess and count what a receiver there gets (test_durability.py, test_workers.py).
DEST_ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
dest.test. MX 10 mx.dest.test.
mx.dest.test. A 127.0.0.2
"""


@pytest.fixture
async def dest_dns():
    """A real DNS server on loopback serving :data:`DEST_ZONE`."""
    server = await DnsServer(DEST_ZONE).start()
    yield server
    server.close()


@pytest.fixture
def dane_world(outbound_env, tmp_path):
    """``world = await dane_world(zone_of(port), ...)``: harakapy with the dane plugin in
    a signed world (tests/dane_world.py)."""
    return dane_world_factory(outbound_env, tmp_path)


@pytest.fixture
async def sts_world(outbound_env):
    """``world = await sts_world(mta_sts_ini_extra, plugins=...)``: harakapy with the
    mta_sts plugin and the destinations' side (tests/sts_world.py)."""
    return await sts_world_factory(outbound_env)
