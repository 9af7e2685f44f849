"""Fetching a domain's MTA-STS policy over HTTPS (RFC 8461 3.3), with aiohttp.

Rules:

1. ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` and nothing else: redirects are
   refused, proxies from the environment and HTTP caches are not used.
2. The policy host proves its name: a chain to the system store (or ``[outbound]
   ca_file``), not expired, a subjectAltName DNS name (never the CN) matching
   ``mta-sts.<domain>``, TLS 1.2 or newer, SNI set. Any of that failing is
   ``sts-webpki-invalid``.
3. Only ``200`` with ``text/plain`` (UTF-8 or US-ASCII) is a policy. At most 64 KiB are
   read, whatever ``Content-Length`` says, and the whole fetch has one deadline.
4. The policy host is resolved by the server's resolver (``config/dns.ini``), as every
   other name delivery looks up.

What a failure is (the RFC 8460 result type) is decided here; what to do about it (keep
the cached policy, wait five minutes before the next try) is the caller's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from harakapy.dns import DnsError, Resolver
from harakapy.tls.mta_sts import MAX_POLICY_BYTES, StsError, StsPolicy, parse_policy
from harakapy.tls.results import ResultType

WELL_KNOWN = "/.well-known/mta-sts.txt"


class FetchError(Exception):
    """No policy came back; ``result_type`` says which RFC 8460 failure it was."""

    def __init__(self, result_type: ResultType, reason: str) -> None:
        super().__init__(f"{result_type.value}: {reason}")
        self.result_type = result_type
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Fetched:
    """A policy as fetched: parsed, and the URL it came from (for logs)."""

    policy: StsPolicy
    url: str


class ServerResolver(AbstractResolver):
    """aiohttp's name lookups through harakapy's resolver (rule 4)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        try:
            found = await self.resolver.addresses(host)
        except DnsError as exc:
            raise OSError(f"cannot resolve {host}: {exc.reason}") from None
        if not found:
            raise OSError(f"{host} has no address")
        return [{"hostname": host, "host": address, "port": port,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for address in found]

    async def close(self) -> None:
        return None


def policy_host_context(ca_file: Path | None) -> ssl.SSLContext:
    """The client context for policy hosts (rule 2)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.hostname_checks_common_name = False
    # Set, not inherited: Python 3.13 changed the defaults (X509_STRICT, PARTIAL_CHAIN).
    context.verify_flags = ssl.VERIFY_X509_TRUSTED_FIRST
    return context


def _media_type_ok(response: aiohttp.ClientResponse) -> bool:
    if response.content_type.lower() != "text/plain":
        return False
    charset = (response.charset or "utf-8").lower()
    return charset in ("utf-8", "us-ascii")


async def fetch_policy(domain: str, *, resolver: Resolver, context: ssl.SSLContext,
                       port: int = 443, connect_timeout: float = 10.0,
                       timeout: float = 60.0) -> Fetched:
    """Fetch and parse ``domain``'s policy.

    :param domain: The policy domain, lower-case A-labels.
    :param resolver: For the policy host's addresses.
    :param context: From :func:`policy_host_context`.
    :param port: The HTTPS port (443; tests serve on another).
    :param connect_timeout: Seconds for the TCP and TLS setup.
    :param timeout: Seconds for the whole fetch (RFC 8461 3.3 suggests 60).
    :raises FetchError: ``sts-policy-fetch-error``, ``sts-webpki-invalid`` or
        ``sts-policy-invalid``, with why.
    """
    host = f"mta-sts.{domain}"
    url = f"https://{host}{WELL_KNOWN}" if port == 443 else \
        f"https://{host}:{port}{WELL_KNOWN}"
    connector = aiohttp.TCPConnector(resolver=ServerResolver(resolver), ssl=context,
                                     use_dns_cache=False, force_close=True)
    timeouts = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession(
                connector=connector, timeout=timeouts, trust_env=False,
                auto_decompress=False) as session, session.get(
                url, allow_redirects=False, headers={"Accept": "text/plain"}) as response:
            if response.status != 200:
                where = response.headers.get("Location", "")
                raise FetchError(ResultType.STS_POLICY_FETCH_ERROR,
                                 f"{url} answered {response.status}"
                                 + (f" (redirect to {where[:100]}, not followed)"
                                    if 300 <= response.status < 400 else ""))
            if not _media_type_ok(response):
                raise FetchError(ResultType.STS_POLICY_INVALID,
                                 f"{url} is {response.headers.get('Content-Type', 'untyped')!r}"
                                 f", not text/plain")
            body = bytearray()
            async for chunk in response.content.iter_chunked(16384):
                body += chunk
                if len(body) > MAX_POLICY_BYTES:
                    raise FetchError(ResultType.STS_POLICY_INVALID,
                                     f"{url} is over {MAX_POLICY_BYTES} bytes")
    except FetchError:
        raise
    except aiohttp.ClientConnectorCertificateError as exc:
        error = exc.certificate_error
        why = getattr(error, "verify_message", None) or str(error)
        raise FetchError(ResultType.STS_WEBPKI_INVALID,
                         f"the certificate of {host} is not valid: {why}") from None
    except aiohttp.ClientConnectorSSLError as exc:
        raise FetchError(ResultType.STS_POLICY_FETCH_ERROR,
                         f"TLS with {host} failed: {exc.os_error}") from None
    except TimeoutError:
        raise FetchError(ResultType.STS_POLICY_FETCH_ERROR,
                         f"{url} did not answer within {timeout:.0f}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchError(ResultType.STS_POLICY_FETCH_ERROR,
                         f"cannot fetch {url}: {exc}") from None
    try:
        return Fetched(parse_policy(bytes(body)), url)
    except StsError as exc:
        raise FetchError(ResultType.STS_POLICY_INVALID, f"{url}: {exc.reason}") from None
