"""The world an outbound test delivers into: a real DNS server on loopback serving the test's
zone, receiving servers on 127.0.0.x (all on one port, as MX hosts all listen on 25), and
harakapy itself, with a clock the test moves.

test_outbound.py and the TLS policy tests (test_tls_*.py) build theirs with the
``outbound_env`` fixture (conftest.py); the TLS tests through ``tls_env``, which adds the
parts below the line: their zone, the receiving server of each kind of TLS, and a plugin
that records every TLS result and deferral.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from harakapy.tls.context import self_signed_context
from tests.dns_server import DnsServer
from tests.harness import ManualClock, Running, eventually, running_server, sendmail
from tests.servers import ReceivingMTA

DEFAULT_BODY = b"Subject: t\r\n\r\nhello\r\n"

# Retries a minute apart, at most ten minutes; a message expires after an hour.
OUTBOUND_INI = ("min_backoff = 60\nmax_backoff = 600\nmax_queue_lifetime = 1h\n"
                "connect_timeout = 2\ncommand_timeout = 5\n")


def free_port_on_all(lasts: tuple[int, ...] = (3, 4, 5)) -> int:
    """A port free on 127.0.0.2 and on 127.0.0.<each of lasts>."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
            port = probe.getsockname()[1]
        try:
            for last in lasts:
                with socket.socket() as other:
                    other.bind((f"127.0.0.{last}", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


@dataclass
class Certs:
    ca: trustme.CA
    dir: Path

    def files(self, name: str, *identities: str, **options) -> tuple[str, str]:
        issued = self.ca.issue_cert(*identities, **options)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)


def journal_records(path: Path) -> list[dict[str, Any]]:
    """The records of one spool journal; a line still being written is left out."""
    records = []
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def outcomes(path: Path) -> int:
    """How many attempt outcomes (delivered, deferred, bounced) a journal records."""
    return sum(1 for record in journal_records(path) if "state" in record)


@dataclass
class Env:
    hp: Running
    dns: DnsServer
    clock: ManualClock
    port: int
    stack: AsyncExitStack
    certs: Certs
    body: bytes = DEFAULT_BODY

    async def mta(self, host: str, **options) -> ReceivingMTA:
        return await self.stack.enter_async_context(ReceivingMTA(host, self.port, **options))

    async def send(self, recipients: str | list[str], body: bytes | None = None,
                   sender: str = "alice@sender.test", utf8: bool = False) -> None:
        if isinstance(recipients, str):
            recipients = [recipients]
        await sendmail(self.hp.port, sender, recipients, self.body if body is None else body,
                       mail_options=("SMTPUTF8",) if utf8 else ())

    def spooled(self) -> list[str]:
        return sorted(p.name for p in (self.hp.root / "queue" / "msg").iterdir())

    def journals(self) -> list[Path]:
        return sorted((self.hp.root / "queue" / "log").glob("*"))

    def deferrals(self) -> int:
        """How many deferred attempts the spool's journals record."""
        return sum(1 for path in self.journals() for record in journal_records(path)
                   if record.get("state") == "deferred")

    def deferral_recorded(self) -> bool:
        return self.deferrals() > 0

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def retry(self) -> None:
        """Move the clock to the retry that the one deferred message's journal schedules,
        and wait until that attempt's outcome is recorded or the message is done.

        Waiting for the outcome before moving the clock again matters: an attempt still in
        flight when the clock moves schedules its retry from the new time, past the next
        move (the runner would fall behind the test).
        """
        (path,) = [p for p in self.journals()
                   if any(r.get("state") == "deferred" for r in journal_records(p))]
        before = journal_records(path)
        due = [r for r in before if r.get("state") == "deferred"][-1]["next"]
        self.clock.advance(max(0.0, due - self.clock.now))
        count = sum(1 for record in before if "state" in record)
        await eventually(lambda: not path.exists() or outcomes(path) > count)

    def captured(self, kind: str) -> list:
        """What a recording plugin put in ``server.notes["captured"]`` as ``(kind, item)``."""
        return [item for k, item in self.hp.captured if k == kind]

    def failures(self) -> list:
        return [r for r in self.captured("tls_result") if not r.success]


class EnvFactory:
    """``await outbound_env(zone, ...)``: start a DNS server for ``zone`` and harakapy pointed
    at it; receiving servers come later, from ``Env.mta``. Everything stops with the test.

    :param zone: The zone text (origin ``test.``).
    :param files: Config files beyond (or replacing) me, plugins, dns.ini and outbound.ini.
    :param plugins: ``config/plugins``; ``relay`` by default.
    :param plugin_files: Plugins to write into ``DIR/plugins``, name to source.
    :param outbound_ini: The ``[main]`` keys of outbound.ini besides ``port``.
    :param servfail: Names the DNS server answers with SERVFAIL.
    :param hosts: Last octets of the 127.0.0.x addresses (besides .2) receiving servers
        will listen on: the port must be free on each.
    :param body: What ``Env.send`` sends unless told otherwise.
    :param port: The receiving servers' port, chosen beforehand (``free_port_on_all``)
        when the zone must name it (TLSA owners).
    :param clock_start: Where the test's clock starts (default: a fixed time in 2027);
        a test whose commands use the real clock starts it in the past.
    """

    def __init__(self, stack: AsyncExitStack, config_dir: Callable[..., Path],
                 tmp_path: Path) -> None:
        self.stack = stack
        self.config_dir = config_dir
        self.tmp_path = tmp_path
        # A CA of this test's own, for the receiving servers' certificates; a TLS test's
        # harakapy trusts it through tls.ini's ca_file.
        self.certs = Certs(trustme.CA(), tmp_path)
        self.ca_file = tmp_path / "ca.pem"
        self.certs.ca.cert_pem.write_to_path(str(self.ca_file))

    async def __call__(self, zone: str, *, files: dict[str, str] | None = None,
                       plugins: str = "relay\n", plugin_files: dict[str, str] | None = None,
                       outbound_ini: str = OUTBOUND_INI, servfail: Iterable[str] = (),
                       hosts: tuple[int, ...] = (3, 4, 5), body: bytes = DEFAULT_BODY,
                       port: int | None = None, clock_start: float | None = None) -> Env:
        dns = await DnsServer(zone).start()
        self.stack.callback(dns.close)
        dns.servfail.update(servfail)
        port = port or free_port_on_all(hosts)
        root = self.config_dir({
            "me": "harakapy.test\n",
            "plugins": plugins,
            "dns.ini": f"[main]\nnameservers = 127.0.0.1\nport = {dns.port}\ntimeout = 1\n",
            "outbound.ini": f"[main]\nport = {port}\n{outbound_ini}",
            **(files or {}),
        }, plugin_files)
        clock = ManualClock() if clock_start is None else ManualClock(clock_start)
        hp = await self.stack.enter_async_context(running_server(root, clock=clock))
        return Env(hp, dns, clock, port, self.stack, self.certs, body)


# -- the TLS policy tests' world ----------------------------------------------------------

TLS_ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
sender.test. MX 10 mx.sender.test.
mx.sender.test. A 127.0.0.4
plain.test. MX 10 mx.plain.test.
mx.plain.test. A 127.0.0.11
good.test. MX 10 mx.good.test.
mx.good.test. A 127.0.0.12
sub.good.test. MX 10 mx.good.test.
wrong.test. MX 10 mx.wrong.test.
mx.wrong.test. A 127.0.0.13
expired.test. MX 10 mx.expired.test.
mx.expired.test. A 127.0.0.14
selfsigned.test. MX 10 mx.selfsigned.test.
mx.selfsigned.test. A 127.0.0.15
old.test. MX 10 mx.old.test.
mx.old.test. A 127.0.0.16
old11.test. MX 10 mx.old11.test.
mx.old11.test. A 127.0.0.18
strip.test. MX 10 mx.strip.test.
mx.strip.test. A 127.0.0.17
two.test. MX 10 mx1.two.test.
two.test. MX 20 mx2.two.test.
mx1.two.test. A 127.0.0.13
mx2.two.test. A 127.0.0.12
"""

RECORDER = '''
from harakapy import hookimpl


@hookimpl
def tls_result(result, server):
    server.notes.setdefault("captured", []).append(("tls_result", result))


@hookimpl
def deferred(recipients, reason, server):
    server.notes.setdefault("captured", []).append(("deferred", reason))
'''

BODY = b"Subject: secret\r\n\r\nthe merger closes on friday\r\n"


async def start_tls_env(make: EnvFactory, tls_policy: str = "", *, tls_pin: str = "",
                        tls_outbound: str = "", plugins: str = "tls_require\ntls_pin\n",
                        plugin_files: dict[str, str] | None = None) -> Env:
    """harakapy on TLS_ZONE with ``config/tls_policy``, ``tls.ini`` trusting the test's CA
    (plus ``tls_outbound``, more ``[outbound]`` keys), and the recorder as the last plugin.
    """
    files = {
        "tls.ini": f"[outbound]\nca_file = {make.ca_file}\n{tls_outbound}",
        "tls_policy": tls_policy,
    }
    if tls_pin:
        files["tls_pin.ini"] = tls_pin
    return await make(TLS_ZONE, files=files, plugins=f"relay\n{plugins}recorder\n",
                      plugin_files={"recorder": RECORDER, **(plugin_files or {})},
                      hosts=(4, *range(11, 19)), body=BODY)


def old_tls_only(cert: tuple[str, str], version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        context.minimum_version = version
        context.maximum_version = version
    return context


async def start_mx(env: Env, kind: str) -> ReceivingMTA:
    """The receiving server of each kind, on the address its test domain's MX has."""
    certs = env.certs
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    if kind == "plain":
        return await env.mta("127.0.0.11")
    if kind == "good":
        cert = certs.files("good", "mx.good.test", "good.test", "mx2.two.test")
        return await env.mta("127.0.0.12", cert=cert)
    if kind == "wrong":
        return await env.mta("127.0.0.13", cert=certs.files("wrong", "mx.elsewhere.example"))
    if kind == "expired":
        cert = certs.files("expired", "mx.expired.test", not_before=past,
                           not_after=past + datetime.timedelta(days=30))
        return await env.mta("127.0.0.14", cert=cert)
    if kind == "selfsigned":
        return await env.mta("127.0.0.15", tls_context=self_signed_context("mx.selfsigned.test"))
    if kind == "old":
        context = old_tls_only(certs.files("old", "mx.old.test"), ssl.TLSVersion.TLSv1)
        return await env.mta("127.0.0.16", tls_context=context)
    if kind == "old11":
        context = old_tls_only(certs.files("old11", "mx.old11.test"), ssl.TLSVersion.TLSv1_1)
        return await env.mta("127.0.0.18", tls_context=context)
    raise AssertionError(kind)
