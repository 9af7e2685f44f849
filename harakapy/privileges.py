"""Running as root only as long as it takes to bind the ports: ``[main] user`` and
``group`` of ``config/smtp.ini``.

Rules:

1. Started as root with a user set: the listening sockets are bound first, then the
   process gives up root for good (supplementary groups cleared, then the group, then
   the user; a check that root cannot be had back), and only then loads plugins, opens
   the spool and reads a client's byte. Workers start as that user.
2. The spool and state directories must belong to that user: missing ones are made for
   it; one that belongs to someone else stops the start with the ``chown`` to run.
3. Started as the user already (systemd's ``User=``): nothing to drop. Started as
   someone else without root: an error, since the process cannot become the user.
4. Root with no user set: it runs, with a warning; a mail server reading the Internet's
   bytes as root is one bug away from giving it the machine.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("harakapy.privileges")


class PrivilegeError(Exception):
    """The process cannot run as the configured user (rules 2 and 3)."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    group: str
    uid: int
    gid: int


def identity(user: str, group: str = "") -> Identity:
    """The uid and gid of ``user`` (and ``group``, by default the user's own group).

    :raises KeyError: with a sentence, for a user or group the system does not know.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise KeyError(f"no user {user!r} on this system") from None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeyError(f"no group {group!r} on this system") from None
    else:
        gid = entry.pw_gid
        group = grp.getgrgid(gid).gr_name
    return Identity(user, group, entry.pw_uid, gid)


def prepare(who: Identity | None, directories: list[Path]) -> None:
    """Rules 2 to 4, as root (or whoever started us), before :func:`drop`.

    :raises PrivilegeError: naming the directory and the command that fixes it.
    """
    if who is None:
        if os.geteuid() == 0:
            log.warning("running as root: set [main] user (and group) in config/smtp.ini "
                        "so that harakapy gives up root once its ports are bound "
                        "(docs/operations.md)")
        return
    if os.geteuid() != 0 and os.geteuid() != who.uid:
        raise PrivilegeError(f"[main] user is {who.user}, but harakapy was started as uid "
                             f"{os.geteuid()}, which cannot become it: start it as root or "
                             f"as {who.user}")
    if os.geteuid() == 0:
        for needed in _installation():
            blocked = _unreachable(needed, who)
            if blocked is not None:
                raise PrivilegeError(
                    f"{blocked} does not let {who.user} ([main] user) through, so after "
                    f"giving up root harakapy could not load the rest of itself from "
                    f"{needed}: install harakapy and its Python where {who.user} can read "
                    f"them (a venv under /opt, say)")
    for directory in directories:
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
                if os.geteuid() == 0:
                    os.chown(directory, who.uid, who.gid)
            paths = [directory, *(p for p in directory.iterdir() if p.is_dir())]
        except OSError as exc:
            raise PrivilegeError(f"cannot make {directory} for {who.user} ([main] user): "
                                 f"{exc.strerror}; create it and run chown -R "
                                 f"{who.user}:{who.group} {directory}") from None
        for path in paths:
            owner = path.stat().st_uid
            if owner != who.uid:
                raise PrivilegeError(
                    f"{path} belongs to uid {owner}, not to {who.user} ([main] user): run "
                    f"chown -R {who.user}:{who.group} {directory}")


def drop(who: Identity | None) -> None:
    """Rule 1: become ``who`` for good; nothing when it is ``None`` or already so."""
    if who is None or os.geteuid() != 0:
        return
    os.setgroups([])
    os.setgid(who.gid)
    os.setuid(who.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise PrivilegeError("root could be had back after dropping privileges")
    log.info("running as %s:%s (uid %d, gid %d)", who.user, who.group, who.uid, who.gid)


def _installation() -> list[Path]:
    """What the process goes on importing from after it gave up root: the interpreter's
    own library and harakapy's package."""
    import sysconfig

    import harakapy

    return [Path(sysconfig.get_paths()["stdlib"]).resolve(),
            Path(harakapy.__file__).resolve().parent]


def _unreachable(path: Path, who: Identity) -> Path | None:
    """The first directory on the way to ``path`` that ``who`` may not pass (no ``x``
    for it as owner, group member or other); ``None`` when every one lets it through."""
    groups = {who.gid, *(g.gr_gid for g in grp.getgrall() if who.user in g.gr_mem)}
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_uid == who.uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid in groups:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            return directory
    return None
