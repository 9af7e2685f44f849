"""The config directory: Haraka typing, shipped defaults behind every file, file:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from harakapy.config import Config, ConfigError, IniFile, ListFile
from harakapy.inbound.settings import InboundSettings


def ini(text: str, path: str = "config/x.ini") -> IniFile:
    return IniFile.parse(Path(path), text)


@pytest.mark.parametrize(("word", "expected"), [
    ("true", True), ("YES", True), ("on", True), ("1", True),
    ("false", False), ("No", False), ("off", False), ("0", False),
])
def test_haraka_booleans(word, expected):
    assert ini(f"[main]\nflag = {word}\n").get_bool("main", "flag") is expected


def test_bad_boolean_names_file_line_and_key():
    with pytest.raises(ConfigError) as error:
        ini("[main]\n\nflag = maybe\n").get_bool("main", "flag")
    assert str(error.value).startswith("config/x.ini:3: [main] flag: expected a boolean")


def test_keys_before_any_section_are_main_and_comments_are_skipped():
    parsed = ini("; comment\n# another\nlisten = 1.2.3.4:25\n[Other]\nKey: value\n")
    assert parsed.get("main", "listen") == "1.2.3.4:25"
    assert parsed.get("other", "key") == "value"


def test_line_that_is_not_key_value_is_an_error_with_its_line():
    with pytest.raises(ConfigError) as error:
        ini("[main]\nlisten 1.2.3.4\n")
    assert str(error.value).startswith("config/x.ini:2: expected 'key = value'")


@pytest.mark.parametrize(("text", "reason"), [
    ("n = ten", "expected a whole number, got 'ten'"),
    ("n = -5", "must be at least 0, got -5"),
])
def test_numbers_are_checked(text, reason):
    with pytest.raises(ConfigError, match=reason):
        ini(text).get_int("main", "n", minimum=0)


def test_list_file_skips_comments_and_remembers_lines():
    parsed = ListFile.parse(Path("config/host_list"), "# hosts\n\na.test  # first\nb.test\n")
    assert parsed.values == ["a.test", "b.test"]
    assert [entry.line for entry in parsed] == [3, 4]


def test_missing_files_mean_shipped_defaults(tmp_path):
    (tmp_path / "config").mkdir()
    config = Config.load(tmp_path)
    settings = InboundSettings.from_config(config)
    assert [str(a) for a in settings.listen] == ["127.0.0.1:2525"]
    assert settings.max_message_bytes == 26214400
    assert config.list("plugins").values[0] == "tls"


def test_operator_ini_overrides_key_by_key(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "smtp.ini").write_text("[main]\nmax_recipients = 7\n")
    settings = InboundSettings.from_config(Config.load(tmp_path))
    assert settings.max_recipients == 7
    assert settings.timeout == 300.0  # not set by the operator: the shipped value


def test_operator_list_replaces_shipped_list(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay_acl_allow").write_text("192.0.2.0/24\n")
    assert Config.load(tmp_path).list("relay_acl_allow").values == ["192.0.2.0/24"]


def test_unknown_key_in_core_ini_is_an_error_listing_known_keys(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "smtp.ini").write_text("[main]\nlisen = 127.0.0.1:25\n")
    with pytest.raises(ConfigError) as error:
        InboundSettings.from_config(Config.load(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/config/smtp.ini:2: [main] lisen: unknown key")
    assert "listen" in message


@pytest.mark.parametrize("value", ["127.0.0.1", "1.2.3.4:99999", "[::1:25"])
def test_bad_listen_address(tmp_path, value):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "smtp.ini").write_text(f"listen = {value}\n")
    with pytest.raises(ConfigError, match=r"smtp.ini:1: \[main\] listen"):
        InboundSettings.from_config(Config.load(tmp_path))


def test_ipv6_and_implicit_tls_listeners(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "smtp.ini").write_text(
        "listen = 127.0.0.1:25,[::1]:2525\nlisten_tls = 0.0.0.0:465\n")
    settings = InboundSettings.from_config(Config.load(tmp_path))
    assert [(a.host, a.port, a.implicit_tls) for a in settings.listen] == [
        ("127.0.0.1", 25, False), ("::1", 2525, False), ("0.0.0.0", 465, True)]


def test_non_utf8_file_is_refused_when_read_as_config(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "host_list").write_bytes(b"caf\xe9.test\n")
    (tmp_path / "config" / "cert.der").write_bytes(b"\x30\x82\xff\xfe")  # not config: fine
    config = Config.load(tmp_path)
    with pytest.raises(ConfigError, match="host_list: not UTF-8"):
        config.list("host_list")


def test_editor_debris_is_ignored(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".smtp.ini.swp").write_bytes(b"\x00\xffbinary")
    (tmp_path / "config" / "smtp.ini~").write_text("this is [not valid\n")
    (tmp_path / "config" / "smtp.ini.dpkg-old").write_text("garbage line\n")
    InboundSettings.from_config(Config.load(tmp_path))


def test_missing_config_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config directory does not exist"):
        Config.load(tmp_path / "nope")


def test_derive_builds_once_per_config(tmp_path):
    (tmp_path / "config").mkdir()
    config = Config.load(tmp_path)
    calls = []
    assert config.derive("k", lambda c: calls.append(1) or 42) == 42
    assert config.derive("k", lambda c: calls.append(1) or 43) == 42
    assert calls == [1]
    assert Config.load(tmp_path).derive("k", lambda c: 43) == 43  # a reload rebuilds


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    (tmp_path / "config").mkdir()
    config = Config.load(tmp_path)
    assert config.resolve("tls/cert.pem") == tmp_path / "config" / "tls" / "cert.pem"
    assert config.resolve("/etc/ssl/x.pem") == Path("/etc/ssl/x.pem")
