"""The user docs against the code: every hook, shipped plugin, config key and command is
documented, and the example plugin in docs/plugins.md runs against the real server.

As datasette's test_docs.py: a hook added without its docs, or docs left behind by a
renamed key, fails here rather than misleading an operator.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import shlex
from pathlib import Path

import pytest

from harakapy import hookspecs, shipped
from harakapy.cli import build_parser
from harakapy.config import Config, ConfigError, IniFile
from harakapy.plugins import PluginManager
from harakapy.server import Server
from tests.harness import RawClient, running_server, write_config_dir

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HOOKS_MD = DOCS / "hooks.md"
CONFIG_MD = DOCS / "config.md"
PLUGINS_MD = DOCS / "plugins.md"

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


def example_plugin() -> tuple[str, str]:
    """The example plugin's ``(name, source)``; the name is its docstring's first word."""
    text = PLUGINS_MD.read_text()
    marker = "<!-- example: plugin -->"
    assert marker in text
    after = text[text.index(marker) + len(marker):]
    match = _FENCE.match(after.lstrip("\n"))
    assert match is not None and match.group(1) == "python", (
        "the example marker must be followed directly by a ```python block")
    source = match.group(2)
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, "the example plugin needs a module docstring naming it"
    name = docstring.split(":", 1)[0].strip()
    assert f"DIR/plugins/{name}.py" in text, "docs/plugins.md should say where the file goes"
    return name, source


def example_dialogue() -> list[tuple[str, int, str]]:
    """The 'On the wire' block as ``(command, code, text)``."""
    lines = block_after(PLUGINS_MD.read_text(), "On the wire").strip().splitlines()
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
        {"plugins": block_after(text, "`DIR/config/plugins`, with the new plugin"),
         "blocked_recipients": block_after(text, "`DIR/config/blocked_recipients`"),
         "host_list": "example.com\n",
         # 127.0.0.1 must not relay here: the plugin alone has to refuse.
         "relay_acl_allow": "192.0.2.0/24\n"},
        {name: source})


async def test_example_plugin_refuses_listed_recipients_over_a_real_socket(example_dir,
                                                                           caplog):
    name, _ = example_plugin()
    caplog.set_level(logging.INFO, logger=f"harakapy.plugin.{name}")
    steps = example_dialogue()
    assert any(code == 550 for _, code, _ in steps)
    async with running_server(example_dir) as hp:
        assert name in [plugin.name for plugin in hp.server.plugins.plugins]
        client = await RawClient.connect(hp.port)
        try:
            assert (await client.reply())[0] == 220
            assert (await client.command("EHLO client.test"))[0] == 250
            assert await client.command("MAIL FROM:<sender@client.test>") == (250, "2.1.0 Ok")
            for command, code, text in steps:
                assert await client.command(command) == (code, text), command
            await client.command("QUIT")
        finally:
            await client.close()
    refusals = [r.getMessage() for r in caplog.records
                if r.name == f"harakapy.plugin.{name}"]
    assert any("refused blocked recipient <gone@example.com>" in m for m in refusals)


async def test_example_plugin_bad_line_stops_start_with_file_and_line(tmp_path):
    name, source = example_plugin()
    root = write_config_dir(tmp_path / "bad", {
        "plugins": f"{name}\n", "blocked_recipients": "gone@example.com\n\npostmaster\n"},
        {name: source})
    server = Server(Config.load(root))
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


# -- every python example that defines hooks loads as a plugin ------------------------------


def hook_examples() -> list[tuple[str, int, str]]:
    out = []
    for page in (HOOKS_MD, PLUGINS_MD):
        for number, (language, body) in enumerate(fenced_blocks(page.read_text())):
            if language == "python" and "@hookimpl" in body:
                out.append((page.name, number, body))
    return out


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
