"""``harakapy plugin new NAME``: a plugin to start from, and a test of it that passes.

The plugin is Haraka's ``-p`` skeleton in harakapy's terms: a working ``rcpt`` hook (it
refuses the recipients listed in ``config/<name>``) with its list checked at start and
on SIGHUP, and the other common hooks shown commented out. The test loads the file as
the server does not need to run, and calls the hook with harakapy's own objects.
"""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

PLUGIN = '''"""{name}: refuse the recipients listed in config/{name}, one address per line.

Written by `harakapy plugin new {name}`; add "{name}" to config/plugins (above the
plugins that accept recipients, such as rcpt_to.in_host_list and relay) to use it.
Hook reference: harakapy's docs/hooks.md. Test: python -m pytest tests/test_{name}.py

Settings: config/{name}
"""

from __future__ import annotations

from harakapy import Config, checked_config, deny, hookimpl


def load_refused(config: Config) -> frozenset[str]:
    """config/{name}: the addresses to refuse. A bad line stops the start (and a SIGHUP
    reload keeps the old list) with the file and line named."""
    refused = set()
    for entry in config.list("{name}"):
        if "@" not in entry.value:
            raise entry.error(entry.value, "not an address (local@domain)")
        refused.add(entry.value.lower())
    return frozenset(refused)


# startup and config_reload hooks that run load_refused: checked before mail flows.
startup, config_reload = checked_config("{name}.refused", load_refused)


@hookimpl
def rcpt(recipient, server):
    """Return None to let the next plugin decide, ok() to accept, deny() or denysoft()
    to refuse."""
    if recipient.address.lower() in server.config.derive("{name}.refused", load_refused):
        server.log.info("refused <%s>", recipient.address)
        return deny("mailbox unavailable", enhanced="5.1.1")
    return None


# More hooks, each optional (see docs/hooks.md for their arguments):
#
# @hookimpl
# def connect(connection, server):
#     ...                          # connection.remote_ip; deny() refuses with 554
#
# @hookimpl
# async def data_post(transaction, server):
#     ...                          # transaction.message: the whole message, bytes
#
# @hookimpl
# def delivered(message, recipients, mx, reply, server):
#     ...                          # a notification: the answer is ignored
'''

TEST = '''"""A test of the {name} plugin: its hook called with harakapy's own objects.

Run it with: python -m pytest tests/test_{name}.py
"""

from __future__ import annotations

import importlib.util
import logging
import types
from pathlib import Path

import pytest

from harakapy import Address, Config, ConfigError, Result

PLUGIN_FILE = Path(__file__).resolve().parent.parent / "plugins" / "{name}.py"


def load_plugin():
    spec = importlib.util.spec_from_file_location("{name}", PLUGIN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server_with(tmp_path: Path, listed: str):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "{name}").write_text(listed)
    # What the hook uses of its `server` argument.
    return types.SimpleNamespace(config=Config.load(tmp_path),
                                 log=logging.getLogger("{name}"))


def test_a_listed_recipient_is_refused_and_others_are_left_to_the_next_plugin(tmp_path):
    plugin = load_plugin()
    server = server_with(tmp_path, "# nobody reads this mailbox\\nold@example.com\\n")
    refused = plugin.rcpt(Address("Old", "example.com"), server)
    assert isinstance(refused, Result) and refused.enhanced == "5.1.1"
    assert plugin.rcpt(Address("new", "example.com"), server) is None


def test_a_bad_line_names_the_file_and_line(tmp_path):
    plugin = load_plugin()
    server = server_with(tmp_path, "old@example.com\\nnot-an-address\\n")
    with pytest.raises(ConfigError) as error:
        plugin.load_refused(server.config)
    assert error.value.line == 2
'''


def plugin_source(name: str) -> str:
    return PLUGIN.replace("{name}", name)


def test_source(name: str) -> str:
    return TEST.replace("{name}", name)
