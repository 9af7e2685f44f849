"""The config directory: ini, list and single-value files, with the shipped defaults behind them.

Rules:

1. A file the operator did not write means the shipped file of the same name. In an ini
   file, each key the operator did not set keeps the shipped value; a list or value file
   replaces the shipped one whole.
2. Every value remembers its file and line, so any error says ``path:line: key: why``.
3. A :class:`Config` never changes after it is loaded. SIGHUP loads a new one and swaps it
   in only when it is valid; things derived from a config (:meth:`Config.derive`) are
   cached on it and so are rebuilt exactly when the config is.

This module knows file formats and Haraka's typing. It does not know what any key means.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from harakapy import shipped

T = TypeVar("T")

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


_DEBRIS_SUFFIXES = (".swp", ".swo", ".swx", ".bak", ".orig", ".rej", ".tmp", ".dpkg-old",
                    ".dpkg-new", ".dpkg-dist", ".rpmnew", ".rpmsave")


def _is_editor_debris(name: str) -> bool:
    # Editors and package managers leave these beside the files an operator edits; a
    # reload must not trip over vim's swap file.
    return name.startswith(".") or name.endswith("~") or name.endswith(_DEBRIS_SUFFIXES)


class ConfigError(Exception):
    """The operator's configuration is wrong; the message names file, line and key.

    :param path: The file at fault.
    :param line: Its 1-based line number, or 0 when the fault is not on one line.
    :param key: The key (or entry) at fault, if any.
    :param reason: What is wrong and, where it helps, what was expected.
    """

    def __init__(self, path: Path | str, line: int, key: str | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.key = key
        self.reason = reason
        where = f"{self.path}:{line}" if line else str(self.path)
        what = f" {key}:" if key else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One value as it was read, with where it came from."""

    value: str
    path: Path
    line: int

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.path, self.line, key, reason)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SECTION = re.compile(r"^\[\s*([^\]]+?)\s*\]$")
_KEY_VALUE = re.compile(r"^([^=:\s][^=]*?)\s*[=:]\s*(.*)$")


def _strip_comment(line: str) -> str:
    stripped = line.strip()
    if stripped.startswith(("#", ";")):
        return ""
    return stripped


class IniFile:
    """A parsed ini file: ``[section]`` then ``key = value``; keys before any section are
    in ``main``; ``#`` and ``;`` start comment lines; keys are case-insensitive."""

    def __init__(self, name: str, sections: dict[str, dict[str, Entry]],
                 path: Path) -> None:
        self.name = name
        self.path = path
        self._sections = sections

    @classmethod
    def parse(cls, path: Path, text: str, *, name: str | None = None,
              base: IniFile | None = None) -> IniFile:
        """Parse ``text`` read from ``path``, on top of ``base`` (the shipped defaults)."""
        sections: dict[str, dict[str, Entry]] = {}
        if base is not None:
            sections = {s: dict(keys) for s, keys in base._sections.items()}
        section = "main"
        for number, raw in enumerate(text.splitlines(), start=1):
            line = _strip_comment(raw)
            if not line:
                continue
            if match := _SECTION.match(line):
                section = match.group(1).lower()
                sections.setdefault(section, {})
                continue
            match = _KEY_VALUE.match(line)
            if match is None:
                raise ConfigError(path, number, None,
                                  f"expected 'key = value' or '[section]', got {raw.strip()!r}")
            key, value = match.group(1).strip().lower(), match.group(2).strip()
            sections.setdefault(section, {})[key] = Entry(value, path, number)
        return cls(name or path.name, sections, path)

    def sections(self) -> list[str]:
        return list(self._sections)

    def keys(self, section: str) -> list[str]:
        return list(self._sections.get(section, {}))

    def section(self, section: str) -> dict[str, str]:
        """All keys of ``section`` as plain strings (empty when there is no such section)."""
        return {k: e.value for k, e in self._sections.get(section, {}).items()}

    def entry(self, section: str, key: str) -> Entry | None:
        return self._sections.get(section, {}).get(key.lower())

    def error(self, section: str, key: str, reason: str) -> ConfigError:
        """A :class:`ConfigError` pointing at ``[section] key``, wherever it was set."""
        entry = self.entry(section, key)
        if entry is None:
            return ConfigError(self.path, 0, f"[{section}] {key}", reason)
        return entry.error(f"[{section}] {key}", reason)

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        entry = self.entry(section, key)
        return default if entry is None else entry.value

    def get_str(self, section: str, key: str, default: str = "") -> str:
        value = self.get(section, key)
        return default if value is None else value

    def get_bool(self, section: str, key: str, default: bool = False) -> bool:
        value = self.get(section, key)
        if value is None or value == "":
            return default
        word = value.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise self.error(section, key, f"expected a boolean (true/yes/on/1 or "
                                       f"false/no/off/0), got {value!r}")

    def get_int(self, section: str, key: str, default: int = 0, *,
                minimum: int | None = None) -> int:
        value = self.get(section, key)
        if value is None or value == "":
            return default
        try:
            number = int(value.replace("_", ""))
        except ValueError:
            raise self.error(section, key, f"expected a whole number, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise self.error(section, key, f"must be at least {minimum}, got {number}")
        return number

    def get_float(self, section: str, key: str, default: float = 0.0, *,
                  minimum: float | None = None) -> float:
        value = self.get(section, key)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise self.error(section, key, f"expected a number, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise self.error(section, key, f"must be at least {minimum}, got {number}")
        return number

    def get_port(self, section: str, key: str, default: int) -> int:
        """A TCP port, 1 to 65535."""
        port = self.get_int(section, key, default, minimum=1)
        if port > 65535:
            raise self.error(section, key, f"port {port} out of range (1-65535)")
        return port

    def get_duration(self, section: str, key: str, default: float = 0.0) -> float:
        """Seconds, written as a number (seconds) or with a unit: ``90s``, ``5m``, ``1h``,
        ``5d``."""
        value = self.get(section, key)
        if value is None or value == "":
            return default
        match = _DURATION.match(value.strip().lower())
        if match is None:
            raise self.error(section, key, f"expected a duration such as 300, 5m, 1h or 5d, "
                                           f"got {value!r}")
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]

    def get_address(self, section: str, key: str, default: str) -> tuple[str, int]:
        """A listener's ``address:port`` (an IP address; ``[::1]:PORT`` for IPv6), as
        ``(address, port)``; empty means ``default``."""
        text = (self.get_str(section, key, default).strip() or default)
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        example = f"{default}, [::1]:{default.rpartition(':')[2]}"
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            raise self.error(section, key, f"{text!r} is not address:port "
                                           f"({example})") from None
        if not sep or not 0 < number < 65536:
            raise self.error(section, key, f"{text!r} is not address:port")
        return host, number

    def get_list(self, section: str, key: str, default: list[str] | None = None) -> list[str]:
        """A comma-separated value as a list of stripped, non-empty items."""
        value = self.get(section, key)
        if value is None:
            return list(default or [])
        return [item.strip() for item in value.split(",") if item.strip()]

    def check_known(self, known: IniFile) -> None:
        """Refuse keys that ``known`` (the shipped file) does not have: a typo such as
        ``lisen`` would otherwise be silently ignored."""
        for section, keys in self._sections.items():
            for key, entry in keys.items():
                if known.entry(section, key) is None:
                    choices = ", ".join(known.keys(section)) or "none"
                    raise entry.error(f"[{section}] {key}",
                                      f"unknown key (known in [{section}]: {choices})")


class ListFile:
    """A list file: one entry per line; ``#`` starts a comment, blank lines are skipped."""

    def __init__(self, entries: list[Entry], path: Path) -> None:
        self.entries = entries
        self.path = path

    @classmethod
    def parse(cls, path: Path, text: str) -> ListFile:
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if line:
                entries.append(Entry(line, path, number))
        return cls(entries, path)

    @property
    def values(self) -> list[str]:
        return [entry.value for entry in self.entries]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class Config:
    """One loaded config directory, read through the small API plugins use.

    :param root: The config directory ``DIR`` (holding ``config/``, ``plugins/``, ``queue/``),
        or ``None`` for the shipped defaults alone.
    :param shipped_dir: Where the shipped defaults are (tests may point elsewhere).
    """

    def __init__(self, root: Path | None, *, shipped_dir: Path | None = None) -> None:
        self.root = root.resolve() if root is not None else None
        self.config_dir = self.root / "config" if self.root is not None else None
        self.shipped_dir = shipped_dir or shipped.CONFIG_DIR
        self._cache: dict[tuple[str, str], object] = {}
        self._derived: dict[str, object] = {}
        self._snapshot: set[str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path | None) -> Config:
        """Load and check the syntax of every file in ``DIR/config``.

        :raises ConfigError: naming the first file and line that is wrong.
        """
        if root is not None and not root.is_dir():
            raise ConfigError(root, 0, None, "config directory does not exist")
        config = cls(root)
        # Read every file now: a loaded config is a snapshot, so that a file edited (or
        # broken) before SIGHUP cannot leak into the config that is still running.
        config._snapshot = set()
        if config.config_dir is not None and config.config_dir.is_dir():
            for path in sorted(config.config_dir.iterdir()):
                if not path.is_file() or _is_editor_debris(path.name):
                    continue
                config._snapshot.add(path.name)
                if path.suffix == ".ini":
                    config.ini(path.name)
                else:
                    # A binary file (a DER certificate, say) is fine until something reads
                    # it as config; then that read names it.
                    with contextlib.suppress(ConfigError):
                        config.text(path.name)
                        config.list(path.name)
        return config

    # -- where files are ---------------------------------------------------------------

    def operator_path(self, name: str) -> Path | None:
        """``DIR/config/name`` if the operator wrote that file."""
        if self.config_dir is None:
            return None
        if self._snapshot is not None and name not in self._snapshot:
            return None
        path = self.config_dir / name
        return path if path.is_file() else None

    def shipped_path(self, name: str) -> Path | None:
        path = self.shipped_dir / name
        return path if path.is_file() else None

    def resolve(self, value: str) -> Path:
        """A path named in a config value: absolute as given, else relative to ``DIR/config``."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        base = self.config_dir if self.config_dir is not None else self.shipped_dir
        return base / path

    def queue_dir(self) -> Path:
        """``DIR/queue``; on the shipped defaults alone, ``queue/`` in the user's state
        directory (``~/.local/state/harakapy/queue`` on Linux)."""
        if self.root is not None:
            return self.root / "queue"
        import platformdirs

        return platformdirs.user_state_path("harakapy") / "queue"

    def state_dir(self) -> Path:
        """``DIR/state``: durable data that is not mail (each plugin's own folder, the
        background-task lock); on the shipped defaults alone, ``state/`` in the user's
        state directory."""
        if self.root is not None:
            return self.root / "state"
        import platformdirs

        return platformdirs.user_state_path("harakapy") / "state"

    def plugins_dir(self) -> Path | None:
        return self.root / "plugins" if self.root is not None else None

    # -- reading -----------------------------------------------------------------------

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(path, 0, None, f"not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise ConfigError(path, 0, None, f"cannot read: {exc.strerror}") from None

    def _cached(self, kind: str, name: str, build: Callable[[], T]) -> T:
        key = (kind, name)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]  # type: ignore[return-value]

    def ini(self, name: str) -> IniFile:
        """``config/<name>`` as an ini file, over the shipped file of the same name."""

        def build() -> IniFile:
            base = None
            if (shipped_path := self.shipped_path(name)) is not None:
                base = IniFile.parse(shipped_path, self._read(shipped_path), name=name)
            operator = self.operator_path(name)
            if operator is None:
                return base or IniFile(name, {}, self.shipped_dir / name)
            return IniFile.parse(operator, self._read(operator), name=name, base=base)

        return self._cached("ini", name, build)

    def shipped_ini(self, name: str) -> IniFile:
        """The shipped ``config/<name>`` alone: the set of known keys."""
        def build() -> IniFile:
            path = self.shipped_path(name)
            if path is None:
                return IniFile(name, {}, self.shipped_dir / name)
            return IniFile.parse(path, self._read(path), name=name)
        return self._cached("shipped-ini", name, build)

    def list(self, name: str) -> ListFile:
        """``config/<name>`` as a list file; the operator's file replaces the shipped one."""

        def build() -> ListFile:
            path = self.operator_path(name) or self.shipped_path(name)
            if path is None:
                return ListFile([], (self.config_dir or self.shipped_dir) / name)
            return ListFile.parse(path, self._read(path))

        return self._cached("list", name, build)

    def text(self, name: str) -> tuple[Path, str] | None:
        """``config/<name>`` as written, for a file with a format of its own (such as
        ``tls_policy``): the operator's file, else the shipped one, else ``None``."""

        def build() -> tuple[Path, str] | None:
            path = self.operator_path(name) or self.shipped_path(name)
            return None if path is None else (path, self._read(path))

        return self._cached("text", name, build)

    def value(self, name: str, default: str | None = None) -> str | None:
        """The first non-comment line of ``config/<name>``, or ``default``."""
        entries = self.list(name).values
        return entries[0] if entries else default

    def derived(self, key: str) -> object | None:
        """What :meth:`derive` built under ``key``, if it built it yet."""
        with self._lock:
            return self._derived.get(key)

    def derive(self, key: str, build: Callable[[Config], T]) -> T:
        """Build something from this config once, and cache it until the config is reloaded.

        Plugins use this for parsed tables (``config.derive("relay.acl", load_acl)``).
        """
        with self._lock:
            if key in self._derived:
                return self._derived[key]  # type: ignore[return-value]
        value = build(self)
        with self._lock:
            return self._derived.setdefault(key, value)  # type: ignore[return-value]
