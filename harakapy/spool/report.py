"""What ``harakapy queue`` shows: queued messages and counts, read straight from the spool
files, so it works whether or not a server is running."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

from harakapy.spool.store import QueuedMessage, Spool, SpoolError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(message_id: str) -> str:
    """A queue id as typed by an operator; refuses anything that could name another file."""
    if not _ID.match(message_id):
        raise SpoolError(f"{message_id!r} is not a queue id")
    return message_id


def summary(message: QueuedMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "arrival": message.arrival,
        "size": message.size,
        "sender": message.sender,
        "requiretls": message.requiretls,
        "tls_required_no": message.tls_optional,
        "ret": message.ret,
        "envid": message.envid,
        "recipients": [{"address": r.address, "state": r.state, "reply": r.reply,
                        "mx": r.mx, "notify": r.notify, "orcpt": r.orcpt}
                       for r in message.recipients],
        "next_attempt": {d: t for d, t in message.next_attempt.items()
                         if d in message.domains()},
        "attempts": message.attempts,
        "last_error": message.last_error,
    }


def messages(spool: Spool) -> list[QueuedMessage]:
    found = []
    for message_id in spool.ids():
        try:
            found.append(spool.load(message_id))
        except SpoolError:
            continue  # removed while we looked, or unreadable: `queue show` says which
    return sorted(found, key=lambda m: m.arrival)


def stats(spool: Spool, *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    queued = messages(spool)
    states: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    for message in queued:
        for recipient in message.recipients:
            states[recipient.state] += 1
            if not recipient.is_final:
                domains[recipient.domain] += 1
    return {
        "messages": len(queued),
        "bytes": sum(m.size for m in queued),
        "recipients": dict(states),
        "domains": dict(domains.most_common(20)),
        "oldest_age": round(now - queued[0].arrival, 1) if queued else None,
    }


def format_line(message: QueuedMessage) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(message.arrival))
    rcpts = ", ".join(f"<{r.address}> {r.state}" for r in message.recipients)
    return f"{message.id}  {when}Z  {message.size:>9}  <{message.sender}>  {rcpts}"


def format_show(message: QueuedMessage) -> str:
    lines = [
        f"id:        {message.id}",
        f"arrival:   {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(message.arrival))}Z",
        f"size:      {message.size} bytes",
        f"sender:    <{message.sender}>",
    ]
    if message.requiretls:
        lines.append("REQUIRETLS: yes (only over validated TLS to servers that offer it)")
    elif message.tls_optional:
        lines.append("TLS-Required: No (recipient TLS policy only reports for it)")
    lines.append("recipients:")
    for recipient in message.recipients:
        detail = f" via {recipient.mx}" if recipient.mx else ""
        reply = f": {recipient.reply}" if recipient.reply else ""
        dsn = f" NOTIFY={recipient.notify}" if recipient.notify else ""
        lines.append(f"  <{recipient.address}> {recipient.state}{detail}{dsn}{reply}")
    for domain in message.domains():
        next_at = message.next_attempt.get(domain)
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(next_at)) + "Z"
                if next_at else "now")
        lines.append(f"next attempt for {domain}: {when} "
                     f"(attempts so far: {message.attempts.get(domain, 0)})")
    if message.history:
        lines.append("history:")
        for event in message.history:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.time))
            rest = {k: v for k, v in event.to_json().items() if k != "t"}
            lines.append(f"  {stamp}Z {rest}")
    lines.append("header:")
    header = message.read_headers().decode("utf-8", "replace")
    lines.extend("  " + line for line in header.rstrip("\r\n").split("\r\n"))
    return "\n".join(lines)
