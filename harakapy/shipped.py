"""Where the shipped defaults live: the default config directory and the shipped plugins.

In a wheel they are package data under ``harakapy/_shipped/``; in a source checkout
(editable install, or running the tests) they are the repository's top-level
``config/`` and ``plugins/``. Nothing else in harakapy knows this difference.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    packaged = _PACKAGE / "_shipped" / name
    if packaged.is_dir():
        return packaged
    return _PACKAGE.parent / name


CONFIG_DIR: Path = _shipped("config")
"""The shipped default ``config/`` directory; a missing operator file falls back here."""

PLUGINS_DIR: Path = _shipped("plugins")
"""The shipped plugins, searched after ``DIR/plugins``."""
