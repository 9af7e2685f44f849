"""The durable outbound spool: one file per message, one append-only journal per message.

Rules:

1. A message is in ``msg/`` (written to ``tmp/``, fsynced, renamed, directory fsynced)
   before :meth:`Spool.accept` returns, so before the client hears ``250``.
2. ``msg/<id>`` never changes after that: a JSON envelope line, then the message bytes.
3. What happens to recipients is appended to ``log/<id>`` (one JSON object per line) and
   fsynced before anything acts on it; a torn last line (a crash mid-append) is ignored.
4. When every recipient is delivered or bounced, ``msg/<id>`` goes first, then the log.
5. Only startup reads the whole spool; a delivery reads its own message.
6. Every message belongs to one *slot*, the worker process that accepted it (``slot`` in
   its envelope); only the worker of that slot delivers it or removes it. With ``n``
   workers, worker ``k`` owns the slots ``s`` with ``s % n == k``.

This module knows files, fsync and the record formats. It does not know SMTP or schedules.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

_counter = itertools.count(1)
_PREFIX = os.urandom(4).hex().upper()


def new_id() -> str:
    """A short id unique to this process run: it names connections in logs and messages in
    the spool (``queued as <id>``)."""
    return f"{_PREFIX}{next(_counter):08X}"


class RecipientState(StrEnum):
    """What became of one recipient; the value is the journal's spelling."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"

    @property
    def is_final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.BOUNCED)


class SpoolError(Exception):
    """The spool cannot be read or written (disk full, permissions, a corrupt file)."""


@dataclass(slots=True)
class QueuedRecipient:
    """One recipient of a queued message and what became of it."""

    address: str
    domain: str
    state: RecipientState = RecipientState.PENDING
    reply: str = ""
    enhanced: str = ""
    mx: str = ""
    notify: str = ""  # RFC 3461 NOTIFY, upper-case; empty: failures and delays are told
    orcpt: str = ""  # RFC 3461 ORCPT as given (addr-type;xtext)

    @property
    def is_final(self) -> bool:
        return self.state.is_final


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One line of a message's journal (``log/<id>``), as the store writes and reads it.

    A recipient outcome sets ``rcpt`` (indexes into the envelope's recipients) and
    ``state``; a retry schedule sets ``domain`` with ``attempts``, ``next_attempt`` and
    ``error``; ``flush`` makes every domain due now; ``warned`` records the delay notice.

    :ivar time: When it was written, seconds since the epoch (set by :meth:`Spool.record`).
    """

    rcpt: tuple[int, ...] = ()
    state: RecipientState | None = None
    reply: str = ""
    enhanced: str = ""
    mx: str = ""
    domain: str | None = None
    attempts: int | None = None
    next_attempt: float | None = None
    error: str | None = None
    flush: bool = False
    warned: bool = False
    time: float = 0.0

    # Journal keys as they are on disk; short, since a busy spool writes many.
    def to_json(self) -> dict[str, Any]:
        """The journal line's JSON object: only the fields this event sets."""
        data: dict[str, Any] = {"t": round(self.time, 3)}
        if self.rcpt:
            data["rcpt"] = list(self.rcpt)
        if self.state is not None:
            data["state"] = self.state.value
        for key in ("reply", "enhanced", "mx"):
            if value := getattr(self, key):
                data[key] = value
        if self.domain is not None:
            data["domain"] = self.domain
        if self.attempts is not None:
            data["attempts"] = self.attempts
        if self.next_attempt is not None:
            data["next"] = self.next_attempt
        if self.error is not None:
            data["error"] = self.error
        if self.flush:
            data["flush"] = True
        if self.warned:
            data["warned"] = True
        return data

    @classmethod
    def from_json(cls, data: object) -> JournalEvent | None:
        """The event a journal line holds; ``None`` for a line that is not one (a torn
        last line from a crash mid-append, or garbage)."""
        if not isinstance(data, dict):
            return None
        try:
            state = data.get("state")
            return cls(
                rcpt=tuple(int(i) for i in data.get("rcpt", ())),
                state=RecipientState(state) if state is not None else None,
                reply=str(data.get("reply", "")), enhanced=str(data.get("enhanced", "")),
                mx=str(data.get("mx", "")), domain=data.get("domain"),
                attempts=int(data["attempts"]) if "attempts" in data else None,
                next_attempt=float(data["next"]) if "next" in data else None,
                error=str(data["error"]) if "error" in data else None,
                flush=bool(data.get("flush")), warned=bool(data.get("warned")),
                time=float(data.get("t", 0.0)))
        except (TypeError, ValueError):
            return None

    def apply(self, message: QueuedMessage) -> None:
        """Fold this event into the message's state (at load, and live after writing)."""
        if self.state is not None and self.state is not RecipientState.PENDING:
            for index in self.rcpt:
                if 0 <= index < len(message.recipients):
                    recipient = message.recipients[index]
                    if recipient.is_final:
                        continue
                    recipient.state = self.state
                    recipient.reply = self.reply
                    recipient.enhanced = self.enhanced
                    recipient.mx = self.mx
        if self.domain is not None:
            if self.next_attempt is not None:
                message.next_attempt[self.domain] = self.next_attempt
            if self.attempts is not None:
                message.attempts[self.domain] = self.attempts
            if self.error is not None:
                message.last_error[self.domain] = self.error
        if self.flush:
            message.next_attempt.clear()
        if self.warned:
            message.warned = True


@dataclass(slots=True)
class QueuedMessage:
    """A message in the spool, as hooks see it (``message``): envelope and recipient states.

    The message text stays on disk; :meth:`read` loads it.

    :ivar requiretls: The sender asked for REQUIRETLS (RFC 8689), or a plugin set it: it
        goes only over validated TLS to servers that offer REQUIRETLS
        (``harakapy.outbound.requiretls``).
    :ivar tls_optional: Its header says ``TLS-Required: No`` (every such field): the
        sender's opt-out of recipient TLS policy.
    """

    id: str
    sender: str
    recipients: list[QueuedRecipient]
    arrival: float
    size: int
    smtputf8: bool = False
    body_8bit: bool = False
    requiretls: bool = False
    tls_optional: bool = False
    ret: str = ""  # RFC 3461 RET: FULL, HDRS or empty
    envid: str = ""  # RFC 3461 ENVID, xtext as given
    client: str = ""
    slot: int = 0
    path: Path | None = None
    body_offset: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    next_attempt: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    warned: bool = False
    history: list[JournalEvent] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    journaled: bool = False  # log/<id> may exist

    @property
    def is_bounce(self) -> bool:
        """A DSN we generated (null sender): never bounced itself."""
        return not self.sender

    def domains(self) -> list[str]:
        """Destination domains that still have recipients to deliver, in first-seen order."""
        return list(dict.fromkeys(r.domain for r in self.recipients if not r.is_final))

    def pending(self, domain: str) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.domain == domain and not r.is_final]

    def read(self) -> bytes:
        """The message as received (our ``Received:`` first, CRLF line ends)."""
        if self.path is None:
            raise SpoolError(f"{self.id}: no message file")
        try:
            fd = os.open(self.path, _READ)
            try:
                return _read_from(fd, self.body_offset, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(f"cannot read {self.path}: {exc.strerror}") from exc

    def read_headers(self, limit: int = 65536) -> bytes:
        """The header section (at most ``limit`` bytes), for DSNs and ``queue show``."""
        if self.path is None:
            return b""
        with self.path.open("rb") as handle:
            handle.seek(self.body_offset)
            head = handle.read(limit)
        return head.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# Spool I/O runs in worker threads, and every system call there lets the event loop's
# thread take the GIL and then hands it back: a handful of os calls instead of file
# objects (which add fstat, ioctl and lseek) halves those handovers.
_READ = os.O_RDONLY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_JOURNAL = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def _recipients(envelope: dict[str, Any]) -> list[QueuedRecipient]:
    addresses = envelope["recipients"]
    notify = envelope.get("notify") or [""] * len(addresses)
    orcpt = envelope.get("orcpt") or [""] * len(addresses)
    return [QueuedRecipient(address, address.rpartition("@")[2].lower(),
                            notify=str(n or ""), orcpt=str(o or ""))
            for address, n, o in zip(addresses, notify, orcpt, strict=True)]


def _read_from(fd: int, offset: int, expected: int) -> bytes:
    """Everything from ``offset`` to the end of the file; ``expected`` bytes are likely."""
    data = os.pread(fd, expected + 1, offset)
    if len(data) <= expected:  # a short read of a regular file is its end
        return data
    parts = [data]
    offset += len(data)
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, parts: list[bytes]) -> None:
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if parts and written:
            parts[0] = parts[0][written:]


class GroupSync:
    """fsync one directory for many writers at once (group commit).

    A writer that renamed its file in calls :meth:`sync`; if an fsync is already running,
    it waits for the next one, which covers every rename made before it started. Under
    load one directory fsync then serves many messages, and no writer returns before an
    fsync that began after its rename has finished.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tickets = threading.Lock()  # held only to count
        self._syncing = threading.Lock()  # held through one fsync; writers queue on it
        self._issued = 0
        self._synced = 0

    def sync(self) -> None:
        with self._tickets:
            self._issued += 1
            ticket = self._issued
        # Waiters are let in one by one, not woken all at once: each needs the GIL anyway,
        # and most find that the fsync they waited through already covered them.
        with self._syncing:
            if self._synced >= ticket:
                return
            with self._tickets:
                covers = self._issued  # every writer counted so far has renamed its file
            _fsync_dir(self.path)
            self._synced = covers


def _first_line(path: Path, limit: int) -> bytes:
    """The first line of a file with its newline (at most ``limit`` bytes), as
    ``readline(limit)`` gives it."""
    fd = os.open(path, _READ)
    try:
        data = os.pread(fd, 8192, 0)
        while b"\n" not in data and 0 < len(data) < limit:  # many recipients
            chunk = os.pread(fd, 1 << 16, len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    end = data.find(b"\n", 0, limit)
    return data[:end + 1] if end >= 0 else data[:limit]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(slot: int, message_id: str) -> str:
    """A message's name in ``tmp/`` while it is written: ``<slot>.<id>``, so that a worker
    starting again clears only its own slot's unfinished writes, never another worker's
    write in progress."""
    return f"{slot}.{message_id}"


class Spool:
    """The spool directory.

    :param root: ``DIR/queue``; created (mode 0700) when missing.
    :param fsync: Whether to fsync. Only tests of other things may turn it off; with it
        off a crash loses mail.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.tmp_dir = root / "tmp"
        self.msg_dir = root / "msg"
        self.log_dir = root / "log"
        self._msg_sync = GroupSync(self.msg_dir)

    def create(self) -> None:
        try:
            for folder in (self.root, self.tmp_dir, self.msg_dir, self.log_dir):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool {self.root}: {exc.strerror}") from exc

    # -- writing ------------------------------------------------------------------------

    def accept(self, *, id: str, sender: str, recipients: list[str], message: bytes,
               smtputf8: bool = False, body_8bit: bool = False, requiretls: bool = False,
               tls_optional: bool = False, ret: str = "", envid: str = "",
               notify: list[str] | None = None, orcpt: list[str] | None = None,
               client: str = "", arrival: float | None = None, slot: int = 0
               ) -> QueuedMessage:
        """Store a message durably; when this returns, it survives ``kill -9``.

        :param recipients: Forward paths (``local@domain``), in order.
        :param slot: The worker that owns it (delivers it); see :func:`tmp_name`.
        :raises SpoolError: when it could not be stored (the client must hear 4xx).
        """
        arrival = time.time() if arrival is None else arrival
        envelope = {
            "v": 1, "id": id, "sender": sender, "recipients": recipients,
            "arrival": arrival, "size": len(message), "smtputf8": smtputf8,
            "body_8bit": body_8bit, "client": client, "slot": slot,
        }
        # Only when set: the envelope of ordinary mail stays as it was.
        if requiretls:
            envelope["requiretls"] = True
        if tls_optional:
            envelope["tls_optional"] = True
        for key, value in (("ret", ret), ("envid", envid)):
            if value:
                envelope[key] = value
        for key, values in (("notify", notify), ("orcpt", orcpt)):
            if values and any(values):
                envelope[key] = list(values)  # by recipient, in order
        head = json.dumps(envelope, ensure_ascii=False).encode() + b"\n"
        final = self.msg_dir / id
        tmp = os.path.join(self.tmp_dir, tmp_name(slot, id))
        try:
            if os.path.exists(final):
                raise SpoolError(f"{id} is already in the spool")
            fd = os.open(tmp, _CREATE, 0o666)
            try:
                _write_all(fd, [head, message])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            if self.fsync:
                self._msg_sync.sync()
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(f"cannot write {final}: {exc.strerror}") from exc
        return QueuedMessage(
            id=id, sender=sender, recipients=_recipients(envelope),
            arrival=arrival, size=len(message), smtputf8=smtputf8, body_8bit=body_8bit,
            requiretls=requiretls, tls_optional=tls_optional, ret=ret, envid=envid,
            client=client, slot=slot, path=final, body_offset=len(head))

    def record(self, message_id: str, event: JournalEvent, *,
               durable: bool = True) -> JournalEvent:
        """Append one event to the message's journal; the event as written (its time set).

        :param durable: fsync before returning. Outcomes that stop a re-send (delivered,
            bounced) must be durable; a deferral's schedule need not be.
        """
        event = replace(event, time=time.time())
        line = json.dumps(event.to_json(), ensure_ascii=False).encode()
        path = os.path.join(self.log_dir, message_id)
        try:
            fd = os.open(path, _JOURNAL, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # end a line torn by a crash, or we would lose ours
                os.write(fd, line + b"\n")
                if durable and self.fsync:
                    os.fsync(fd)
                    if not size:
                        _fsync_dir(self.log_dir)  # a new journal's name must survive too
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(f"cannot write {path}: {exc.strerror}") from exc
        return event

    def remove(self, message_id: str, *, journal: bool = True) -> None:
        """Forget a message whose recipients are all final (or that an operator deleted).

        :param journal: Whether it may have a journal to delete too (``False`` for one
            that was never written: a message settled at its first attempt).
        """
        paths = [os.path.join(self.msg_dir, message_id)]
        if journal:
            paths.append(os.path.join(self.log_dir, message_id))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- reading ------------------------------------------------------------------------

    def remove_unfinished(self, slot: int, slots: int) -> int:
        """Delete the half-written messages of the workers ``slot`` stands for (never
        acknowledged: their clients still have them); how many. A worker's start only."""
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                owner, _, _ = entry.name.partition(".")
                if not owner.isdigit() or int(owner) % slots == slot:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    removed += 1
        return removed

    def remove_orphan_journals(self) -> int:
        """Delete journals whose message is gone (a crash between the two unlinks of
        :meth:`remove`); how many. Startup only."""
        messages = set(self.ids())
        orphans = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.log_dir) as entries:
            for entry in entries:
                if entry.name not in messages:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    orphans += 1
        return orphans

    def ids(self) -> Iterator[str]:
        try:
            with os.scandir(self.msg_dir) as entries:
                for entry in entries:
                    if entry.is_file():
                        yield entry.name
        except FileNotFoundError:
            return

    def slot_of(self, message_id: str) -> int:
        """The slot of a message (its envelope only; see rule 6).

        :raises SpoolError: no such message, or its envelope is unreadable.
        """
        path = self.msg_dir / message_id
        try:
            return int(json.loads(_first_line(path, 1 << 20)).get("slot", 0))
        except FileNotFoundError:
            raise SpoolError(f"no message {message_id} in {self.msg_dir}") from None
        except OSError as exc:
            raise SpoolError(f"cannot read {path}: {exc.strerror}") from exc
        except (ValueError, TypeError, AttributeError) as exc:
            raise SpoolError(f"{path}: corrupt envelope ({exc})") from exc

    def load(self, message_id: str) -> QueuedMessage:
        """The message's envelope with its journal applied.

        :raises SpoolError: no such message, or its envelope is unreadable.
        """
        path = self.msg_dir / message_id
        try:
            head = _first_line(path, 1 << 20)
        except FileNotFoundError:
            raise SpoolError(f"no message {message_id} in {self.msg_dir}") from None
        except OSError as exc:
            raise SpoolError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            envelope = json.loads(head)
            message = QueuedMessage(
                id=envelope["id"], sender=envelope["sender"],
                recipients=_recipients(envelope),
                ret=str(envelope.get("ret", "")), envid=str(envelope.get("envid", "")),
                arrival=float(envelope["arrival"]), size=int(envelope["size"]),
                smtputf8=bool(envelope.get("smtputf8")),
                body_8bit=bool(envelope.get("body_8bit")),
                requiretls=envelope.get("requiretls") is True,
                tls_optional=envelope.get("tls_optional") is True,
                client=envelope.get("client", ""),
                slot=int(envelope.get("slot", 0)), path=path, body_offset=len(head))
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"{path}: corrupt envelope ({exc})") from exc
        self._apply_log(message)
        return message

    def _apply_log(self, message: QueuedMessage) -> None:
        try:
            fd = os.open(os.path.join(self.log_dir, message.id), _READ)
        except FileNotFoundError:
            return  # not attempted yet
        message.journaled = True
        try:
            lines = _read_from(fd, 0, 4096).split(b"\n")
        finally:
            os.close(fd)
        for line in lines:
            try:
                event = JournalEvent.from_json(json.loads(line))
            except ValueError:
                event = None
            if event is None:
                continue  # a torn last line from a crash mid-append: it was never acted on
            message.history.append(event)
            event.apply(message)
