"""Logging: one line per event on stderr, as text for people or JSON for machines."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``worker`` when
    several processes run, and ``exc`` if any."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            event.update(fields)  # an event's facts for machines (the TLS line's)
        if self.worker is not None:
            event["worker"] = self.worker
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self, worker: int | None = None) -> None:
        # A worker's lines carry its number, as syslog lines carry a pid.
        name = "%(name)s" if worker is None else f"%(name)s[{worker}]"
        super().__init__(f"%(asctime)s.%(msecs)03dZ %(levelname)s {name}: %(message)s",
                         "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: a traceback's newlines are kept visible but escaped.
        return super().format(record).replace("\n", "\n    ")


def setup(fmt: str = "text", level: str = "info", *, worker: int | None = None) -> None:
    """Send harakapy's log to stderr.

    :param fmt: ``"text"`` or ``"json"``.
    :param level: ``debug``, ``info``, ``warning`` or ``error``.
    :param worker: The worker's number (from 1) under a supervisor, for every line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO and warns about its own deprecated attributes on
    # each AUTH; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
