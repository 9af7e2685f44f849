"""Fetching MTA-STS policies (harakapy.tls.sts_fetch) from a real HTTPS server on
loopback, with certificates from a test CA and names from a real DNS server."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from harakapy.dns import Resolver
from harakapy.tls.mta_sts import MAX_POLICY_BYTES
from harakapy.tls.results import ResultType
from harakapy.tls.sts_fetch import FetchError, fetch_policy, policy_host_context
from tests.dns_server import DnsServer
from tests.policy_host import PolicyHost, plain, server_context

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
mta-sts.good.test. A 127.0.0.31
mta-sts.elsewhere.test. A 127.0.0.32
mta-sts.down.test. A 127.0.0.33
mta-sts.flaky.test. A 127.0.0.31
noaddress.test. A 127.0.0.31
"""

POLICY = (b"version: STSv1\nmode: enforce\nmx: mail.good.test\nmx: *.good.test\n"
          b"max_age: 604800\n")


@pytest.fixture
async def dns():
    server = await DnsServer(ZONE).start()
    server.servfail.add("mta-sts.flaky.test")
    yield server
    server.close()


@pytest.fixture
def ca_file(tls_ca, tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


async def fetch(dns: DnsServer, ca_file: Path, domain: str, port: int, **options):
    resolver = Resolver(["127.0.0.1"], port=dns.port, timeout=2)
    return await fetch_policy(domain, resolver=resolver, context=policy_host_context(ca_file),
                              port=port, **options)


async def test_a_valid_policy_is_fetched_from_the_well_known_path(dns, tls_ca, ca_file):
    context = server_context(tls_ca, "mta-sts.good.test")
    async with PolicyHost("127.0.0.31", context, plain(POLICY)) as host:
        fetched = await fetch(dns, ca_file, "good.test", host.port)
    assert fetched.policy.mx == ("mail.good.test", "*.good.test")
    assert host.requests == ["/.well-known/mta-sts.txt"]
    assert fetched.url.endswith(f"mta-sts.good.test:{host.port}/.well-known/mta-sts.txt")


@pytest.mark.parametrize("content_type", ["TEXT/PLAIN; charset=UTF-8", "text/plain",
                                          "text/plain; charset=us-ascii"])
async def test_text_plain_in_any_case_is_a_policy(dns, tls_ca, ca_file, content_type):
    context = server_context(tls_ca, "mta-sts.good.test")
    async with PolicyHost("127.0.0.31", context, plain(POLICY, content_type)) as host:
        assert (await fetch(dns, ca_file, "good.test", host.port)).policy.max_age == 604800


async def expect(result_type: ResultType, coroutine) -> FetchError:
    with pytest.raises(FetchError) as failed:
        await coroutine
    assert failed.value.result_type is result_type, failed.value
    return failed.value


async def test_a_redirect_is_not_followed(dns, tls_ca, ca_file):
    target_context = server_context(tls_ca, "mta-sts.elsewhere.test")
    async with PolicyHost("127.0.0.32", target_context, plain(POLICY)) as target:
        async def redirect(request):
            raise web.HTTPMovedPermanently(
                f"https://mta-sts.elsewhere.test:{target.port}/.well-known/mta-sts.txt")

        context = server_context(tls_ca, "mta-sts.good.test")
        async with PolicyHost("127.0.0.31", context, redirect) as host:
            error = await expect(ResultType.STS_POLICY_FETCH_ERROR,
                                 fetch(dns, ca_file, "good.test", host.port))
    assert "301" in error.reason and "not followed" in error.reason
    assert target.requests == []


@pytest.mark.parametrize("status", [404, 500, 204])
async def test_only_200_is_a_policy(dns, tls_ca, ca_file, status):
    async def answer(request):
        return web.Response(status=status, body=POLICY if status != 204 else None,
                            content_type="text/plain")

    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          answer) as host:
        error = await expect(ResultType.STS_POLICY_FETCH_ERROR,
                             fetch(dns, ca_file, "good.test", host.port))
    assert str(status) in error.reason


@pytest.mark.parametrize("content_type", ["text/html", "application/json",
                                          "text/plain; charset=iso-8859-1"])
async def test_another_media_type_is_an_invalid_policy(dns, tls_ca, ca_file, content_type):
    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          plain(POLICY, content_type)) as host:
        await expect(ResultType.STS_POLICY_INVALID, fetch(dns, ca_file, "good.test", host.port))


async def test_a_body_over_64_kib_is_cut_off_as_it_streams(dns, tls_ca, ca_file):
    sent = []

    async def endless(request):
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()  # no Content-Length to trust
        await response.prepare(request)
        await response.write(POLICY)
        for _ in range(1000):  # 16 MB, unless the client stops reading
            await response.write(b"x-pad: " + b"a" * 16377 + b"\n")
            sent.append(1)
        return response

    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          endless) as host:
        error = await expect(ResultType.STS_POLICY_INVALID,
                             fetch(dns, ca_file, "good.test", host.port))
    assert f"over {MAX_POLICY_BYTES} bytes" in error.reason


async def test_a_malformed_or_binary_policy_is_invalid(dns, tls_ca, ca_file):
    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          plain(b"\x89PNG\r\n\x1a\n\x00\x00")) as host:
        await expect(ResultType.STS_POLICY_INVALID, fetch(dns, ca_file, "good.test", host.port))


@pytest.mark.parametrize("certificate", ["wrong-name", "other-ca", "expired", "cn-only"])
async def test_the_policy_host_must_prove_its_name(dns, tls_ca, ca_file, certificate):
    if certificate == "wrong-name":
        context = server_context(tls_ca, "www.good.test")
    elif certificate == "other-ca":
        context = server_context(trustme.CA(), "mta-sts.good.test")
    elif certificate == "expired":
        context = server_context(tls_ca, "mta-sts.good.test",
                                 not_after=datetime.datetime(2020, 1, 1,
                                                             tzinfo=datetime.UTC))
    else:  # the name only in the subject's CN: never matched (RFC 6125, DNS-ID only)
        context = server_context(tls_ca, "other.good.test",
                                 common_name="mta-sts.good.test")
    async with PolicyHost("127.0.0.31", context, plain(POLICY)) as host:
        await expect(ResultType.STS_WEBPKI_INVALID, fetch(dns, ca_file, "good.test", host.port))
        assert host.requests == []  # nothing asked of a host that did not prove its name


async def test_tls_below_1_2_is_refused(dns, tls_ca, ca_file):
    context = server_context(tls_ca, "mta-sts.good.test")
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):  # Python's own word on TLS 1.1
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    async with PolicyHost("127.0.0.31", context, plain(POLICY)) as host:
        await expect(ResultType.STS_POLICY_FETCH_ERROR,
                     fetch(dns, ca_file, "good.test", host.port))
        assert host.requests == []


async def test_a_policy_host_that_is_down_or_has_no_name(dns, ca_file):
    port = 44300
    await expect(ResultType.STS_POLICY_FETCH_ERROR, fetch(dns, ca_file, "down.test", port))
    error = await expect(ResultType.STS_POLICY_FETCH_ERROR,
                         fetch(dns, ca_file, "noaddress.test", port))
    assert "mta-sts.noaddress.test" in error.reason
    await expect(ResultType.STS_POLICY_FETCH_ERROR, fetch(dns, ca_file, "flaky.test", port))


async def test_a_host_that_stalls_runs_into_the_deadline(dns, tls_ca, ca_file):
    never = asyncio.Event()

    async def stall(request):
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"version: STSv1\n")
        await never.wait()  # a slow-loris policy host: the client's deadline is under test
        return response

    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          stall) as host:
        error = await expect(ResultType.STS_POLICY_FETCH_ERROR,
                             fetch(dns, ca_file, "good.test", host.port, timeout=1.0))
        never.set()
    assert "within 1s" in error.reason


async def test_a_body_cut_short_is_a_fetch_error_not_a_policy(dns, tls_ca, ca_file):
    # The headers promise more than comes before the connection closes: what arrived
    # would parse (it is a whole policy), but it is not what the host meant to send.
    async def cut(request):
        response = web.StreamResponse(headers={"Content-Type": "text/plain",
                                               "Content-Length": str(len(POLICY) + 500)})
        await response.prepare(request)
        await response.write(POLICY)
        request.transport.close()
        return response

    async with PolicyHost("127.0.0.31", server_context(tls_ca, "mta-sts.good.test"),
                          cut) as host:
        error = await expect(ResultType.STS_POLICY_FETCH_ERROR,
                             fetch(dns, ca_file, "good.test", host.port, timeout=5.0))
    assert "good.test" in error.reason
