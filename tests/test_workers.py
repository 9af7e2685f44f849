"""``[main] workers``: a supervisor and several server processes over one config directory.

``harakapy run`` runs as an operator starts it, in a subprocess; mail goes to a real
receiving server on 127.0.0.2 through a real DNS server (conftest.py's
``dest_dns``). The kill -9 tests of a worker and of the supervisor are in
test_durability.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import write_config_dir
from tests.processes import ServerProcess, free_port, free_port_on, harakapy
from tests.servers import ReceivingMTA
from tests.test_durability import worker_pids

# A plugin whose installation-wide task notes which process runs it, and whose
# per-process task notes every process.
TASKS_PLUGIN = '''
import os

from harakapy import background


@background
async def once(server):
    with open(server.state_dir / "once.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    await server.clock.sleep(10**9)


@background(per_process=True)
async def everywhere(server):
    with open(server.state_dir / "everywhere.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    await server.clock.sleep(10**9)
'''


@pytest.fixture
def group(tmp_path, dest_dns):
    """``group(mx_port=None, workers=2, extra_plugins="")``: a relaying config dir and
    its running ``harakapy run``."""
    started: list[ServerProcess] = []

    def make(mx_port: int | None = None, *, workers: int = 2, plugins: str = "relay\n",
             files: dict[str, str] | None = None) -> tuple[Path, int, ServerProcess]:
        root, port = tmp_path / f"group{len(started)}", free_port()
        write_config_dir(root, {
            "me": "relay.test\n",
            "plugins": plugins,
            "smtp.ini": f"[main]\nlisten = 127.0.0.1:{port}\nworkers = {workers}\n"
                        "shutdown_grace = 2\n",
            "dns.ini": f"[main]\nnameservers = 127.0.0.1\nport = {dest_dns.port}\n"
                       "timeout = 2\n",
            "outbound.ini": f"[main]\nport = {mx_port or free_port_on('127.0.0.2')}\n"
                            "min_backoff = 1\nmax_backoff = 2\nconnect_timeout = 2\n",
            **(files or {}),
        }, {"tasks": TASKS_PLUGIN})
        process = ServerProcess("-c", str(root))
        started.append(process)
        return root, port, process

    yield make
    for process in started:
        process.stop()


def send(port: int, count: int, *, tag: str = "m") -> None:
    for number in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("client@client.test", [f"{tag}{number}@dest.test"],
                          f"Subject: {tag}{number}\r\n\r\nbody\r\n".encode())


async def ready(process: ServerProcess) -> None:
    await asyncio.to_thread(process.wait_for, "harakapy ready")


async def until(check, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what()}")
        await asyncio.sleep(0.05)


async def test_workers_share_the_listener_and_each_delivers_what_it_accepted(group):
    mx_port = free_port_on("127.0.0.2")
    async with ReceivingMTA("127.0.0.2", mx_port) as mta:
        _root, port, process = group(mx_port)
        await ready(process)
        assert len(worker_pids(process)) == 2
        await asyncio.to_thread(send, port, 40)
        await until(lambda: len(mta.messages) >= 40, 30, lambda: process.log)
        # Connections were spread over both workers, and each message arrived once.
        accepted = Counter(line.split("[", 1)[1].split("]")[0] for line in process.lines
                           if "harakapy.inbound[" in line and " queued id=" in line)
        assert set(accepted) == {"1", "2"}, accepted
        delivered = Counter(line.split("[", 1)[1].split("]")[0] for line in process.lines
                            if "harakapy.outbound[" in line and " delivered to " in line)
        assert delivered == accepted
        arrivals = Counter(tuple(m.recipients) for m in mta.messages)
        assert len(arrivals) == 40 and set(arrivals.values()) == {1}
    assert process.stop() == 0
    assert "harakapy.supervisor: stopped" in process.log


async def test_the_supervisor_serves_the_status_page_of_every_workers_sessions(group):
    import json
    import urllib.request

    mx_port, status_port = free_port_on("127.0.0.2"), free_port()
    async with ReceivingMTA("127.0.0.2", mx_port) as mta:
        _root, port, process = group(mx_port, files={
            "status.ini": f"[main]\nenabled = yes\nlisten = 127.0.0.1:{status_port}\n"})
        await ready(process)
        await asyncio.to_thread(send, port, 30)
        await until(lambda: len(mta.messages) >= 30, 30, lambda: process.log)
        # Each worker logs one TLS line per session (plaintext here: the MX offers no
        # STARTTLS) and writes its sessions for the page every five seconds; the
        # supervisor serves them all.
        sessions = Counter(line.split("[", 1)[1].split("]")[0] for line in process.lines
                           if "harakapy.outbound.tls[" in line and "policy may" in line)
        assert set(sessions) == {"1", "2"}, sessions

        def served() -> dict:
            url = f"http://127.0.0.1:{status_port}/status.json"
            with urllib.request.urlopen(url, timeout=5) as response:
                data = json.load(response)
            return {d["domain"]: d["day"] for d in data["destinations"]}

        total = sum(sessions.values())
        await until(lambda: served().get("dest.test", {}).get("succeeded") == total, 20,
                    lambda: (served(), sessions))
        day = served()["dest.test"]
        assert day["tls_versions"] == {"none": total} and day["source"] == "none"
    assert process.stop() == 0


async def test_sigterm_stops_every_worker_and_keeps_their_mail(group):
    root, port, process = group()  # the MX port is closed: mail stays queued
    await ready(process)
    await asyncio.to_thread(send, port, 10)
    pids = list(worker_pids(process).values())
    assert process.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    listed = harakapy("queue", "list", "-c", str(root))
    assert "10 message(s) queued" in listed.stdout


async def test_queue_commands_reach_every_worker(group):
    root, port, process = group()
    await ready(process)
    await asyncio.to_thread(send, port, 12)
    await until(lambda: sum(" deferred " in line for line in process.lines) >= 12, 30,
                lambda: process.log)
    assert "12 message(s) queued" in harakapy("queue", "list", "-c", str(root)).stdout
    flushed = harakapy("queue", "flush", "-c", str(root))
    assert flushed.returncode == 0
    # How many: the jobs waiting in both workers, not those being tried or already due
    # at that moment, which the retries every second or two make a matter of timing.
    assert re.search(r"retrying \d+ delivery job\(s\) now", flushed.stdout)
    [one] = [line.split()[0] for line in
             harakapy("queue", "list", "-c", str(root)).stdout.splitlines()[:1]]
    deleted = harakapy("queue", "delete", one, "-c", str(root))
    assert deleted.returncode == 0, deleted.stderr
    assert not (root / "queue" / "msg" / one).exists()
    assert "11 message(s) queued" in harakapy("queue", "list", "-c", str(root)).stdout


async def test_sighup_reloads_every_worker(group):
    root, port, process = group()
    await ready(process)
    mark = len(process.lines)
    (root / "config" / "relay_acl_allow").write_text("192.0.2.0/24\n")
    process.signal(signal.SIGHUP)
    await until(lambda: sum("config reloaded" in line for line in process.lines[mark:]) == 2,
                30, lambda: process.log)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # 127.0.0.1 may not relay now
        smtp.ehlo("c")
        smtp.mail("client@client.test")
        assert smtp.rcpt("x@dest.test")[0] == 550


async def test_background_tasks_run_once_per_installation_and_move_when_a_worker_dies(group):
    root, _port, process = group(plugins="relay\ntasks\n")
    await ready(process)
    state = root / "state" / "tasks"
    await until(lambda: (state / "once.log").exists() and len(
        (state / "everywhere.log").read_text().split()) == 2, 30, lambda: process.log)
    [owner] = (state / "once.log").read_text().split()
    assert set((state / "everywhere.log").read_text().split()) == {
        str(pid) for pid in worker_pids(process).values()}
    os.kill(int(owner), signal.SIGKILL)
    # The surviving worker takes the lock within its standby poll; the replacement
    # worker finds it taken and waits.
    await until(lambda: len((state / "once.log").read_text().split()) == 2, 30,
                lambda: process.log)
    second = (state / "once.log").read_text().split()[1]
    assert second != owner
    assert int(second) in worker_pids(process).values()


async def test_a_worker_that_cannot_start_stops_the_start_with_its_exit_code(tmp_path):
    root = write_config_dir(tmp_path / "broken", {
        "smtp.ini": f"[main]\nlisten = 127.0.0.1:{free_port()}\nworkers = 2\n",
        "plugins": "refuses\n",
    }, {"refuses": '''
from harakapy import ConfigError, hookimpl


@hookimpl
def startup(server):
    raise ConfigError(server.config.root / "config" / "plugins", 1, "refuses", "no, never")
'''})
    process = ServerProcess("-c", str(root))
    try:
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        process.stop()
    assert code == 2
    assert "no, never" in process.log
    assert "exited during start" in process.log


def test_workers_zero_means_one_per_core(tmp_path):
    from harakapy.config import Config
    from harakapy.inbound.settings import InboundSettings

    root = write_config_dir(tmp_path / "cores", {"smtp.ini": "[main]\nworkers = 0\n"})
    workers = InboundSettings.from_config(Config.load(root)).workers
    assert workers == len(os.sched_getaffinity(0))


async def test_a_worker_that_keeps_dying_waits_longer_and_the_others_are_still_watched(group):
    _root, port, process = group()
    await ready(process)
    first = worker_pids(process)[1]
    os.kill(first, signal.SIGKILL)
    await asyncio.to_thread(process.wait_for, "worker 1 of 2 ready", start=len(process.lines))
    again = worker_pids(process)[1]
    assert again != first
    mark = len(process.lines)
    os.kill(again, signal.SIGKILL)  # dying again within a minute: the back-off doubles
    await asyncio.to_thread(process.wait_for, "starting it again in 2s", start=mark)
    os.kill(worker_pids(process)[2], signal.SIGKILL)  # seen while worker 1 waits
    line = await asyncio.to_thread(process.wait_for, "worker 2 (pid", start=mark)
    assert "starting it again in 1s" in line
    await until(lambda: sum("of 2 ready" in x for x in process.lines[mark:]) == 2, 30,
                lambda: process.log)
    await asyncio.to_thread(send, port, 4)  # both serve again
