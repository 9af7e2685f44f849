"""What the inbound and outbound halves need of the plugin manager: a way to call hooks.

A structural type, so that they depend on this module and not on ``plugins.py``, which
knows every hookspec and so every type a hook takes. ``PluginManager`` is the one
implementation; plugins get the arguments of their own view filled in by it.
"""

from __future__ import annotations

from typing import Any, Protocol


class HookCaller(Protocol):
    """Calls hooks in ``config/plugins`` order (see ``PluginManager``)."""

    def has(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``."""
        ...

    async def call_first(self, hook: str, **kwargs: object) -> Any:
        """The first answer that is not ``None``; a failure is a temporary refusal."""
        ...

    async def call_first_named(self, hook: str, *, after: str = "",
                               **kwargs: object) -> tuple[Any, str]:
        """:meth:`call_first` with the name of the plugin that answered."""
        ...

    async def call_all(self, hook: str, *, raise_errors: bool = False,
                       **kwargs: object) -> None:
        """Every plugin, answers ignored."""
        ...
