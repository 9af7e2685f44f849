"""Finding, loading and calling plugins.

pluggy keeps what it does well: the ``hookimpl`` marker, checking each implementation's
arguments against its hookspec, and ``check_pending()`` for misspelt hook names. This module
owns the rest: where a plugin name is looked up, the order plugins run in (``config/plugins``
order, always), and an async dispatcher, because pluggy calls implementations synchronously
and would treat an unawaited coroutine as an answer.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import logging
import re
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from harakapy import hookspecs, metrics, shipped
from harakapy.config import Config, ConfigError, Entry
from harakapy.outbound.mx import MxHost
from harakapy.results import PLUGIN_FAILED, Result, denysoft
from harakapy.tasks import BackgroundTask, tasks_of
from harakapy.tls.policy import Policy
from harakapy.view import Core, Server

if TYPE_CHECKING:
    from harakapy.dispatch import HookCaller

log = logging.getLogger("harakapy.plugins")

hookimpl = pluggy.HookimplMarker("harakapy")


def checked_config(key: str, build: Callable[[Config], object]
                   ) -> tuple[Callable[[Server], None], Callable[[Server], None]]:
    """A plugin's ``startup`` and ``config_reload`` hooks that build its parsed settings
    (``config.derive(key, build)``), so a mistake in them stops the start, or refuses the
    reload, naming the file and line::

        startup, config_reload = checked_config("relay.acl", load_acl)

    Later, ``server.config.derive(key, build)`` returns the same object, built once per
    config.
    """

    def startup(server: Server) -> None:
        server.config.derive(key, build)

    def config_reload(server: Server) -> None:
        server.config.derive(key, build)

    return hookimpl(startup), hookimpl(config_reload)


ENTRY_POINT_GROUP = "harakapy.plugins"

_NAME = re.compile(r"^[A-Za-z_][\w.\-]*(/[A-Za-z_][\w.\-]*)*$")


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A plugin as loaded: its ``config/plugins`` name and where it came from."""

    name: str
    origin: str
    module: object


def _decision_hooks() -> frozenset[str]:
    names = set()
    for name, function in vars(hookspecs).items():
        opts = getattr(function, "harakapy_spec", None)
        if opts is not None and opts.get("firstresult"):
            names.add(name)
    return frozenset(names)


DECISION_HOOKS = _decision_hooks()

# What each decision hook may answer besides None; a Result everywhere else.
_ANSWER_TYPES: dict[str, tuple[type, ...]] = {
    "inbound_tls": (ssl.SSLContext,),
    "get_mx": (Result, MxHost, str, list, tuple),
    "bounce": (Result, bytes),
    "tls_policy": (Result, Policy),
    "dane_authority": (Result, object),
}


def _import_file(name: str, path: Path, generation: int) -> ModuleType:
    safe = re.sub(r"\W", "_", name)
    module_name = f"harakapy_plugin_{generation}_{safe}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


class PluginManager:
    """The plugins named in ``config/plugins``, loaded in order, with the dispatcher.

    :param config: The loaded config; ``config/plugins`` gives names and order.
    :param timeout: Seconds one ``async`` hook implementation may take (``[main]
        plugin_timeout`` in ``smtp.ini``); a sync implementation cannot be stopped.
    """

    _generation = 0

    def __init__(self, config: Config, *, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        self.pm = pluggy.PluginManager("harakapy")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[LoadedPlugin] = []
        self.position: dict[str, int] = {}
        self.entries: dict[str, Entry] = {}
        self.background: list[BackgroundTask] = []
        self._impls: dict[str, list[Any]] = {}
        self._views: dict[str, Server] = {}

    def bind(self, me: str, core: Core) -> None:
        """Give each plugin its view of the server (``server`` in every hook)."""
        hooks: HookCaller = self
        self._views = {plugin.name: Server(plugin.name, self.config, me, hooks, core)
                       for plugin in self.plugins}

    def view(self, plugin_name: str) -> Server:
        """The ``server`` that plugin gets."""
        return self._views[plugin_name]

    def background_tasks(self) -> list[tuple[BackgroundTask, Server]]:
        """Every plugin's ``@background`` tasks, in plugin order, each with its view."""
        return [(task, self._views[task.plugin]) for task in self.background]

    @classmethod
    def load(cls, config: Config, *, timeout: float = 30.0) -> PluginManager:
        """Load every plugin in ``config/plugins``.

        :raises ConfigError: for an unknown name (listing every place searched), a plugin
            that fails to import, or a hook implementation that does not fit its hookspec.
        """
        manager = cls(config, timeout=timeout)
        PluginManager._generation += 1
        for entry in config.list("plugins"):
            manager._load_one(entry, PluginManager._generation)
        manager._check()
        return manager

    def _search_paths(self, name: str) -> list[Path]:
        relative = Path(*name.split("/")).with_name(name.split("/")[-1] + ".py")
        places = []
        if (own := self.config.plugins_dir()) is not None:
            places.append(own / relative)
        places.append(shipped.PLUGINS_DIR / relative)
        return places

    def _load_one(self, entry: Entry, generation: int) -> None:
        name, *extra = entry.value.split()
        if extra:
            raise entry.error(name, f"unexpected text after the plugin name: {' '.join(extra)!r}"
                                    " (one plugin per line)")
        if not _NAME.match(name):
            raise entry.error(name, "not a plugin name (letters, digits, '_', '.', '-', '/')")
        if name in self.position:
            raise entry.error(name, "listed twice")
        searched = []
        for path in self._search_paths(name):
            searched.append(str(path))
            if path.is_file():
                module = self._import(entry, name, lambda p=path: _import_file(name, p,
                                                                                generation))
                self._register(entry, LoadedPlugin(name, str(path), module))
                return
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if point.name == name:
                module = self._import(entry, name, point.load)
                self._register(entry, LoadedPlugin(name, f"entry point {point.value}", module))
                return
        searched.append(f"entry points in group {ENTRY_POINT_GROUP!r}")
        raise entry.error(name, "unknown plugin; searched: " + ", ".join(searched))

    def _import(self, entry: Entry, name: str, load: Any) -> object:
        try:
            return load()
        except Exception as exc:
            log.error('Error importing plugin "%s"', name, exc_info=True)
            raise entry.error(name, f'error importing plugin "{name}": '
                                    f"{type(exc).__name__}: {exc}") from exc

    def _register(self, entry: Entry, plugin: LoadedPlugin) -> None:
        try:
            self.pm.register(plugin.module, name=plugin.name)
        except pluggy.PluginValidationError as exc:
            raise entry.error(plugin.name, str(exc)) from exc
        for impl in self.pm.get_hookcallers(plugin.module) or []:
            for hook_impl in impl.get_hookimpls():
                if hook_impl.plugin_name == plugin.name and (hook_impl.hookwrapper
                                                             or hook_impl.wrapper):
                    raise entry.error(plugin.name, f"hook {impl.name}: wrappers are not "
                                                   "supported; use a plain @hookimpl")
        self.position[plugin.name] = len(self.plugins)
        self.entries[plugin.name] = entry
        self.plugins.append(plugin)
        self.background.extend(tasks_of(plugin.name, plugin.module))

    def _check(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) if exc.plugin else None
            hook = re.search(r"unknown hook '(\w+)'", str(exc))
            reason = (f"hook {hook.group(1)!r} does not exist" if hook else str(exc))
            known = ", ".join(sorted(self.hook_names()))
            raise self.error(name, f"{reason} (known hooks: {known})") from exc

    def error(self, plugin_name: str | None, reason: str) -> ConfigError:
        """A :class:`ConfigError` pointing at the plugin's line in ``config/plugins``."""
        entry = self.entries.get(plugin_name or "")
        if entry is not None:
            return entry.error(plugin_name, reason)
        path = self.config.operator_path("plugins") or self.config.shipped_path("plugins")
        return ConfigError(path or "config/plugins", 0, plugin_name, reason)

    @staticmethod
    def hook_names() -> list[str]:
        return [name for name, fn in vars(hookspecs).items()
                if getattr(fn, "harakapy_spec", None) is not None]

    def implementations(self, hook: str) -> list[Any]:
        """The hook's implementations in ``config/plugins`` order."""
        impls = self._impls.get(hook)
        if impls is None:
            # pluggy calls last-registered first; config/plugins is our only source of
            # order, so sort by it rather than rely on either.
            impls = sorted(getattr(self.pm.hook, hook).get_hookimpls(),
                           key=lambda impl: self.position[impl.plugin_name])
            self._impls[hook] = impls
        return impls

    def has(self, hook: str) -> bool:
        return bool(self.implementations(hook))

    async def _run(self, impl: Any, kwargs: dict[str, object]) -> object:
        if not metrics.enabled():
            return await self._call(impl, kwargs)
        started, failed = time.perf_counter(), True
        try:
            answer = await self._call(impl, kwargs)
            failed = False
            return answer
        finally:
            metrics.hook(impl.plugin_name, impl.function.__name__,
                         time.perf_counter() - started, failed)

    async def _call(self, impl: Any, kwargs: dict[str, object]) -> object:
        # ``server`` is each plugin's own view; callers never pass it.
        view = self._views[impl.plugin_name]
        answer = impl.function(*[view if arg == "server" else kwargs[arg]
                                 for arg in impl.argnames])
        if inspect.isawaitable(answer):
            async with asyncio.timeout(self.timeout):
                answer = await answer
        return answer

    async def call_first(self, hook: str, **kwargs: object) -> Any:
        """Ask plugins in order; the first non-``None`` answer wins.

        A plugin that raises, times out, or answers with something the hook does not take
        (``False`` where a :class:`Result` belongs) is logged with its name, and the answer
        is a temporary failure (:func:`~harakapy.denysoft`), never an accept.
        """
        answer, _plugin = await self.call_first_named(hook, **kwargs)
        return answer

    async def call_first_named(self, hook: str, *, after: str = "",
                               **kwargs: object) -> tuple[Any, str]:
        """:meth:`call_first`, also naming the plugin that answered (empty for none).

        :param after: Ask only the plugins listed after this one: what the rest would
            say, for a plugin that strengthens their answer.
        """
        expected = _ANSWER_TYPES.get(hook, (Result,))
        impls = self.implementations(hook)
        if after:
            names = [impl.plugin_name for impl in impls]
            impls = impls[names.index(after) + 1:] if after in names else impls
        for impl in impls:
            try:
                answer = await self._run(impl, kwargs)
            except Exception:  # not BaseException: cancellation must pass through
                log.exception("plugin %s failed in hook %s", impl.plugin_name, hook)
                return self.failure_result(hook, impl.plugin_name), impl.plugin_name
            if answer is not None and not isinstance(answer, expected):
                log.error("plugin %s answered hook %s with %r; expected %s or None",
                          impl.plugin_name, hook, answer,
                          " or ".join(t.__name__ for t in expected))
                return self.failure_result(hook, impl.plugin_name), impl.plugin_name
            if answer is not None:
                log.debug("hook %s decided by %s: %r", hook, impl.plugin_name, answer)
                return answer, impl.plugin_name
        return None, ""

    async def call_all(self, hook: str, *, raise_errors: bool = False,
                       **kwargs: object) -> None:
        """Call every plugin in order, ignoring answers.

        :param raise_errors: Re-raise a plugin's exception (for ``startup`` and
            ``config_reload``, where a plugin refuses a config by raising); otherwise
            exceptions are logged and the next plugin runs.
        """
        for impl in self.implementations(hook):
            try:
                await self._run(impl, kwargs)
            except Exception:
                if raise_errors:
                    raise
                log.exception("plugin %s failed in hook %s", impl.plugin_name, hook)

    async def call_each(self, hook: str, **kwargs: object) -> list[tuple[str, Exception]]:
        """Call every plugin in order and collect what each raised, by plugin name: for
        ``harakapy check``, which reports every plugin's refusal, not the first."""
        failures = []
        for impl in self.implementations(hook):
            try:
                await self._run(impl, kwargs)
            except Exception as exc:
                failures.append((impl.plugin_name, exc))
        return failures

    def hooks_of(self, plugin: LoadedPlugin) -> list[str]:
        """The hooks ``plugin`` implements, in the order hookspecs.py lists them."""
        mine = {caller.name for caller in self.pm.get_hookcallers(plugin.module) or []}
        return [name for name in self.hook_names() if name in mine]

    @staticmethod
    def failure_result(hook: str, plugin_name: str) -> Result:
        # The client learns nothing of our plugins; the log has the name and traceback.
        return denysoft(PLUGIN_FAILED, enhanced="4.3.0")
