"""The resolver against a real DNS server on loopback."""

from __future__ import annotations

import pytest

from harakapy.dns import DnsError, NoSuchDomain, Resolver
from tests.dns_server import DnsServer

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
example.test. MX 10 mx1.example.test.
example.test. MX 20 mx2.example.test.
mx1.example.test. A 127.0.0.2
mx2.example.test. A 127.0.0.3
mx2.example.test. AAAA ::1
alias.test. CNAME mx1.example.test.
implicit.test. A 127.0.0.4
nullmx.test. MX 0 .
"""


@pytest.fixture
async def resolver():
    server = await DnsServer(ZONE).start()
    yield Resolver(["127.0.0.1"], port=server.port, timeout=2), server
    server.close()


async def test_mx_records(resolver):
    resolve, _ = resolver
    assert sorted(await resolve.mx("example.test")) == [(10, "mx1.example.test"),
                                                        (20, "mx2.example.test")]


async def test_nodata_nxdomain_null_mx(resolver):
    resolve, _ = resolver
    assert await resolve.mx("implicit.test") == []
    assert await resolve.mx("nullmx.test") == [(0, "")]
    with pytest.raises(NoSuchDomain):
        await resolve.mx("nowhere.test")


async def test_addresses_follow_cnames(resolver):
    resolve, _ = resolver
    assert await resolve.addresses("alias.test") == ["127.0.0.2"]
    assert await resolve.addresses("mx2.example.test") == ["127.0.0.3", "::1"]
    assert await resolve.addresses("mx2.example.test", ipv6=False) == ["127.0.0.3"]


async def test_servfail_is_temporary(resolver):
    resolve, server = resolver
    server.servfail.add("example.test")
    with pytest.raises(DnsError) as error:
        await resolve.mx("example.test")
    assert not isinstance(error.value, NoSuchDomain)
