"""Plugins: discovery, order, first answer wins, sync and async mixed, failures are 4xx.

Each plugin here is a file written into DIR/plugins exactly as an operator would write it.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from harakapy.config import Config, ConfigError
from harakapy.plugins import PluginManager
from tests.harness import CAPTURE_PLUGIN, RawClient, running_server

RECORDER = '''
from harakapy import hookimpl{imports}


@hookimpl
{asyncdef}def rcpt(recipient, server):
    server.notes.setdefault("order", []).append("{name}")
    return {answer}
'''


def recorder(name: str, answer: str = "None", *, is_async: bool = False) -> str:
    imports = ", ok, deny, denysoft, denydisconnect" if answer != "None" else ""
    return RECORDER.format(name=name, answer=answer, asyncdef="async " if is_async else "",
                           imports=imports)


async def rcpt_reply(root, recipient="b@x.test"):
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("MAIL FROM:<a@c.test>")
        reply = await client.command(f"RCPT TO:<{recipient}>")
        closed = await client.closed(timeout=0.5) if reply[0] == 554 else False
        await client.close()
        return reply, hp.server.notes.get("order"), closed


async def test_plugins_run_in_config_order_and_first_answer_wins(config_dir):
    root = config_dir({"plugins": "first\nsecond\nthird\nfourth\n"}, {
        "first": recorder("first"),
        "second": recorder("second", is_async=True),
        "third": recorder("third", 'deny("nope", enhanced="5.1.1")'),
        "fourth": recorder("fourth", "ok()"),
    })
    (code, text), order, _ = await rcpt_reply(root)
    assert (code, text) == (550, "5.1.1 nope")
    assert order == ["first", "second", "third"]  # fourth never asked


async def test_order_follows_config_not_registration(config_dir):
    root = config_dir({"plugins": "b_plugin\na_plugin\n"}, {
        "a_plugin": recorder("a", "ok()"), "b_plugin": recorder("b", 'deny("b first")')})
    (code, _text), order, _ = await rcpt_reply(root)
    assert code == 550 and order == ["b"]


@pytest.mark.parametrize("is_async", [False, True])
async def test_plugin_that_raises_is_a_temporary_failure_never_an_accept(config_dir,
                                                                          is_async, caplog):
    broken = textwrap.dedent(f'''
        from harakapy import hookimpl

        @hookimpl
        {"async " if is_async else ""}def rcpt(recipient):
            raise RuntimeError("boom")
    ''')
    root = config_dir({"plugins": "broken\nrelay\n"}, {"broken": broken})
    (code, text), _, _ = await rcpt_reply(root)
    assert code == 451 and text.startswith("4.3.0")
    assert "boom" not in text  # the client learns nothing of our internals
    assert any("plugin broken failed in hook rcpt" in r.getMessage() and r.exc_info
               for r in caplog.records)


async def test_slow_async_plugin_times_out_as_temporary_failure(config_dir):
    slow = '''
        import asyncio
        from harakapy import hookimpl, ok

        @hookimpl
        async def rcpt(recipient):
            await asyncio.sleep(30)
            return ok()
    '''
    root = config_dir({"smtp.ini": "listen = 127.0.0.1:0\nplugin_timeout = 0.2\n",
                       "plugins": "slow\n"}, {"slow": slow})
    (code, _), _, _ = await rcpt_reply(root)
    assert code == 451


async def test_denydisconnect_answers_and_closes(config_dir):
    root = config_dir({"plugins": "bye\n"}, {"bye": recorder("bye", 'denydisconnect("go")')})
    (code, text), _, closed = await rcpt_reply(root)
    assert (code, text) == (554, "5.7.1 go")
    assert closed


async def test_connect_hook_can_refuse_with_554_and_close(config_dir):
    plugin = '''
        from harakapy import hookimpl, deny

        @hookimpl
        def connect(connection):
            if connection.remote_ip == "127.0.0.1":
                return deny("not from here")
    '''
    root = config_dir({"plugins": "gate\n"}, {"gate": plugin})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        assert await client.reply() == (554, "5.7.1 not from here")
        assert await client.closed()
        await client.close()


async def test_notes_carry_from_connection_hooks_to_queue(config_dir):
    plugin = '''
        from harakapy import hookimpl, ok

        @hookimpl
        def connect(connection):
            connection.notes["seen"] = "connect"

        @hookimpl
        def mail(transaction, connection):
            transaction.notes["from_connect"] = connection.notes["seen"]

        @hookimpl
        def rcpt():
            return ok()
    '''
    root = config_dir({"plugins": "notes\ncapture\n"},
                      {"notes": plugin, "capture": CAPTURE_PLUGIN})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("MAIL FROM:<a@c.test>")
        await client.command("RCPT TO:<b@x.test>")
        await client.command("DATA")
        assert (await client.command("Subject: n\r\n\r\nbody\r\n."))[0] == 250
        await client.close()
        (_, transaction), = hp.captured
        assert transaction.notes == {"from_connect": "connect"}


def test_unknown_plugin_lists_every_place_searched(config_dir):
    root = config_dir({"plugins": "# mine\nnope.not_here\n"})
    with pytest.raises(ConfigError) as error:
        PluginManager.load(Config.load(root))
    message = str(error.value)
    assert message.startswith(f"{root}/config/plugins:2: nope.not_here: unknown plugin")
    assert f"{root}/plugins/nope.not_here.py" in message
    assert "harakapy.plugins" in message  # entry points were searched too


def test_plugin_import_error_names_plugin_and_cause(config_dir):
    root = config_dir({"plugins": "bad\n"}, {"bad": "import no_such_module_here\n"})
    with pytest.raises(ConfigError, match=r'plugins:1: bad: error importing plugin "bad": '
                                          r"ModuleNotFoundError"):
        PluginManager.load(Config.load(root))


def test_misspelt_hook_is_refused(config_dir):
    plugin = "from harakapy import hookimpl\n\n@hookimpl\ndef rcpt_to(recipient):\n    pass\n"
    root = config_dir({"plugins": "typo\n"}, {"typo": plugin})
    with pytest.raises(ConfigError, match="rcpt_to"):
        PluginManager.load(Config.load(root))


def test_unknown_argument_is_refused(config_dir):
    plugin = "from harakapy import hookimpl\n\n@hookimpl\ndef rcpt(rcpt_to):\n    pass\n"
    root = config_dir({"plugins": "wrongarg\n"}, {"wrongarg": plugin})
    with pytest.raises(ConfigError, match="rcpt_to"):
        PluginManager.load(Config.load(root))


def test_wrappers_are_refused(config_dir):
    plugin = ("from harakapy import hookimpl\n\n@hookimpl(wrapper=True)\n"
              "def rcpt(recipient):\n    return (yield)\n")
    root = config_dir({"plugins": "wrap\n"}, {"wrap": plugin})
    with pytest.raises(ConfigError, match="wrappers are not supported"):
        PluginManager.load(Config.load(root))


def test_operator_plugin_shadows_shipped_one_and_folders_work(config_dir):
    root = config_dir({"plugins": "relay\nqueue/discard\n"},
                      {"relay": "# my own relay\n", "queue/discard": "# mine too\n"})
    manager = PluginManager.load(Config.load(root))
    assert [p.origin for p in manager.plugins] == [f"{root}/plugins/relay.py",
                                                   f"{root}/plugins/queue/discard.py"]


def test_entry_point_plugins_are_found(config_dir, tmp_path, monkeypatch):
    # A real installed distribution: a dist-info folder on sys.path, as pip leaves it.
    site = tmp_path / "site"
    (site / "acme_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "acme_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (site / "acme_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[harakapy.plugins]\nacme = acme_plugin\n")
    (site / "acme_plugin.py").write_text(
        "from harakapy import hookimpl, ok\n\n@hookimpl\ndef rcpt():\n    return ok()\n")
    monkeypatch.syspath_prepend(str(site))
    root = config_dir({"plugins": "acme\n"})
    manager = PluginManager.load(Config.load(root))
    assert manager.plugins[0].origin == "entry point acme_plugin"
    sys.modules.pop("acme_plugin", None)


def test_listing_a_plugin_twice_is_an_error(config_dir):
    root = config_dir({"plugins": "relay\nrelay\n"})
    with pytest.raises(ConfigError, match="plugins:2: relay: listed twice"):
        PluginManager.load(Config.load(root))


def test_text_after_a_plugin_name_is_an_error(config_dir):
    root = config_dir({"plugins": "relay timeout=5\n"})
    with pytest.raises(ConfigError, match="plugins:1: relay: unexpected text after the plugin"):
        PluginManager.load(Config.load(root))


def test_misspelt_hook_names_the_plugin_line(config_dir):
    plugin = "from harakapy import hookimpl\n\n@hookimpl\ndef rcpt_to(recipient):\n    pass\n"
    root = config_dir({"plugins": "relay\ntypo\n"}, {"typo": plugin})
    with pytest.raises(ConfigError) as error:
        PluginManager.load(Config.load(root))
    assert str(error.value).startswith(f"{root}/config/plugins:2: typo: hook 'rcpt_to' does "
                                       "not exist (known hooks: ")


@pytest.mark.parametrize("answer", ["False", "True", "'ok'", "250"])
async def test_an_answer_that_is_not_a_result_is_a_temporary_failure(config_dir, answer):
    plugin = f"from harakapy import hookimpl\n\n@hookimpl\ndef mail():\n    return {answer}\n"
    root = config_dir({"plugins": "odd\nrelay\n"}, {"odd": plugin})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        code, text = await client.command("MAIL FROM:<a@c.test>")
        assert (code, text[:5]) == (451, "4.3.0")
        await client.close()


async def test_ok_with_a_message_keeps_the_commands_enhanced_code(config_dir):
    plugin = 'from harakapy import hookimpl, ok\n\n@hookimpl\ndef mail():\n    return ok("fine")\n'
    root = config_dir({"plugins": "mine\n"}, {"mine": plugin})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        assert await client.command("MAIL FROM:<a@c.test>") == (250, "2.1.0 fine")
        await client.close()
