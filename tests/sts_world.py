"""The MTA-STS tests' world: the destination side (DNS records per domain from the test's
DNS server, a real HTTPS policy host with test-CA certificates, MX servers, a STARTTLS
stripper) and harakapy with the mta_sts plugin (tests/outbound_env.py), through the
``sts_world`` fixture of conftest.py."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import dns.zone
from aiohttp import web

from tests.outbound_env import RECORDER, Env, EnvFactory
from tests.policy_host import PolicyHost, server_context
from tests.servers import ReceivingMTA, StartTlsStripper

POLICY_IP, EXPIRED_POLICY_IP = "127.0.0.41", "127.0.0.42"
MX_IP, MX2_IP, REAL_IP = "127.0.0.21", "127.0.0.22", "127.0.0.29"
MX_HOSTS = (21, 22, 29)
BODY = b"Subject: secret\r\n\r\nthe merger closes on friday\r\n"

HEAD = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
"""


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


class StsWorld:
    """The destination side: DNS records per domain, the policy host's answers, the MX
    servers; ``world.env`` is harakapy's side (tests/outbound_env.py)."""

    def __init__(self, env: Env, host: PolicyHost) -> None:
        self.env, self.host = env, host
        self.records: dict[str, list[str]] = {}
        self.answers: dict[str, Answer] = {}

    def domain(self, name: str, *, mx: tuple[tuple[int, str, str], ...] | None = None,
               txt: str | None = "v=STSv1; id=1", answer: Answer | None = None,
               policy_ip: str = POLICY_IP) -> None:
        """``name`` with its MX records, its ``_mta-sts`` TXT and its policy host."""
        hosts = mx if mx is not None else ((10, f"mx.{name}", MX_IP),)
        lines = [f"{name}. MX {pref} {host}." for pref, host, _ in hosts]
        lines += [f"{host}. A {ip}" for _, host, ip in hosts]
        if txt is not None:
            lines.append(f'_mta-sts.{name}. TXT "{txt}"')
        lines.append(f"mta-sts.{name}. A {policy_ip}")
        self.records[name] = lines
        self.answers[name] = answer or Answer(body=policy("enforce", f"mx.{name}"))
        self.publish_zone()

    def txt(self, name: str, text: str) -> None:
        self.records[name] = [line for line in self.records[name]
                              if not line.startswith("_mta-sts.")]
        self.records[name].append(f'_mta-sts.{name}. TXT "{text}"')
        self.publish_zone()

    def publish_zone(self) -> None:
        text = HEAD + "\n".join(line for lines in self.records.values() for line in lines)
        self.env.dns.zone = dns.zone.from_text(text + "\n", origin="test.",
                                               relativize=False, check_origin=False)

    async def mx(self, ip: str, *names: str, **options) -> ReceivingMTA:
        """A receiving server on ``ip`` whose certificate (from the test CA) has
        ``names``; ``tls_context`` instead for another kind."""
        if names:
            options["cert"] = self.env.certs.files(f"mx-{ip}", *names)
        return await self.env.mta(ip, **options)

    async def stripper(self, ip: str, upstream: ReceivingMTA) -> StartTlsStripper:
        return await self.env.stack.enter_async_context(
            StartTlsStripper(ip, self.env.port, upstream=(upstream.host, self.env.port)))

    def fetches(self, name: str) -> int:
        return sum(1 for host in self.host.requests if host == name)


def mta_sts_ini(port: int, extra: str = "") -> str:
    return f"[main]\nport = {port}\ncheck_interval = 5m\n{extra}"


async def sts_world_factory(outbound_env: EnvFactory):
    """``world = await start(mta_sts_ini_extra, plugins=..., plugin_files=...)``; the
    policy hosts stop with the test."""
    worlds: list[StsWorld] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        world = worlds[0]
        name = request.host.partition(":")[0].removeprefix("mta-sts.")
        world.host.requests.append(name)
        found = world.answers.get(name, Answer(404, b"not here"))
        return web.Response(status=found.status, body=found.body,
                            headers={"Content-Type": found.content_type, **found.headers})

    policy_names = [f"mta-sts.{d}" for d in ("a.test", "b.test", "two.test", "t.test",
                                             "gone.test", "moved.test", "big.test",
                                             "html.test", "lapsed.test", "none.test")]
    ca = outbound_env.certs.ca  # the one harakapy trusts (tls.ini ca_file)
    host = await outbound_env.stack.enter_async_context(
        PolicyHost(POLICY_IP, server_context(ca, *policy_names), answer))
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    await outbound_env.stack.enter_async_context(PolicyHost(
        EXPIRED_POLICY_IP, server_context(ca, "mta-sts.expired.test", not_before=past,
                                          not_after=past + datetime.timedelta(days=30)),
        answer, port=host.port))
    host.requests.clear()

    async def start(extra: str = "", *, plugins: str = "relay\nmta_sts\nrecorder\n",
                    plugin_files: dict[str, str] | None = None,
                    clock_start: float | None = None,
                    files: dict[str, str] | None = None) -> StsWorld:
        env = await outbound_env(HEAD, files={
            "tls.ini": f"[outbound]\nca_file = {outbound_env.ca_file}\n",
            "mta_sts.ini": mta_sts_ini(host.port, extra),
            **(files or {}),
        }, plugins=plugins, plugin_files={"recorder": RECORDER, **(plugin_files or {})},
            hosts=MX_HOSTS, body=BODY, clock_start=clock_start)
        worlds.append(StsWorld(env, host))
        return worlds[0]

    return start


def plaintext_seen(attacker: StartTlsStripper) -> bytes:
    return bytes(attacker.from_client)
