"""The user docs against the code: every hook, public name, shipped plugin, config key and
command is documented, every link leads somewhere, the example plugins in docs/plugins.md,
docs/hooks.md, docs/tls-policy.md and docs/outbound.md run against the real server, and
the retry schedule worked through in docs/outbound.md is the one the queue computes.

As datasette's test_docs.py: a hook added without its docs, or docs left behind by a
renamed key, fails here rather than misleading an operator.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import re
import shlex
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

import harakapy
from harakapy import Level, QueuedMessage, hookspecs, shipped
from harakapy.cli import build_parser
from harakapy.config import Config, ConfigError, IniFile
from harakapy.outbound.settings import OutboundSettings
from harakapy.outbound.tls_policy import find_policy
from harakapy.plugins import PluginManager
from harakapy.server import MailServer
from tests.harness import (
    ManualClock,
    RawClient,
    eventually,
    running_server,
    sendmail,
    write_config_dir,
)
from tests.outbound_env import free_port_on_all
from tests.servers import ReceivingMTA

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HOOKS_MD = DOCS / "hooks.md"
CONFIG_MD = DOCS / "config.md"
PLUGINS_MD = DOCS / "plugins.md"
OUTBOUND_MD = DOCS / "outbound.md"
TLS_POLICY_MD = DOCS / "tls-policy.md"

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
_HEADING = re.compile(r"^(#{1,6}) (.+)$", re.M)


def hookspec_functions() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items()
            if getattr(fn, "harakapy_spec", None) is not None}


def sections(text: str) -> dict[str, str]:
    """Each heading's text (without the #s) mapped to its body, up to the next heading of
    the same or a higher level."""
    headings = list(_HEADING.finditer(text))
    out = {}
    for i, match in enumerate(headings):
        level = len(match.group(1))
        end = len(text)
        for later in headings[i + 1:]:
            if len(later.group(1)) <= level:
                end = later.start()
                break
        out[match.group(2).strip()] = text[match.end():end]
    return out


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def block_after(text: str, marker: str) -> str:
    """The body of the first fenced block after ``marker``."""
    start = text.index(marker)
    match = _FENCE.search(text, start)
    assert match is not None, f"no code block after {marker!r}"
    return match.group(2)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


# -- (1) hooks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_every_hook_is_documented_with_its_exact_signature(name):
    spec = hookspec_functions()[name]
    expected = list(inspect.signature(spec).parameters)
    headings = {}
    for match in re.finditer(r"^### (\w+)\((.*)\)\s*$", HOOKS_MD.read_text(), re.M):
        headings[match.group(1)] = [arg.strip() for arg in match.group(2).split(",")
                                    if arg.strip()]
    assert name in headings, f"docs/hooks.md has no '### {name}(...)' heading"
    assert headings[name] == expected, (
        f"docs/hooks.md documents {name}({', '.join(headings[name])}), the hookspec is "
        f"{name}({', '.join(expected)})")


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_every_hook_says_whether_it_decides_or_notifies(name):
    spec = hookspec_functions()[name]
    decision = bool(spec.harakapy_spec.get("firstresult"))
    heading = f"{name}({', '.join(inspect.signature(spec).parameters)})"
    body = sections(HOOKS_MD.read_text())[heading]
    kind = "Decision hook" if decision else "Notification hook"
    assert kind in body, f"docs/hooks.md: {name} should say '{kind}'"


def test_hooks_md_documents_no_hook_that_does_not_exist():
    known = set(hookspec_functions())
    documented = re.findall(r"^### (\w+)\(", HOOKS_MD.read_text(), re.M)
    assert set(documented) <= known, f"stale hooks in docs/hooks.md: {set(documented) - known}"


def public_api_rows() -> list[str]:
    """The names in the tables of docs/hooks.md's "The public API" section."""
    body = sections(HOOKS_MD.read_text()).get("The public API")
    assert body is not None, "docs/hooks.md has no '## The public API' section"
    return re.findall(r"^\| `([^`]+)` \|", body, re.M)


@pytest.mark.parametrize("name", sorted(harakapy.__all__))
def test_every_public_name_is_in_the_public_api_section(name):
    assert name in public_api_rows(), (
        f"harakapy.{name} is in __all__ but has no row '| `{name}` | ... |' in "
        f"docs/hooks.md's 'The public API' section")


def test_the_public_api_section_lists_only_public_names_once_each():
    rows = public_api_rows()
    assert sorted(set(rows) - set(harakapy.__all__)) == [], (
        "docs/hooks.md lists names that are not in harakapy.__all__")
    assert len(rows) == len(set(rows)), "a name is listed twice in 'The public API'"


# -- (2) shipped plugins ----------------------------------------------------------------


def shipped_plugin_names() -> list[str]:
    names = []
    for path in shipped.PLUGINS_DIR.rglob("*.py"):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        names.append(path.relative_to(shipped.PLUGINS_DIR).with_suffix("").as_posix())
    return sorted(names)


@pytest.mark.parametrize("name", shipped_plugin_names())
def test_every_shipped_plugin_has_a_page(name):
    page = DOCS / "plugins" / (name.replace("/", ".") + ".md")
    assert page.is_file(), f"shipped plugin {name} has no {page.relative_to(ROOT)}"
    text = page.read_text()
    assert text.startswith(f"# {name}\n"), f"{page.name} should start with '# {name}'"
    assert "\n## Configuration\n" in text, f"{page.name} has no '## Configuration' section"


def test_every_plugin_page_is_for_a_shipped_plugin():
    pages = {p.stem for p in (DOCS / "plugins").glob("*.md")}
    plugins = {name.replace("/", ".") for name in shipped_plugin_names()}
    assert pages <= plugins, f"pages for plugins that are not shipped: {pages - plugins}"


# -- (3) config files and keys ------------------------------------------------------------


def config_section(name: str) -> str:
    body = sections(CONFIG_MD.read_text()).get(f"config/{name}")
    assert body is not None, f"docs/config.md has no '## config/{name}' heading"
    return body


@pytest.mark.parametrize("name", sorted(p.name for p in shipped.CONFIG_DIR.iterdir()
                                        if p.is_file()))
def test_every_shipped_config_file_has_a_section(name):
    config_section(name)


def shipped_ini_keys() -> list[tuple[str, str, str, str]]:
    """``(file, section, key, shipped value)`` for every key of every shipped ini file."""
    out = []
    for path in sorted(shipped.CONFIG_DIR.glob("*.ini")):
        ini = IniFile.parse(path, path.read_text())
        for section in ini.sections():
            for key in ini.keys(section):
                out.append((path.name, section, key, ini.get_str(section, key)))
    return out


@pytest.mark.parametrize(("name", "section", "key", "value"), shipped_ini_keys())
def test_every_shipped_ini_key_is_documented_with_its_default(name, section, key, value):
    body = config_section(name)
    assert f"`[{section}]`" in body, f"docs/config.md: config/{name} does not name [{section}]"
    # A key that several sections have (share) is looked for under its section's own
    # heading, where the file's section has one.
    body = sections(body).get(f"`[{section}]`", body)
    row = re.search(rf"^\| `{re.escape(key)}` \| ([^|]*) \|", body, re.M)
    assert row is not None, f"docs/config.md: config/{name} has no table row for `{key}`"
    documented = row.group(1).strip()
    expected = f"`{value}`" if value else "(empty)"
    assert documented == expected, (
        f"docs/config.md: config/{name} [{section}] {key} documented as {documented}, "
        f"shipped as {expected}")


@pytest.mark.parametrize("name", sorted(p.name for p in shipped.CONFIG_DIR.glob("*.ini")))
def test_every_ini_section_is_documented(name):
    path = shipped.CONFIG_DIR / name
    body = config_section(name)
    for section in IniFile.parse(path, path.read_text()).sections():
        assert f"`[{section}]`" in body


# -- (4) the example plugin ---------------------------------------------------------------


def marked_block(page: Path, comment: str, language: str = "python") -> str:
    """The body of the ```python (or ``language``) block right after the HTML comment
    ``comment``."""
    text = page.read_text()
    assert comment in text, f"{page.name} has no {comment}"
    after = text[text.index(comment) + len(comment):]
    match = _FENCE.match(after.lstrip("\n"))
    assert match is not None and match.group(1) == language, (
        f"{page.name}: {comment} must be followed directly by a ```{language} block")
    return match.group(2)


def marked_example(page: Path, marker: str) -> tuple[str, str]:
    """The ``(name, source)`` of the plugin in the ```python block right after
    ``<!-- example: MARKER -->`` on ``page``; the name is its docstring's first word, and
    the page must say which file it goes in."""
    text = page.read_text()
    source = marked_block(page, f"<!-- example: {marker} -->")
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{page.name}: the {marker} example needs a module docstring naming it"
    name = docstring.split(":", 1)[0].strip()
    assert f"DIR/plugins/{name}.py" in text, f"{page.name} should say where {name} goes"
    return name, source


def example_plugin() -> tuple[str, str]:
    """The example plugin of docs/plugins.md."""
    return marked_example(PLUGINS_MD, "plugin")


def example_dialogue(marker: str = "On the wire") -> list[tuple[str, int, str]]:
    """The dialogue block after ``marker`` in docs/plugins.md as ``(command, code,
    text)``: command and reply lines, alternating."""
    lines = block_after(PLUGINS_MD.read_text(), marker).strip().splitlines()
    steps = []
    for command, reply in zip(lines[::2], lines[1::2], strict=True):
        code, text = reply.split(" ", 1)
        steps.append((command, int(code), text))
    return steps


@pytest.fixture
def example_dir(tmp_path):
    text = PLUGINS_MD.read_text()
    name, source = example_plugin()
    return write_config_dir(
        tmp_path / "example",
        {"plugins": block_after(text, "`DIR/config/plugins`, with the new plugin before"),
         "blocked_recipients": block_after(text, "`DIR/config/blocked_recipients`"),
         "host_list": "example.com\n",
         # 127.0.0.1 must not relay here: the plugin alone has to refuse.
         "relay_acl_allow": "192.0.2.0/24\n"},
        {name: source})


async def replay(port: int, steps: list[tuple[str, int, str]]) -> None:
    """Say each command of a documented dialogue after EHLO and MAIL FROM, and check that
    the server answers as the page shows."""
    client = await RawClient.connect(port)
    try:
        assert (await client.reply())[0] == 220
        assert (await client.command("EHLO client.test"))[0] == 250
        assert await client.command("MAIL FROM:<sender@client.test>") == (250, "2.1.0 Ok")
        for command, code, text in steps:
            assert await client.command(command) == (code, text), command
        await client.command("QUIT")
    finally:
        await client.close()


async def test_example_plugin_refuses_listed_recipients_over_a_real_socket(example_dir,
                                                                           caplog):
    name, _ = example_plugin()
    caplog.set_level(logging.INFO, logger=f"harakapy.plugin.{name}")
    steps = example_dialogue()
    assert any(code == 550 for _, code, _ in steps)
    async with running_server(example_dir) as hp:
        assert name in [plugin.name for plugin in hp.server.plugins.plugins]
        await replay(hp.port, steps)
    refusals = [r.getMessage() for r in caplog.records
                if r.name == f"harakapy.plugin.{name}"]
    assert any("refused blocked recipient <gone@example.com>" in m for m in refusals)


async def test_example_plugin_bad_line_stops_start_with_file_and_line(tmp_path):
    name, source = example_plugin()
    root = write_config_dir(tmp_path / "bad", {
        "plugins": f"{name}\n", "blocked_recipients": "gone@example.com\n\npostmaster\n"},
        {name: source})
    server = MailServer(Config.load(root))
    with pytest.raises(ConfigError) as caught:
        await server.start()
    assert str(caught.value).endswith(
        "blocked_recipients:3: postmaster: expected user@domain or @domain")
    assert server.listeners == []


async def test_example_plugin_bad_line_on_reload_keeps_the_old_list(example_dir):
    async with running_server(example_dir) as hp:
        (example_dir / "config" / "blocked_recipients").write_text("postmaster\n")
        assert await hp.server.reload() is False
        client = await RawClient.connect(hp.port)
        try:
            await client.reply()
            await client.command("EHLO client.test")
            await client.command("MAIL FROM:<sender@client.test>")
            code, text = await client.command("RCPT TO:<gone@example.com>")
        finally:
            await client.close()
        assert (code, text[:5]) == (550, "5.1.1")


# -- (4b) the first plugin of docs/plugins.md: at most 15 lines, and it works -------------

FIRST_PLUGIN_MAX_LINES = 15


def first_plugin() -> tuple[str, str]:
    return marked_example(PLUGINS_MD, "first")


def test_the_first_plugin_is_at_most_15_lines():
    # The promise of docs/plugins.md: a working plugin in 15 lines or fewer, every line
    # counted (docstring and blank lines too).
    _, source = first_plugin()
    lines = source.splitlines()
    assert len(lines) <= FIRST_PLUGIN_MAX_LINES, (
        f"the first plugin of docs/plugins.md has {len(lines)} lines")
    assert "@hookimpl" in source and "checked_config(" in source


@pytest.fixture
def first_plugin_dir(tmp_path):
    text = PLUGINS_MD.read_text()
    name, source = first_plugin()
    plugins = block_after(text, "`DIR/config/plugins`, with the new plugin in place of")
    return write_config_dir(
        tmp_path / "first",
        {"plugins": plugins + "queue/discard\n",  # so that accepted mail is taken
         "mailboxes": block_after(text, "`DIR/config/mailboxes`"),
         # 127.0.0.1 must not relay here: the relay plugin would accept every recipient.
         "relay_acl_allow": "192.0.2.0/24\n"},
        {name: source})


async def test_the_first_plugin_accepts_its_mailboxes_and_nobody_else(first_plugin_dir):
    name, _ = first_plugin()
    steps = example_dialogue("a client that does not relay hears")
    assert [code for _, code, _ in steps] == [250, 550]
    async with running_server(first_plugin_dir) as hp:
        assert name in [plugin.name for plugin in hp.server.plugins.plugins]
        await replay(hp.port, steps)

        # A whole message, as a client sends it: the listed mailbox gets it, the other
        # address is refused, and the message is queued for the one accepted.
        refused = await sendmail(hp.port, "sender@client.test",
                                 ["Bob@example.com", "mallory@example.com"],
                                 b"Subject: first plugin\r\n\r\nhello\r\n")
        assert refused == {"mallory@example.com": (550, b"5.7.1 Relaying denied")}

        # SIGHUP reads the list again: checked_config builds it for the new config.
        (first_plugin_dir / "config" / "mailboxes").write_text("mallory@example.com\n")
        assert await hp.server.reload()
        refused = await sendmail(hp.port, "sender@client.test",
                                 ["alice@example.com", "mallory@example.com"],
                                 b"Subject: after the reload\r\n\r\nhello\r\n")
        assert refused == {"alice@example.com": (550, b"5.7.1 Relaying denied")}


# -- (4c) docs/plugins.md: the state folder, a background task, server.submit -------------


class WatchedClock(ManualClock):
    """A :class:`ManualClock` that also records who waits on it, so that a test moves time
    only once the task it means to wake is asleep (a wake-up before that would be lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[str, float]] = []

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        self.waits.append((task.get_name() if task else "", seconds))
        await super().sleep(seconds)

    def waits_of(self, task_name: str) -> int:
        return sum(1 for name, _ in self.waits if name == task_name)


def greylist_plugin() -> tuple[str, str]:
    return marked_example(PLUGINS_MD, "greylist")


def test_the_background_task_shown_is_the_greylist_plugins_own():
    # docs/plugins.md shows the prune task twice: in the whole plugin, and under
    # "Background tasks". They must not drift apart.
    _, source = greylist_plugin()
    excerpt = marked_block(PLUGINS_MD, "<!-- excerpt: greylist -->")
    assert excerpt in source


def greylist_rows(root: Path) -> list[tuple[str, str, str]]:
    path = root / "state" / "rcpt_to.greylist" / "greylist.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT ip, sender, recipient FROM triples").fetchall()


async def rcpt_after_mail(port: int, recipient: str) -> tuple[int, str]:
    client = await RawClient.connect(port)
    try:
        await client.reply()
        await client.command("EHLO client.test")
        assert await client.command("MAIL FROM:<sender@client.test>") == (250, "2.1.0 Ok")
        return await client.command(f"RCPT TO:<{recipient}>")
    finally:
        await client.close()


async def test_greylist_keeps_triples_in_its_state_folder_and_prunes_them(tmp_path, caplog):
    text = PLUGINS_MD.read_text()
    name, source = greylist_plugin()
    ini = block_after(text, "`DIR/config/greylist.ini`")
    delay = IniFile.parse(Path("greylist.ini"), ini).get_float("main", "delay")
    root = write_config_dir(tmp_path / "greylist", {
        "plugins": block_after(text, "`DIR/config/plugins`, with the plugin before"),
        "greylist.ini": ini,
        "host_list": "example.com\n",
        "relay_acl_allow": "192.0.2.0/24\n",  # 127.0.0.1 is an outside client here
    }, {name: source})
    first, retry = example_dialogue("at its first attempt and again six minutes later")
    assert (first[1], retry[1]) == (451, 250) and first[0] == retry[0]
    assert delay < 360  # "six minutes later" is after the delay
    caplog.set_level(logging.INFO, logger=f"harakapy.plugin.{name}")
    clock = WatchedClock()
    prune = f"{name}.prune"
    async with running_server(root, clock=clock) as hp:
        assert hp.server.background.running == [prune]
        # The first run (right after startup) is over once the task waits for the next.
        await eventually(lambda: clock.waits_of(prune) == 1)
        assert (prune, 3600) in clock.waits  # every=3600

        client = await RawClient.connect(hp.port)
        try:
            await client.reply()
            await client.command("EHLO client.test")
            await client.command("MAIL FROM:<sender@client.test>")
            assert await client.command(first[0]) == (first[1], first[2])
            folder = root / "state" / name
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert greylist_rows(root) == [("127.0.0.1", "sender@client.test",
                                            "alice@example.com")]
            clock.advance(360)
            assert await client.command(retry[0]) == (retry[1], retry[2])
        finally:
            await client.close()

    # The triple is on disk, so a restarted server still lets it through.
    async with running_server(root, clock=clock) as hp:
        await eventually(lambda: clock.waits_of(prune) == 2)
        assert await rcpt_after_mail(hp.port, "alice@example.com") == (250, "2.1.5 Ok")
        assert not any("forgot" in r.getMessage() for r in caplog.records)

        # 36 days without an attempt: the hourly run forgets the triple, and its next
        # attempt is greylisted again.
        clock.advance(36 * 86400 + 3600)
        await eventually(lambda: clock.waits_of(prune) == 3)
        assert [r.getMessage() for r in caplog.records if r.name == f"harakapy.plugin.{name}"
                ] == ["forgot 1 triples not seen for 36 days"]
        assert greylist_rows(root) == []
        assert await rcpt_after_mail(hp.port, "alice@example.com") == (first[1], first[2])


ROUTE_PLUGIN = '''
from harakapy import hookimpl


@hookimpl
def get_mx(server):
    return server.config.value("route")  # every domain, to the test's receiving server
'''


async def test_the_submit_example_mails_the_postmaster_of_each_bounce(config_dir, caplog):
    name, source = marked_example(PLUGINS_MD, "submit")
    caplog.set_level(logging.INFO, logger=f"harakapy.plugin.{name}")
    port = free_port_on_all()
    root = config_dir({
        "me": "mx.harakapy.test\n",
        "plugins": f"relay\nroute\n{name}\n",
        "route": f"127.0.0.2:{port}\n",
        # No DNS at all: the route is the only next hop.
        "dns.ini": "[main]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.5\n",
    }, {name: source, "route": ROUTE_PLUGIN})
    refuse = {"gone@else.test": "550 5.1.1 no such user"}
    async with (ReceivingMTA("127.0.0.2", port, rcpt_reply=refuse.get) as mta,
                running_server(root) as hp):
        await sendmail(hp.port, "alice@client.test", ["gone@else.test"],
                       b"Subject: to nobody\r\n\r\nhello\r\n")

        def received(recipient: str) -> list:
            return [m for m in mta.messages if m.recipients == [recipient]]

        await eventually(lambda: received("alice@client.test")
                         and received("postmaster@mx.harakapy.test"))
        (dsn,) = received("alice@client.test")
        assert b"Final-Recipient: rfc822; gone@else.test" in dsn.data
        (notice,) = received("postmaster@mx.harakapy.test")
        assert notice.sender == "<>"
        assert b"\r\nSubject: Undelivered mail: " in notice.data
        assert b"from <alice@client.test>" in notice.data
        assert b"  <gone@else.test>\r\n" in notice.data
        assert b"\r\nDate: " in notice.data and b"\r\nMessage-ID: <" in notice.data
    logged = [r.getMessage() for r in caplog.records if r.name == f"harakapy.plugin.{name}"]
    assert len(logged) == 1 and "notice to postmaster@mx.harakapy.test queued as" in logged[0]


# -- docs/hooks.md: the background task example ----------------------------------------


async def test_hooks_md_background_example_logs_the_hourly_count(config_dir, caplog):
    source = block_after(HOOKS_MD.read_text(), "counts the messages that reach the `queue` hook")
    caplog.set_level(logging.INFO, logger="harakapy.plugin.stats")
    clock = WatchedClock()
    # Local mail (127.0.0.1 does not relay here) to example.com reaches the queue hook:
    # stats counts it, then queue/discard takes it.
    root = config_dir({"plugins": "rcpt_to.in_host_list\nstats\nqueue/discard\n",
                       "host_list": "example.com\n", "relay_acl_allow": "192.0.2.0/24\n"},
                      {"stats": source})

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "harakapy.plugin.stats"]

    async with running_server(root, clock=clock) as hp:
        await eventually(lambda: clock.waits_of("stats.hourly_count") == 1)
        assert lines() == ["0 messages reached the queue hook in the last hour"]
        for _ in range(2):
            await sendmail(hp.port, "a@client.test", ["b@example.com"], b"\r\nhello\r\n")
        clock.advance(3600)
        await eventually(lambda: clock.waits_of("stats.hourly_count") == 2)
        assert lines()[1:] == ["2 messages reached the queue hook in the last hour"]


# -- docs/tls-policy.md: a policy plugin that strengthens the others' ------------------------


async def test_tls_policy_md_stricter_plugin_asks_the_plugins_after_it(config_dir):
    source = block_after(TLS_POLICY_MD.read_text(),
                         "A plugin can make the others' answer stricter")
    root = config_dir({"plugins": "payroll_tls\ntls_require\n",
                       "tls_policy": "example.com encrypt\n"}, {"payroll_tls": source})
    server = MailServer(Config.load(root))
    await server.prepare()  # as harakapy tls-policy does: plugins ready, no listener

    async def policy(sender: str):
        message = QueuedMessage(id="1", sender=sender, recipients=[], arrival=0.0, size=0)
        return await find_policy(server.plugins, server.config, "example.com", [],
                                 routed=False, message=message)

    payroll, other = await policy("payroll@corp.test"), await policy("alice@corp.test")
    assert (other.level, other.decided_by) == (Level.ENCRYPT, "tls_require")
    assert payroll.level == Level.VERIFY
    assert payroll.decided_by == "payroll_tls"
    assert payroll.reason.startswith("payroll mail: at least verify; config/tls_policy:1")



# -- every python example that defines hooks loads as a plugin ------------------------------


def hook_examples() -> list[tuple[str, int, str]]:
    """Every ```python block on every page (hooks.md, plugins.md, outbound.md, the plugin
    pages, the README) that imports from harakapy and defines a hook, with ``@hookimpl``
    or ``checked_config``. Excerpts of a plugin shown elsewhere whole import nothing."""
    out = []
    for page in doc_files():
        name = page.relative_to(ROOT).as_posix()
        for number, (language, body) in enumerate(fenced_blocks(page.read_text())):
            if (language == "python" and "from harakapy import" in body
                    and ("@hookimpl" in body or "checked_config(" in body)):
                out.append((name, number, body))
    return out


def test_outbound_md_examples_are_among_the_hook_examples():
    pages = {page for page, _, _ in hook_examples()}
    assert {"docs/hooks.md", "docs/plugins.md", "docs/outbound.md"} <= pages


@pytest.mark.parametrize(("page", "number", "source"), hook_examples(),
                         ids=[f"{page}-{number}" for page, number, _ in hook_examples()])
def test_hook_examples_load_as_plugins(page, number, source, config_dir):
    # pluggy checks each function against its hookspec: a misspelt hook or argument in an
    # example fails here.
    root = config_dir({"plugins": "example\n"}, {"example": source})
    manager = PluginManager.load(Config.load(root))
    assert manager.plugins[0].name == "example"
    assert manager.pm.get_hookcallers(manager.plugins[0].module), (
        f"{page} block {number} implements no hook")


# -- (5) commands -----------------------------------------------------------------------

_SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>&1"}


def documented_commands() -> list[tuple[str, str]]:
    """``(file, line)`` for every line of a non-Python code block that runs harakapy."""
    out = []
    for path in doc_files():
        for language, body in fenced_blocks(path.read_text()):
            if language == "python":
                continue
            for line in body.splitlines():
                if re.search(r"(?<![\w./-])harakapy\s+[a-z-]", line):
                    out.append((path.relative_to(ROOT).as_posix(), line.strip()))
    return out


def test_docs_show_commands():
    assert any("harakapy init" in line for _, line in documented_commands())


@pytest.mark.parametrize(("path", "line"), documented_commands())
def test_documented_commands_exist_and_parse(path, line):
    parser = build_parser()
    subcommands = next(action.choices for action in parser._actions
                       if getattr(action, "choices", None) and action.dest == "command")
    for word in re.findall(r"(?<![\w./-])harakapy\s+([a-z][\w-]*)", line):
        assert word in subcommands, f"{path}: 'harakapy {word}' is not a subcommand"
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return  # not a shell line (a log or error message quoting a command)
    for i, token in enumerate(tokens):
        if token.rsplit("/", 1)[-1] != "harakapy":
            continue
        args = []
        for arg in tokens[i + 1:]:
            if arg in _SHELL_OPERATORS:
                break
            args.append(arg)
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{path}: 'harakapy {' '.join(args)}' does not parse (exit {exc.code})")


# -- (6) links ---------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation other than ``-`` and ``_``
    dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose = _FENCE.sub("", page.read_text())  # a "# comment" in a code block is no heading
    return {anchor(match.group(2)) for match in _HEADING.finditer(prose)}


def relative_links() -> list[tuple[str, str]]:
    out = []
    for page in doc_files():
        prose = _FENCE.sub("", page.read_text())
        for target in _LINK.findall(prose):
            if not re.match(r"^[a-z]+:", target):  # https:, mailto:
                out.append((page.relative_to(ROOT).as_posix(), target))
    return out


@pytest.mark.parametrize(("page", "target"), relative_links())
def test_relative_links_lead_to_a_page_and_heading(page, target):
    path, _, fragment = target.partition("#")
    destination = (ROOT / page).parent / path if path else ROOT / page
    assert destination.is_file(), f"{page}: link to {target}: no such file"
    if fragment:
        assert fragment in anchors(destination), (
            f"{page}: link to {target}: {destination.name} has no such heading")


# -- (7) docs/outbound.md: settings, retry schedule, example plugins -------------------------


def shipped_outbound() -> OutboundSettings:
    return OutboundSettings.from_config(Config.load(None))


@pytest.mark.parametrize(("key", "value"), [
    (key, value) for name, _, key, value in shipped_ini_keys() if name == "outbound.ini"])
def test_outbound_md_lists_every_outbound_ini_key_with_its_default(key, value):
    body = sections(OUTBOUND_MD.read_text())["Settings"]
    row = re.search(rf"^\| `{re.escape(key)}` \| ([^|]*) \|", body, re.M)
    assert row is not None, f"docs/outbound.md: Settings has no row for `{key}`"
    expected = f"`{value}`" if value else "(empty)"
    assert row.group(1).strip() == expected, (
        f"docs/outbound.md: `{key}` documented as {row.group(1).strip()}, shipped as "
        f"{expected}")


@pytest.mark.parametrize("key", [key for name, _, key, _ in shipped_ini_keys()
                                 if name == "outbound.ini"])
def test_an_empty_outbound_ini_value_means_the_shipped_default(key, config_dir):
    # config.md: "An empty value (key =) means the built-in default". The built-in
    # default must then be the documented (shipped) one, or an error that says so.
    root = config_dir({"outbound.ini": f"[main]\n{key} =\n"})
    try:
        settings = OutboundSettings.from_config(Config.load(root))
    except ConfigError:
        body = config_section("outbound.ini")
        row = re.search(rf"^\| `{re.escape(key)}` \|[^\n]*", body, re.M)
        assert row is not None and "empty value is an error" in row.group(0), (
            f"`{key} =` is an error; docs/config.md should say so")
        return
    assert settings == shipped_outbound()


def duration(text: str) -> float:
    """``0``, ``5m``, ``1h 15m``, ``5d 0h 15m`` in seconds."""
    text = text.strip()
    if text == "0":
        return 0.0
    parts = re.findall(r"(\d+)([dhm])", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return float(sum(int(n) * {"d": 86400, "h": 3600, "m": 60}[u] for n, u in parts))


def attempt_times(settings: OutboundSettings, count: int) -> list[float]:
    """When attempts 1..count start after arrival, if each fails at once: the queue waits
    ``settings.backoff(n)`` after the n-th failed attempt."""
    times = [0.0]
    while len(times) < count:
        times.append(times[-1] + settings.backoff(len(times)))
    return times


def test_worked_retry_schedule_is_the_queues():
    settings = shipped_outbound()
    body = sections(OUTBOUND_MD.read_text())["Retries and expiry"]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \|$", body, re.M)
    assert len(rows) >= 8
    times = attempt_times(settings, max(int(n) for n, _, _ in rows))
    for number, wait, after in rows:
        n = int(number)
        expected_wait = 0.0 if n == 1 else settings.backoff(n - 1)
        assert duration(wait) == expected_wait, f"attempt {n}: waits {wait}"
        assert duration(after) == times[n - 1], f"attempt {n}: at {after}"
    # The last row is the attempt at which the queue gives up: the first one starting at or
    # after max_queue_lifetime (the queue checks the lifetime after each attempt).
    last = int(rows[-1][0])
    assert times[last - 1] >= settings.max_queue_lifetime > times[last - 2]
    before = re.search(r"Attempt\s+(\d+)\s+\(at\s+([\d dhm]+)\)\s+is\s+still\s+inside",
                       body)
    assert before is not None and int(before.group(1)) == last - 1
    assert duration(before.group(2)) == times[last - 2]
    warned = re.search(r"with\s+`delay_warning = (\w+)`\s+the\s+notice\s+goes\s+after\s+"
                       r"attempt\s+(\d+)", body)
    assert warned is not None
    first_late = next(n for n, at in enumerate(times, start=1)
                      if at >= duration(warned.group(1)))
    assert int(warned.group(2)) == first_late


def test_config_md_retry_summary_is_the_queues():
    row = re.search(r"^\| `max_backoff` \|[^\n]*retries at ([^.]*?) after arrival",
                    config_section("outbound.ini"), re.M)
    assert row is not None
    listed = [duration(item) for item in row.group(1).split(", ")]
    assert listed == attempt_times(shipped_outbound(), len(listed) + 1)[1:]


OUTBOUND_EXAMPLES = ("routes", "delivery_log", "bounce")


@pytest.mark.parametrize("marker", OUTBOUND_EXAMPLES)
def test_outbound_example_is_a_plugin_named_in_its_docstring(marker):
    name, source = marked_example(OUTBOUND_MD, marker)
    assert "@hookimpl" in source and f"`{name}`" in OUTBOUND_MD.read_text()


async def test_outbound_examples_route_log_and_bounce_real_mail(config_dir, caplog):
    text = OUTBOUND_MD.read_text()
    routes, deliveries, quiet = (marked_example(OUTBOUND_MD, m) for m in OUTBOUND_EXAMPLES)
    caplog.set_level(logging.INFO, logger="harakapy.plugin")
    port = free_port_on_all()
    refuse = {"gone@else.test": "550 5.1.1 no such user",
              "busy@else.test": "451 4.2.0 mailbox busy"}
    root = config_dir({
        "me": "mx.harakapy.test\n",
        "plugins": f"relay\n{routes[0]}\n{deliveries[0]}\n{quiet[0]}\n",
        # The documented file, so that it must parse; the test's routes come after it and
        # win (one route per domain, the last line counts): far.test to the "partner",
        # everything else to the "smarthost".
        "routes": block_after(text, "`DIR/config/routes`")
                  + f"far.test [127.0.0.3]:{port}\n* 127.0.0.2:{port}\n",
        "bounce_quiet": block_after(text, "`DIR/config/bounce_quiet`"),
        # No DNS at all: every next hop must come from the routes.
        "dns.ini": "[main]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.5\n",
        "outbound.ini": "[main]\nconnect_timeout = 2\n",
    }, dict([routes, deliveries, quiet]))
    body = b"Subject: docs\r\n\r\nhello\r\n"
    async with (ReceivingMTA("127.0.0.2", port, rcpt_reply=refuse.get) as smarthost,
                ReceivingMTA("127.0.0.3", port) as partner,
                running_server(root) as hp):
        spool = hp.root / "queue" / "msg"
        await sendmail(hp.port, "alice@client.test", ["bob@far.test"], body)
        await eventually(lambda: partner.messages)
        assert partner.messages[0].recipients == ["bob@far.test"]

        await sendmail(hp.port, "alice@client.test",
                       ["carol@else.test", "gone@else.test", "busy@else.test"], body)
        await eventually(lambda: any(m.recipients == ["alice@client.test"]
                                     for m in smarthost.messages))
        (dsn,) = [m for m in smarthost.messages if m.recipients == ["alice@client.test"]]
        assert dsn.sender == "<>"
        assert dsn.data.startswith(b"Reply-To: <postmaster@mx.harakapy.test>\r\nFrom: ")
        assert b"Final-Recipient: rfc822; gone@else.test" in dsn.data
        assert ["carol@else.test"] in [m.recipients for m in smarthost.messages]

        for sender in ("probe@monitor.example", "someone@news.example"):
            await sendmail(hp.port, sender, ["gone@else.test"], body)

        def quiet_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.name == f"harakapy.plugin.{quiet[0]}"]

        await eventually(lambda: len(quiet_lines()) == 2 and len(list(spool.iterdir())) == 1)
        # Only busy@ is left in the spool, and the quiet senders got no DSN.
        assert not any(set(m.recipients) & {"probe@monitor.example", "someone@news.example"}
                       for m in smarthost.messages)
        assert "no DSN to <probe@monitor.example> for <gone@else.test>" in quiet_lines()[0]

    logged = [r.getMessage() for r in caplog.records
              if r.name == f"harakapy.plugin.{deliveries[0]}"]
    assert any("to=<bob@far.test>, from=<alice@client.test>, relay=127.0.0.3" in line
               and "status=sent (250 " in line for line in logged)
    assert any("to=<busy@else.test>" in line and
               "status=deferred (451 4.2.0 mailbox busy)" in line for line in logged)


# -- docs/requiretls.md ---------------------------------------------------------------------

REQUIRETLS_MD = DOCS / "requiretls.md"


async def test_requiretls_md_plugins_flag_the_mail_they_say_and_no_other(config_dir):
    sender_plugin = marked_block(REQUIRETLS_MD, "<!-- requiretls example: sender -->")
    header_plugin = marked_block(REQUIRETLS_MD, "<!-- requiretls example: header -->")
    root = config_dir({"plugins": "requiretls.legal\nrequiretls.confidential\nrelay\n",
                       "relay_acl_allow": "127.0.0.0/8\n",
                       # nowhere to deliver to: what was accepted stays in the spool
                       "dns.ini": "[main]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.2\n"},
                      {"requiretls.legal": sender_plugin,
                       "requiretls.confidential": header_plugin})
    cases = {
        ("counsel@legal.example.com", b"Subject: a\r\n\r\nx\r\n"): True,
        ("ceo@example.com", b"Subject: b\r\nSensitivity: Company-Confidential\r\n\r\nx\r\n"):
            True,
        ("ceo@example.com", b"Subject: c\r\nSensitivity: Personal\r\n\r\nx\r\n"): False,
        ("ceo@example.com", b"Subject: d\r\n\r\nSensitivity: Company-Confidential\r\n"):
            False,
    }
    async with running_server(root) as hp:
        for sender, body in cases:
            await sendmail(hp.port, sender, ["bob@far.example"], body)
        spool = hp.server.outbound.spool
        flagged = {}
        for message_id in spool.ids():
            message = spool.load(message_id)
            subject = message.read_headers().split(b"Subject: ")[1][:1]
            flagged[subject] = message.requiretls
    assert flagged == {b"a": True, b"b": True, b"c": False, b"d": False}


# -- docs/fleet.md ----------------------------------------------------------------------


def test_fleet_md_example_reaches_a_real_redis_as_its_acl_user(tmp_path):
    """The redis.ini of docs/fleet.md, with its address and password this test's: a real
    redis-server with the ACL user the example names, and `harakapy check` on it."""
    from tests.processes import harakapy as run_harakapy
    from tests.redis_server import RedisServer

    example = marked_block(DOCS / "fleet.md", "<!-- fleet-example -->", "ini")
    ini = IniFile.parse(Path("redis.ini"), example)
    user, node = ini.get_str("main", "username"), ini.get_str("main", "node")
    prefix = ini.get_str("main", "prefix")
    assert user and node and prefix and ini.get_str("main", "password_file")
    server = RedisServer(tmp_path / "redis").start()
    try:
        with server.client() as client:
            client.acl_setuser(user, enabled=True, passwords=["+example-password"],
                               keys=[f"{prefix}*"], commands=["+@all"])
        (tmp_path / "redis.password").write_text("example-password\n")
        text = re.sub(r"^url = .*$", f"url = {server.url}", example, flags=re.M)
        text = re.sub(r"^password_file = .*$", f"password_file = {tmp_path}/redis.password",
                      text, flags=re.M)
        root = write_config_dir(tmp_path / "node", {"redis.ini": text})
        done = run_harakapy("check", "-c", str(root))
        assert done.returncode == 0, done.stderr
        assert f"answers; this node is {node!r}" in done.stderr, done.stderr
    finally:
        server.stop()
