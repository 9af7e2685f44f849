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
_mta-sts.example.test. TXT "v=STSv1; " "id=20261203"
_mta-sts.example.test. TXT "v=spf1 -all"
_mta-sts.delegated.test. CNAME _mta-sts.example.test.
_mta-sts.binary.test. TXT "v=STSv1; id=\255\000"
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


async def test_txt_records_join_their_strings_and_follow_cnames(resolver):
    resolve, _ = resolver
    assert sorted(await resolve.txt("_mta-sts.example.test")) == ["v=STSv1; id=20261203",
                                                                  "v=spf1 -all"]
    assert sorted(await resolve.txt("_mta-sts.delegated.test")) == sorted(
        await resolve.txt("_mta-sts.example.test"))
    assert await resolve.txt("_mta-sts.implicit.test") == []  # no such name
    assert await resolve.txt("example.test") == []  # the name exists, no TXT


async def test_txt_bytes_that_are_not_utf8_do_not_raise(resolver):
    resolve, _ = resolver
    [text] = await resolve.txt("_mta-sts.binary.test")
    assert text.startswith("v=STSv1; id=") and "\x00" in text


async def test_txt_servfail_is_temporary(resolver):
    resolve, server = resolver
    server.servfail.add("_mta-sts.example.test")
    with pytest.raises(DnsError):
        await resolve.txt("_mta-sts.example.test")
