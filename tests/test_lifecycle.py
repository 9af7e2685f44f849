"""startup, config_reload, shutdown and disconnect; reloading plugins from their files."""

from __future__ import annotations

import pytest

from harakapy.config import Config, ConfigError
from harakapy.server import MailServer
from tests.harness import RawClient, running_server

VERSIONED = '''
from harakapy import hookimpl, deny


@hookimpl
def rcpt(recipient):
    return deny("{version}")
'''

LIFECYCLE = '''
from harakapy import ConfigError, hookimpl


@hookimpl
def startup(server):
    if server.config.value("refuse_start"):
        raise ConfigError("config/refuse_start", 1, None, "refused at startup")
    server.notes.setdefault("events", []).append("startup")


@hookimpl
def config_reload(server):
    if server.config.value("refuse_reload"):
        raise ConfigError("config/refuse_reload", 1, None, "refused at reload")
    server.notes.setdefault("events", []).append("config_reload")


@hookimpl
async def disconnect(connection, server):
    server.notes.setdefault("events", []).append("disconnect " + connection.remote_ip)


@hookimpl
def shutdown(server):
    server.notes.setdefault("events", []).append("shutdown")
'''


async def rcpt_answer(port: int) -> tuple[int, str]:
    client = await RawClient.connect(port)
    await client.reply()
    await client.command("EHLO c")
    await client.command("MAIL FROM:<a@c.test>")
    answer = await client.command("RCPT TO:<b@x.test>")
    await client.close()
    return answer


async def test_reload_imports_changed_plugin_files(config_dir):
    root = config_dir({"plugins": "versioned\n"}, {"versioned": VERSIONED.format(version="v1")})
    async with running_server(root) as hp:
        assert await rcpt_answer(hp.port) == (550, "5.7.1 v1")
        (root / "plugins" / "versioned.py").write_text(VERSIONED.format(version="v2"))
        assert await hp.server.reload()
        assert await rcpt_answer(hp.port) == (550, "5.7.1 v2")


async def test_lifecycle_hooks_run_and_a_plugin_can_refuse_a_reload(config_dir):
    root = config_dir({"plugins": "life\n"}, {"life": LIFECYCLE})
    server = MailServer(Config.load(root))
    await server.start()
    client = await RawClient.connect(server.listeners[0][1].sockets[0].getsockname()[1])
    await client.reply()
    await client.command("QUIT")
    await client.close()
    assert await server.reload()
    (root / "config" / "refuse_reload").write_text("yes\n")
    assert not await server.reload()
    assert server.config.value("refuse_reload") is None  # the old config still rules
    await server.stop(grace=1)
    assert server.notes["events"] == ["startup", "disconnect 127.0.0.1", "config_reload",
                                      "shutdown"]


async def test_plugin_can_refuse_to_start(config_dir):
    root = config_dir({"plugins": "life\n", "refuse_start": "yes\n"}, {"life": LIFECYCLE})
    server = MailServer(Config.load(root))
    with pytest.raises(ConfigError, match="refused at startup"):
        await server.start()
    assert server.listeners == []


async def test_implicit_tls_without_a_tls_plugin_is_a_config_error(config_dir):
    root = config_dir({"plugins": "relay\n",
                       "smtp.ini": "listen = 127.0.0.1:0\nlisten_tls = 127.0.0.1:0\n"})
    server = MailServer(Config.load(root))
    with pytest.raises(ConfigError, match=r"smtp.ini:2: \[main\] listen_tls: implicit-TLS"):
        await server.start()


async def test_max_connections_counts_only_open_connections(config_dir):
    root = config_dir({"plugins": "relay\n",
                       "smtp.ini": "listen = 127.0.0.1:0\nmax_connections = 1\n"})
    async with running_server(root) as hp:
        first = await RawClient.connect(hp.port)
        assert (await first.reply())[0] == 220
        second = await RawClient.connect(hp.port)
        assert await second.reply() == (421, "4.3.2 Too many connections, try again later")
        await second.close()
        await first.command("QUIT")
        await first.close()
        third = await RawClient.connect(hp.port)
        assert (await third.reply())[0] == 220
        await third.close()


async def test_tls_plugin_config_errors_name_the_key(config_dir, tmp_path):
    root = config_dir({"plugins": "tls\n",
                       "tls.ini": f"[main]\nkey = {tmp_path}/missing.pem\ncert = c.pem\n"})
    with pytest.raises(ConfigError, match=r"tls.ini:3: \[main\] cert: no such file"):
        await MailServer(Config.load(root)).start()
    root = config_dir({"plugins": "tls\n", "tls.ini": "[main]\nmin_version = TLSv1.1\n"})
    with pytest.raises(ConfigError, match=r"tls.ini:2: \[main\] min_version: TLSv1.2 is"):
        await MailServer(Config.load(root)).start()
    root = config_dir({"plugins": "tls\n", "tls.ini": "[main]\nkey = k.pem\n"})
    with pytest.raises(ConfigError, match=r"tls.ini:2: \[main\] key: key and cert go together"):
        await MailServer(Config.load(root)).start()
    root = config_dir({"plugins": "tls\n", "tls.ini": "[main]\nciphers = NOTHING-AT-ALL\n"})
    with pytest.raises(ConfigError, match=r"\[main\] ciphers: OpenSSL selects no cipher"):
        await MailServer(Config.load(root)).start()


STUBBORN = '''
import asyncio

from harakapy import background

@background
async def stubborn(server):
    server.notes["started"] = True
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass  # as a library that turns a cancellation into its own error does
    server.notes["went_on"] = True
    await asyncio.Event().wait()
'''


async def test_a_background_task_that_swallows_its_cancellation_does_not_hold_the_stop(
        config_dir, caplog):
    import asyncio

    from tests.harness import eventually

    root = config_dir({"plugins": "stubborn\n"}, {"stubborn": STUBBORN})
    async with asyncio.timeout(20):
        async with running_server(root) as running:
            await eventually(lambda: running.server.notes.get("started"))
    assert running.server.notes.get("went_on") is True
    assert any("went on after it was cancelled" in r.getMessage() for r in caplog.records)
