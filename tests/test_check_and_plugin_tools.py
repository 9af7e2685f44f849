"""``harakapy check``, ``harakapy plugins`` and ``harakapy plugin new``, run as an operator
runs them: the installed command in a subprocess, on config directories written here."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from tests.processes import harakapy

BROKEN_STARTUP = '''
from harakapy import hookimpl


@hookimpl
def startup(server):
    raise RuntimeError("the database is not there")
'''


def init(tmp_path):
    root = tmp_path / "mta"
    done = harakapy("init", str(root))
    assert done.returncode == 0, done.stderr
    return root


def test_the_shipped_directory_passes(tmp_path):
    root = init(tmp_path)
    done = harakapy("check", "-c", str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{root}: ok; plugins: tls, ")


def test_every_error_is_reported_with_file_and_line_and_nothing_starts(tmp_path):
    root = init(tmp_path)
    (root / "config" / "smtp.ini").write_text("[main]\nlisten = 127.0.0.1:2525\n"
                                              "max_connections = many\n")
    (root / "config" / "outbound.ini").write_text("[main]\n\nport = 0\n")
    (root / "config" / "requiretls.ini").write_text("[notices]\nfallback = shred\n")
    (root / "plugins" / "broken.py").write_text(BROKEN_STARTUP)
    with (root / "config" / "plugins").open("a") as plugins:
        plugins.write("broken\n")
    queue = root / "queue"
    queue.rmdir()
    done = harakapy("check", "-c", str(root))
    assert done.returncode == 2
    errors = done.stderr.splitlines()
    assert errors[:4] == [
        f"{root}/config/smtp.ini:3: [main] max_connections: expected a whole number, got 'many'",
        f"{root}/config/outbound.ini:3: [main] port: must be at least 1, got 0",
        f"{root}/config/requiretls.ini:2: [notices] fallback: expected redacted or drop",
        f"{root}/config/plugins:{_line_of(root, 'broken')}: broken: startup failed: "
        "RuntimeError: the database is not there",
    ], done.stderr
    assert errors[4] == f"harakapy: 4 error(s); {root} would not start"
    assert not queue.exists()  # the spool was not touched


def _line_of(root, name: str) -> int:
    lines = (root / "config" / "plugins").read_text().splitlines()
    return lines.index(name) + 1


def test_check_does_not_listen(tmp_path):
    root = init(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (root / "config" / "smtp.ini").write_text(f"[main]\nlisten = 127.0.0.1:{port}\n")
        assert harakapy("check", "-c", str(root)).returncode == 0


def test_plugins_lists_run_order_origin_and_hooks(tmp_path):
    root = init(tmp_path)
    (root / "plugins" / "relay.py").write_text(
        "from harakapy import hookimpl\n\n\n@hookimpl\ndef rcpt(recipient):\n    return None\n")
    done = harakapy("plugins", "-c", str(root), "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    names = [name for name in rows]
    assert names[:3] == ["tls", "rcpt_to.in_host_list", "relay"]
    assert rows["relay"]["origin"] == str(root / "plugins" / "relay.py")  # the operator's
    assert rows["relay"]["hooks"] == ["rcpt"]
    assert rows["mta_sts"]["hooks"] == ["startup", "config_reload", "tls_policy"]
    assert rows["mta_sts"]["background"] == ["refresh", "publish"]
    text = harakapy("plugins", "-c", str(root)).stdout
    assert " 3. relay  (" in text and "hooks: rcpt" in text


def test_plugin_new_writes_a_plugin_and_a_test_that_passes(tmp_path):
    root = init(tmp_path)
    done = harakapy("plugin", "new", "blocklist", "-c", str(root))
    assert done.returncode == 0, done.stderr
    plugin, test = root / "plugins" / "blocklist.py", root / "tests" / "test_blocklist.py"
    assert plugin.is_file() and test.is_file()
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(test)], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 passed" in ran.stdout
    # In config/plugins, with a bad line in its list: check names it.
    with (root / "config" / "plugins").open("a") as plugins:
        plugins.write("blocklist\n")
    (root / "config" / "blocklist").write_text("old@example.com\nnot-an-address\n")
    checked = harakapy("check", "-c", str(root))
    assert checked.returncode == 2
    assert f"{root}/config/blocklist:2: not-an-address: not an address" in checked.stderr


def test_plugin_new_never_overwrites_and_wants_a_name(tmp_path):
    root = init(tmp_path)
    assert harakapy("plugin", "new", "mine", "-c", str(root)).returncode == 0
    again = harakapy("plugin", "new", "mine", "-c", str(root))
    assert again.returncode == 1 and "exists; not overwritten" in again.stderr
    bad = harakapy("plugin", "new", "9lives", "-c", str(root))
    assert bad.returncode == 2 and "is not a plugin name" in bad.stderr
