"""What a plugin gets: its own view of the server, background tasks, and message submission.

Plugins are written into the config directory's plugins/ as an operator writes them; the
server runs for real, and time moves only when a test moves its clock.
"""

from __future__ import annotations

import logging
import stat
from contextlib import AsyncExitStack

import pytest

from harakapy.clock import Clock
from harakapy.config import Config
from harakapy.plugins import PluginManager
from harakapy.tasks import STANDBY_POLL, TaskRunner, background
from tests.harness import ManualClock, eventually, running_server
from tests.outbound_env import free_port_on_all
from tests.servers import ReceivingMTA

LOCAL = {"plugins": "relay\nprobe\n"}

PROBE = '''
from harakapy import hookimpl


@hookimpl
def startup(server):
    server.notes["view"] = server
    server.log.info("probe plugin started as %s", server.name)
'''


async def test_each_plugin_gets_its_own_view_with_config_me_notes_and_dns(config_dir):
    root = config_dir({**LOCAL, "me": "mx.view.test\n"}, {"probe": PROBE})
    async with running_server(root) as hp:
        view = hp.server.notes["view"]
        assert view.name == "probe"
        assert view.me == "mx.view.test"
        assert view.config.root == root
        assert view.notes is hp.server.notes  # shared by every plugin
        assert view.dns is view.config.derive("outbound.resolver", type(view.dns).from_config)
        assert view.log.name == "harakapy.plugin.probe"
        assert view is not hp.server.plugins.view("relay")
        assert hp.server.plugins.view("relay").log.name == "harakapy.plugin.relay"


async def test_the_view_does_not_reach_listeners_connections_or_the_queue(config_dir):
    root = config_dir(LOCAL, {"probe": PROBE})
    async with running_server(root) as hp:
        view = hp.server.notes["view"]
        for name in ("outbound", "listeners", "connections", "plugins", "spawn", "settings",
                     "tls_context", "reload", "stop"):
            assert not hasattr(view, name), name
        with pytest.raises(AttributeError):
            view.outbound = hp.server.outbound  # slots: nothing can be hung on it


async def test_state_dir_is_the_plugins_own_folder_in_the_state_area(config_dir):
    root = config_dir({"plugins": "relay\nqueue/probe\n"}, {"queue/probe": PROBE})
    async with running_server(root) as hp:
        view = hp.server.notes["view"]
        folder = view.state_dir
        assert folder == root / "state" / "queue.probe"
        assert folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        (folder / "cache.sqlite").write_bytes(b"kept")
    async with running_server(root) as hp:  # it survives a restart
        assert (hp.server.notes["view"].state_dir / "cache.sqlite").read_bytes() == b"kept"


SUBMITTER = '''
from harakapy import background, hookimpl


@background
async def send_report(server):
    queued = await server.submit("reports@view.test", ["postmaster@dest.test"],
                                 b"Subject: daily report\\r\\n\\r\\nall good\\r\\n")
    server.notes["submitted"] = queued.id


@hookimpl
def get_mx(domain, server):
    return server.config.ini("route.ini").get_str("main", "to")
'''


async def test_a_plugin_submits_a_message_that_is_delivered(config_dir):
    port = free_port_on_all()
    root = config_dir({"plugins": "submitter\n", "route.ini": f"[main]\nto = 127.0.0.2:{port}\n"},
                      {"submitter": SUBMITTER})
    async with AsyncExitStack() as stack:
        mta = await stack.enter_async_context(ReceivingMTA("127.0.0.2", port))
        hp = await stack.enter_async_context(running_server(root))
        await eventually(lambda: mta.messages)
        assert mta.messages[0].sender == "reports@view.test"
        assert mta.messages[0].recipients == ["postmaster@dest.test"]
        assert b"Subject: daily report" in mta.messages[0].data
        assert hp.server.notes["submitted"]
        await eventually(lambda: not list((root / "queue" / "msg").iterdir()))


async def test_submit_without_a_running_queue_is_a_spool_error(config_dir):
    from harakapy import SpoolError
    from harakapy.server import MailServer

    root = config_dir(LOCAL, {"probe": PROBE})
    server = MailServer(Config.load(root))
    await server.prepare()  # as harakapy tls-policy does: plugins ready, no queue
    with pytest.raises(SpoolError, match="not running"):
        await server.notes["view"].submit("", ["a@b.test"], b"x\r\n")


# -- background tasks ----------------------------------------------------------------------

TICKER = '''
from harakapy import background


@background(every=60)
async def tick(server):
    server.notes.setdefault("ticks", []).append(server.clock.time())
'''


async def test_a_periodic_task_runs_after_startup_and_then_every_period(config_dir):
    clock = ManualClock()
    root = config_dir({"plugins": "ticker\n"}, {"ticker": TICKER})
    async with running_server(root, clock=clock) as hp:
        ticks = hp.server.notes.setdefault("ticks", [])
        await eventually(lambda: len(ticks) == 1)
        assert ticks == [clock.now]
        clock.advance(59)
        await eventually(lambda: len(ticks) == 1 and hp.server.background.running)
        assert len(ticks) == 1
        clock.advance(1)
        await eventually(lambda: len(ticks) == 2)
        assert ticks[1] - ticks[0] == 60


FLAKY = '''
from harakapy import background


@background(every=3600)
async def flaky(server):
    runs = server.notes.setdefault("runs", [])
    runs.append(server.clock.time())
    if len(runs) <= 2:
        raise RuntimeError(f"broken run {len(runs)}")
'''


async def test_a_task_that_raises_is_logged_and_restarted_with_backoff(config_dir, caplog):
    clock = ManualClock()
    root = config_dir({"plugins": "flaky\n"}, {"flaky": FLAKY})
    caplog.set_level(logging.ERROR, logger="harakapy.tasks")
    async with running_server(root, clock=clock) as hp:
        runs = hp.server.notes.setdefault("runs", [])
        await eventually(lambda: len(runs) == 1 and "broken run 1" in caplog.text)
        assert "plugin flaky background task flaky failed; starting it again in 1s" \
            in caplog.text
        clock.advance(1)
        await eventually(lambda: len(runs) == 2 and "broken run 2" in caplog.text)
        assert "starting it again in 2s" in caplog.text
        clock.advance(1)
        await eventually(lambda: hp.server.background.running)  # still waiting its 2 s
        assert len(runs) == 2
        clock.advance(1)
        await eventually(lambda: len(runs) == 3)
        assert [run - runs[0] for run in runs] == [0, 1, 3]
        assert hp.server.background.running == ["flaky.flaky"]  # the server is fine


def lifecycle_plugin(version: str) -> str:
    return f'''
from harakapy import background


@background
async def watch(server):
    events = server.notes.setdefault("events", [])
    events.append("start {version}")
    try:
        await server.clock.sleep(10**9)
    finally:
        events.append("stop {version}")
'''


async def test_a_reload_restarts_tasks_with_the_new_plugin_and_sigterm_cancels_them(config_dir):
    root = config_dir({"plugins": "watcher\n"}, {"watcher": lifecycle_plugin("v1")})
    async with running_server(root, clock=ManualClock()) as hp:
        events = hp.server.notes.setdefault("events", [])
        await eventually(lambda: events == ["start v1"])
        (root / "plugins" / "watcher.py").write_text(lifecycle_plugin("v2"))
        assert await hp.server.reload()
        await eventually(lambda: events == ["start v1", "stop v1", "start v2"])
    assert events == ["start v1", "stop v1", "start v2", "stop v2"]


async def test_a_refused_reload_keeps_the_running_tasks(config_dir):
    root = config_dir({"plugins": "watcher\n"}, {"watcher": lifecycle_plugin("v1")})
    async with running_server(root, clock=ManualClock()) as hp:
        events = hp.server.notes.setdefault("events", [])
        await eventually(lambda: events == ["start v1"])
        (root / "plugins" / "watcher.py").write_text("this is not python\n")
        assert not await hp.server.reload()
        assert events == ["start v1"]
        assert hp.server.background.running == ["watcher.watch"]


def test_background_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="async def"):
        background(lambda server: None)
    with pytest.raises(ValueError, match="positive"):
        background(every=0)


def views_of(root):
    manager = PluginManager.load(Config.load(root))
    manager.bind("mx.test", _Core())
    return manager.background_tasks()


class _Core:
    def __init__(self) -> None:
        self.notes: dict[str, object] = {}
        self.clock = Clock()

    async def submit(self, sender, recipients, message, *, id=None):
        raise AssertionError("not used")

    async def enqueue(self, transaction):
        raise AssertionError("not used")


BOTH = '''
from harakapy import background


@background
async def once(server):
    server.notes.setdefault("once", 0)
    server.notes["once"] += 1
    await server.clock.sleep(10**9)


@background(per_process=True)
async def everywhere(server):
    server.notes.setdefault("everywhere", 0)
    server.notes["everywhere"] += 1
    await server.clock.sleep(10**9)
'''


async def test_installation_tasks_run_in_one_process_and_move_when_it_stops(config_dir):
    # Two runners over one config directory, as two server processes would be: the lock is
    # a real flock, so the second waits until the first lets go.
    root = config_dir({"plugins": "both\n"}, {"both": BOTH})
    clock = ManualClock()
    lock = Config.load(root).state_dir() / "background.lock"
    first, second = TaskRunner(clock, lock), TaskRunner(clock, lock)
    first_tasks, second_tasks = views_of(root), views_of(root)
    first_notes = first_tasks[0][1].notes
    second_notes = second_tasks[0][1].notes
    try:
        await first.start(first_tasks)
        await second.start(second_tasks)
        await eventually(lambda: first_notes.get("once") == 1 and
                         first_notes.get("everywhere") == 1 and
                         second_notes.get("everywhere") == 1)
        assert sorted(first.running) == ["both.everywhere", "both.once"]
        assert second.running == ["both.everywhere"]
        assert "once" not in second_notes
        assert lock.read_text().strip().isdigit()  # the holder's pid, for an operator

        await first.stop()
        clock.advance(STANDBY_POLL)
        await eventually(lambda: second_notes.get("once") == 1)
        assert sorted(second.running) == ["both.everywhere", "both.once"]
    finally:
        await first.stop()
        await second.stop()


async def test_submit_refuses_addresses_that_could_break_headers(config_dir):
    root = config_dir(LOCAL, {"probe": PROBE})
    async with running_server(root) as hp:
        view = hp.server.notes["view"]
        for sender, recipients in (("", []), ("a@b.test\r\nBcc: x@y.test", ["c@d.test"]),
                                   ("", ["c@d.test\n"]), ("", ["no-domain"]),
                                   ("", ["nul\0@d.test"])):
            with pytest.raises(ValueError):
                await view.submit(sender, recipients, b"Subject: x\r\n\r\nx\r\n")
        assert not list((root / "queue" / "msg").iterdir())
