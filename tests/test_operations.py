"""Running it in production: Prometheus metrics scraped over real HTTP after real traffic,
systemd's notifications on a real datagram socket, the privilege drop as root, the unit,
and the TLS line of the delivery log. The server runs as ``harakapy run`` in a
subprocess, as an operator runs it; DNS and the receiving MX run in the test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.dns_server import DnsServer
from tests.harness import eventually, sendmail, write_config_dir
from tests.outbound_env import Certs, free_port_on_all
from tests.processes import ServerProcess, free_port, harakapy
from tests.servers import ReceivingMTA

ZONE = """
$TTL 300
@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@ NS ns.test.
good.test. MX 10 mx.good.test.
mx.good.test. A 127.0.0.3
refusing.test. MX 10 mx.refusing.test.
mx.refusing.test. A 127.0.0.4
"""
BODY = b"Subject: ops\r\n\r\nhello\r\n"


class World:
    """A config directory for ``harakapy run``, the DNS server and the receiving MX it
    delivers to (127.0.0.3 takes mail over STARTTLS, 127.0.0.4 refuses every
    recipient)."""

    def __init__(self, root: Path, port: int, smtp_port: int, stack: AsyncExitStack,
                 certs: Certs) -> None:
        self.root, self.port, self.smtp_port, self.stack = root, port, smtp_port, stack
        self.certs = certs

    def start(self, *args: str, env: dict[str, str] | None = None,
              python: str = sys.executable) -> ServerProcess:
        server = ServerProcess("-c", str(self.root), *args, env=env, python=python)
        self.stack.callback(server.stop)
        return server


@pytest.fixture
async def world(tmp_path):
    async with AsyncExitStack() as stack:

        async def start(files: dict[str, str] | None = None, *, base: Path = tmp_path,
                        smtp_port: int | None = None) -> World:
            dns = await DnsServer(ZONE).start()
            stack.callback(dns.close)
            port = free_port_on_all((3, 4))
            certs = Certs(trustme.CA(), tmp_path)
            ca_file = base / "ca.pem"
            certs.ca.cert_pem.write_to_path(str(ca_file))
            ca_file.chmod(0o644)
            good = await stack.enter_async_context(ReceivingMTA(
                "127.0.0.3", port, cert=certs.files("good", "mx.good.test")))
            await stack.enter_async_context(ReceivingMTA(
                "127.0.0.4", port, rcpt_reply=lambda a: "550 5.1.1 no such user"))
            smtp_port = smtp_port or free_port()
            root = write_config_dir(base / "mta", {
                "me": "harakapy.test\n",
                "plugins": "relay\n",
                "relay_acl_allow": "127.0.0.0/8\n",
                "smtp.ini": f"[main]\nworkers = 1\nlisten = 127.0.0.1:{smtp_port}\n",
                "dns.ini": f"[main]\nnameservers = 127.0.0.1\nport = {dns.port}\n"
                           "timeout = 1\n",
                "outbound.ini": f"[main]\nport = {port}\nconnect_timeout = 2\n",
                "tls.ini": f"[outbound]\nca_file = {ca_file}\n",
                **(files or {}),
            })
            made = World(root, port, smtp_port, stack, certs)
            made.good = good  # type: ignore[attr-defined]
            return made

        yield start


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, w) in ls for k, w in labels.items()))


# -- metrics --------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_count_what_was_sent(world, workers):
    metrics_port = free_port()
    made = await world({
        "metrics.ini": f"[main]\nenabled = yes\nlisten = 127.0.0.1:{metrics_port}\n",
    })
    (made.root / "config" / "smtp.ini").write_text(
        f"[main]\nworkers = {workers}\nlisten = 127.0.0.1:{made.smtp_port}\n")
    server = made.start()
    await asyncio.to_thread(server.wait_for, "ready")
    for n in range(4):  # each over its own connection: spread over the workers
        await sendmail(made.smtp_port, "a@client.test", [f"u{n}@good.test"], BODY)
    await sendmail(made.smtp_port, "a@client.test", ["x@refusing.test"], BODY)
    await eventually(lambda: len(made.good.messages) == 4)

    async def settled():
        samples = await scrape(metrics_port)
        # The refused one, and its notice to client.test, which has no MX (5.1.2).
        return samples if total(samples, "harakapy_outbound_recipients_total",
                                state="bounced") == 2 else None

    deadline = time.monotonic() + 15
    while (samples := await settled()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert samples is not None, f"the bounce was not counted:\n{server.log}"
    assert value(samples, "harakapy_inbound_transactions_total", outcome="queued") == 5
    assert total(samples, "harakapy_inbound_connections_total", outcome="accepted") == 5
    assert value(samples, "harakapy_outbound_recipients_total", state="delivered",
                 reason="2.0") == 4
    assert value(samples, "harakapy_outbound_recipients_total", state="bounced",
                 reason="5.1") == 2
    assert total(samples, "harakapy_outbound_tls_sessions_total", result="success",
                 level="may", policy_type="no-policy-found") >= 1
    assert total(samples, "harakapy_delivery_latency_seconds_count") == 4
    assert total(samples, "harakapy_plugin_hook_seconds_count", plugin="relay",
                 hook="rcpt") == 5
    assert total(samples, "harakapy_plugin_hook_failures_total") == 0
    server.stop()


async def test_metrics_are_off_by_default(world):
    made = await world()
    server = made.start()
    await asyncio.to_thread(server.wait_for, "ready")
    assert "metrics on" not in server.log


async def test_a_bad_metrics_address_is_named_with_file_and_line(world):
    made = await world({"metrics.ini": "[main]\nenabled = yes\nlisten = everywhere\n"})
    done = await asyncio.to_thread(harakapy, "check", "-c", str(made.root))
    assert done.returncode == 2
    assert f"{made.root}/config/metrics.ini:3: [main] listen: 'everywhere' is not " \
           "address:port" in done.stderr


# -- systemd ----------------------------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's: what the service tells it."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float = 15) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)
            return self.messages
        raise AssertionError(f"nothing more from the service; so far {self.messages}")

    def wait_for(self, key: str, timeout: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if key in message and not message.get("_seen"):
                    message["_seen"] = "1"
                    return message
            self.receive(deadline - time.monotonic())
        raise AssertionError(f"no {key} in {self.messages}")


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_reloading_stopping_and_the_watchdog_reach_systemd(world, tmp_path,
                                                                        workers):
    made = await world()
    (made.root / "config" / "smtp.ini").write_text(
        f"[main]\nworkers = {workers}\nlisten = 127.0.0.1:{made.smtp_port}\n")
    notify = NotifySocket(tmp_path)
    made.stack.callback(notify.close)
    server = made.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    ready = await asyncio.to_thread(notify.wait_for, "READY")
    assert ready["MAINPID"] == str(server.process.pid)
    # Ready means serving: a client is answered now.
    await sendmail(made.smtp_port, "a@client.test", ["u@good.test"], BODY)
    await asyncio.to_thread(notify.wait_for, "WATCHDOG")
    await asyncio.to_thread(notify.wait_for, "WATCHDOG")
    server.signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(notify.wait_for, "RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    await asyncio.to_thread(notify.wait_for, "READY")
    server.signal(signal.SIGTERM)
    await asyncio.to_thread(notify.wait_for, "STOPPING")
    assert await asyncio.to_thread(server.wait) == 0
    # Only the main process spoke (workers do not get NOTIFY_SOCKET).
    assert all(m.get("MAINPID", str(server.process.pid)) == str(server.process.pid)
               for m in notify.messages)


async def test_without_notify_socket_nothing_is_sent_and_it_runs(world):
    made = await world()
    server = made.start(env={"NOTIFY_SOCKET": ""})
    await asyncio.to_thread(server.wait_for, "ready")
    await sendmail(made.smtp_port, "a@client.test", ["u@good.test"], BODY)
    await eventually(lambda: made.good.messages)


def test_the_systemd_unit_is_type_notify_and_hardened(tmp_path):
    root = tmp_path / "mta"
    assert harakapy("init", str(root)).returncode == 0
    done = harakapy("systemd-unit", "-c", str(root))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for expected in ("Type=notify", "NotifyAccess=main", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", f"ReadWritePaths={root.resolve()}",
                     "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "User=harakapy",
                     "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                     "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=60"):
        assert expected in lines, expected
    assert any(line.startswith("ExecStart=") and line.endswith(f"run -c {root.resolve()}")
               for line in lines)
    assert any(line.startswith("ExecStartPre=") and "check -c" in line for line in lines)


# -- privileges -------------------------------------------------------------------------

def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the privilege-drop tests run as root in CI")
        pytest.skip("needs root (the privilege drop is tested as root in CI)")


def _ids(pid: int) -> dict[str, list[str]]:
    """A process's ``Uid``, ``Gid`` (real, effective, saved, file system) and ``Groups``."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: line.split(":", 1)[1].split() for line in status
            if line.startswith(("Uid", "Gid", "Groups"))}


def _privileged_port() -> int:
    for port in range(600, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


@pytest.fixture
def open_dir():
    """A directory the user nobody can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="harakapy-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def checkout_reachable():
    """Let nobody pass through the directories above this checkout and its venv for the
    test (a clone in ``mktemp -d`` sits in a 0700 directory), and put their modes back
    after: what is tested is the drop, not where CI cloned the repository."""
    from harakapy.privileges import _unreachable, identity

    who = identity("nobody")
    changed: dict[Path, int] = {}
    for needed in (Path(__file__).resolve().parent.parent,
                   Path(sysconfig.get_paths()["purelib"]).resolve()):
        while (blocked := _unreachable(needed, who)) is not None and blocked not in changed:
            changed[blocked] = blocked.stat().st_mode
            blocked.chmod(changed[blocked] | 0o001)  # search only, no listing
    yield
    for path, mode in changed.items():
        path.chmod(mode)


@pytest.fixture
def nobody_python(open_dir, checkout_reachable) -> str:
    """A Python that nobody can run, with this checkout's packages: the test machine's
    own interpreter may live under /root, which nobody cannot enter (and harakapy says
    so and refuses to start, test_an_unreachable_installation_is_refused)."""
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system is None or Path(system).resolve().is_relative_to("/root"):
        if os.environ.get("CI") == "true":
            pytest.fail("the privilege tests need a system python3 (Debian's python3)")
        pytest.skip("no system python3 for the user nobody")
    venv = open_dir / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    (site,) = venv.glob("lib/python3*/site-packages")
    # site.addsitedir, not a bare path: this checkout's editable install is a .pth too.
    (site / "checkout.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    return str(venv / "bin" / "python")


@pytest.mark.parametrize("workers", [1, 2])
async def test_as_root_it_binds_then_runs_as_the_user_and_still_delivers(
        world, open_dir, nobody_python, workers):
    _need_root()
    port = _privileged_port()
    made = await world(base=open_dir, smtp_port=port)
    (made.root).chmod(0o755)
    (made.root / "config").chmod(0o755)
    for path in (made.root / "config").iterdir():
        path.chmod(0o644)
    (made.root / "queue").rmdir()
    (made.root / "config" / "smtp.ini").write_text(
        f"[main]\nworkers = {workers}\nlisten = 127.0.0.1:{port}\nuser = nobody\n")
    server = made.start(python=nobody_python)
    await asyncio.to_thread(server.wait_for, "ready")
    pids = [server.process.pid] + [int(p) for p in _children(server.process.pid)]
    for pid in pids:
        ids = _ids(pid)
        # Saved ids too: none left at 0 means root cannot be had back (the drop's own
        # check after setuid raises if it could).
        assert ids["Uid"] == ["65534"] * 4 and ids["Gid"] == ["65534"] * 4, (pid, ids)
        assert ids["Groups"] == []
    assert (made.root / "queue").stat().st_uid == 65534
    await sendmail(port, "a@client.test", ["u@good.test"], BODY)
    await eventually(lambda: made.good.messages)


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


async def test_an_unreachable_installation_is_refused(world, open_dir):
    _need_root()
    if not Path(sys.executable).resolve().is_relative_to("/root"):
        pytest.skip("this machine's Python is one nobody can reach")
    made = await world(base=open_dir)
    (made.root / "config" / "smtp.ini").write_text(
        f"[main]\nworkers = 1\nlisten = 127.0.0.1:{made.smtp_port}\nuser = nobody\n")
    done = await asyncio.to_thread(harakapy, "run", "-c", str(made.root), timeout=30)
    assert done.returncode == 2
    assert "/root does not let nobody ([main] user) through" in done.stderr


async def test_a_spool_that_belongs_to_someone_else_stops_the_start(world, open_dir,
                                                                    nobody_python):
    _need_root()
    made = await world(base=open_dir)
    (made.root / "config" / "smtp.ini").write_text(
        f"[main]\nworkers = 1\nlisten = 127.0.0.1:{made.smtp_port}\nuser = nobody\n")
    done = await asyncio.to_thread(subprocess.run, [
        nobody_python, "-m", "harakapy", "run", "-c", str(made.root)],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"{made.root / 'queue'} belongs to uid 0, not to nobody ([main] user): run " \
           f"chown -R nobody:nogroup {made.root / 'queue'}" in done.stderr


def test_an_unknown_user_is_a_config_error(tmp_path):
    root = tmp_path / "mta"
    assert harakapy("init", str(root)).returncode == 0
    (root / "config" / "smtp.ini").write_text("[main]\nuser = no-such-user-here\n")
    done = harakapy("check", "-c", str(root))
    assert done.returncode == 2
    assert f"{root}/config/smtp.ini:2: [main] user: no user 'no-such-user-here' on this " \
           "system" in done.stderr


# -- the TLS line of the delivery log -----------------------------------------------------

async def test_each_delivery_session_logs_its_tls_in_postfix_words(world):
    made = await world()
    (made.root / "config" / "tls_policy").write_text("good.test verify\n")
    (made.root / "config" / "plugins").write_text("relay\ntls_require\n")
    server = made.start("--log-format", "json")
    await asyncio.to_thread(server.wait_for, "ready")
    await sendmail(made.smtp_port, "a@client.test", ["u@good.test"], BODY)
    await sendmail(made.smtp_port, "a@client.test", ["x@refusing.test"], BODY)
    line = await asyncio.to_thread(server.wait_for, '"event": "tls"')
    event = json.loads(line)
    assert event["mx"] in ("mx.good.test", "mx.refusing.test")
    plain = json.loads(await asyncio.to_thread(server.wait_for, "no STARTTLS offered"))
    assert plain["trust"] == "none" and plain["policy_level"] == "may"
    verified = json.loads(await asyncio.to_thread(server.wait_for, "Verified TLS connection"))
    assert verified["trust"] == "Verified" and verified["policy_level"] == "verify"
    assert verified["level"] == "info"  # the log level, as on every line
    assert verified["decided_by"] == "tls_require" and verified["tls_version"].startswith("TLS")
    assert verified["msg"].startswith(
        f"Verified TLS connection established to mx.good.test[127.0.0.3]:{made.port}: TLSv1.")


async def test_a_trusted_chain_at_may_is_trusted_and_an_unknown_one_untrusted(world):
    made = await world()
    server = made.start()
    await asyncio.to_thread(server.wait_for, "ready")
    await sendmail(made.smtp_port, "a@client.test", ["u@good.test"], BODY)
    line = await asyncio.to_thread(server.wait_for, "TLS connection established to")
    assert "Trusted TLS connection established to mx.good.test" in line  # tls.ini's CAs
    server.stop()
    (made.root / "config" / "tls.ini").write_text("")  # the system's CAs: not the test's
    again = made.start()
    await asyncio.to_thread(again.wait_for, "ready")
    await sendmail(made.smtp_port, "a@client.test", ["v@good.test"], BODY)
    line = await asyncio.to_thread(again.wait_for, "TLS connection established to")
    assert "Untrusted TLS connection established to mx.good.test" in line
