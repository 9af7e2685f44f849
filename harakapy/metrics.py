"""Prometheus metrics (``config/metrics.ini``), with the official ``prometheus_client``.

Off by default: then every function here returns at once and ``prometheus_client`` is not
imported. On, each process counts in its own registry; with several workers the
supervisor starts them with ``PROMETHEUS_MULTIPROC_DIR`` (``DIR/state/metrics``), the
library's multiprocess mode, and serves the sum of all of them. Names and labels are
listed in docs/operations.md; label values are a closed set (result types, status
classes, plugin and hook names), never an address or a domain, so that the number of
series stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harakapy.config import Config

log = logging.getLogger("harakapy.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATE_FOLDER = "metrics"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``config/metrics.ini [main]``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9125

    @classmethod
    def from_config(cls, config: Config) -> MetricsSettings:
        ini = config.ini("metrics.ini")
        ini.check_known(config.shipped_ini("metrics.ini"))
        enabled = ini.get_bool("main", "enabled", False)
        host, port = ini.get_address("main", "listen", "127.0.0.1:9125")
        return cls(enabled, host, port)


def metrics_settings(config: Config) -> MetricsSettings:
    return config.derive("metrics.settings", MetricsSettings.from_config)


def multiprocess_dir(config: Config) -> Path:
    return config.state_dir() / STATE_FOLDER


def prepare_multiprocess(config: Config) -> dict[str, str]:
    """For the supervisor, before it starts workers: an empty folder for their counters,
    and the environment that points them at it; ``{}`` when metrics are off."""
    if not metrics_settings(config).enabled:
        return {}
    folder = multiprocess_dir(config)
    shutil.rmtree(folder, ignore_errors=True)  # the counters of the last run are done
    folder.mkdir(mode=0o700, parents=True)
    # This process reads them all (exposition), and the workers inherit it.
    os.environ[MULTIPROCESS_ENV] = str(folder)
    return {MULTIPROCESS_ENV: str(folder)}


class _Metrics:
    """The metric objects, made once per process when metrics are on."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.connections = Counter("harakapy_inbound_connections_total",
                                   "Inbound connections, by what became of them",
                                   ["outcome"])
        self.transactions = Counter("harakapy_inbound_transactions_total",
                                    "Inbound messages: queued, or refused by reply class",
                                    ["outcome"])
        self.outcomes = Counter("harakapy_outbound_recipients_total",
                                "Outbound recipients delivered, deferred or bounced, by "
                                "the RFC 3463 class and subject of the reason (5.1, 4.7)",
                                ["state", "reason"])
        self.tls = Counter("harakapy_outbound_tls_sessions_total",
                           "Outbound TLS negotiations (each tls_result), by the level "
                           "enforced, the RFC 8460 policy type and result type, and the "
                           "TLS version", ["level", "policy_type", "result", "tls_version"])
        self.latency = Histogram("harakapy_delivery_latency_seconds",
                                 "From acceptance to delivery, per recipient delivered",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                                          900, 3600, 14400, 86400))
        self.queue_messages = Gauge("harakapy_queue_messages",
                                    "Messages in the outbound queue",
                                    multiprocess_mode="livesum")
        self.queue_oldest = Gauge("harakapy_queue_oldest_message_age_seconds",
                                  "Age of the oldest message in the outbound queue",
                                  multiprocess_mode="livemax")
        self.sts_cache = Counter("harakapy_mta_sts_lookups_total",
                                 "MTA-STS policy lookups for delivery, by whether the "
                                 "cache answered", ["result"])
        self.sts_fetches = Counter("harakapy_mta_sts_fetches_total",
                                   "MTA-STS policy fetches over HTTPS", ["outcome"])
        self.fleet_calls = Counter("harakapy_fleet_redis_calls_total",
                                   "Calls to the fleet's Redis (a pipeline is one), by "
                                   "outcome: ok, down (unreachable; local copies served), "
                                   "error (Redis refused the command)", ["outcome"])
        self.fleet_up = Gauge("harakapy_fleet_redis_up",
                              "1 while every process reaches the fleet's Redis, 0 while one "
                              "does not", multiprocess_mode="livemin")
        self.dnssec = Counter("harakapy_dane_dnssec_states_total",
                              "DNSSEC states the dane plugin saw, by the record type asked",
                              ["rdtype", "state"])
        self.hook_seconds = Histogram("harakapy_plugin_hook_seconds",
                                      "Time in each plugin's hook implementations",
                                      ["plugin", "hook"],
                                      buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05,
                                               0.1, 0.5, 1, 5, 30))
        self.hook_failures = Counter("harakapy_plugin_hook_failures_total",
                                     "Plugin hook implementations that raised or timed out",
                                     ["plugin", "hook"])


_metrics: _Metrics | None = None


def enable(config: Config) -> bool:
    """Make the metrics of this process when ``config/metrics.ini`` turns them on (at
    start: a reload does not turn them on or off); whether it does."""
    global _metrics
    if not metrics_settings(config).enabled:
        return False
    if _metrics is None:
        _metrics = _Metrics()
    return True


def enabled() -> bool:
    return _metrics is not None


# -- what the server counts -------------------------------------------------------------


def connection(outcome: str) -> None:
    if _metrics is not None:
        _metrics.connections.labels(outcome).inc()


def transaction(reply: str) -> None:
    """An inbound message's final reply: ``queued`` for 2xx, else ``4xx`` or ``5xx``."""
    if _metrics is not None:
        code = reply[:1]
        _metrics.transactions.labels("queued" if code == "2" else f"{code}xx").inc()


def recipient(state: str, status: str, latency: float | None = None) -> None:
    if _metrics is not None:
        _metrics.outcomes.labels(state, reason_class(status)).inc()
        if latency is not None:
            _metrics.latency.observe(max(0.0, latency))


def reason_class(status: str) -> str:
    """``5.1.1`` → ``5.1``: the class and subject of RFC 3463, a bounded label."""
    parts = status.split(".")
    if len(parts) >= 2 and parts[0] in ("2", "4", "5") and parts[1].isdigit() \
            and len(parts[1]) <= 3:
        return f"{parts[0]}.{parts[1]}"
    return "other"


def tls_session(level: str, policy_type: str, result: str, tls_version: str) -> None:
    if _metrics is not None:
        _metrics.tls.labels(level, policy_type, result, tls_version or "none").inc()


def queue_depth(messages: int, oldest_age: float) -> None:
    if _metrics is not None:
        _metrics.queue_messages.set(messages)
        _metrics.queue_oldest.set(oldest_age)


def sts_lookup(cached: bool) -> None:
    if _metrics is not None:
        _metrics.sts_cache.labels("hit" if cached else "miss").inc()


def sts_fetch(ok: bool) -> None:
    if _metrics is not None:
        _metrics.sts_fetches.labels("ok" if ok else "failed").inc()


def fleet_call(outcome: str, up: bool) -> None:
    if _metrics is not None:
        _metrics.fleet_calls.labels(outcome).inc()
        _metrics.fleet_up.set(1 if up else 0)


def dnssec(rdtype: str, state: str) -> None:
    if _metrics is not None:
        _metrics.dnssec.labels(rdtype, state).inc()


def hook(plugin: str, name: str, seconds: float, failed: bool) -> None:
    if _metrics is not None:
        _metrics.hook_seconds.labels(plugin, name).observe(seconds)
        if failed:
            _metrics.hook_failures.labels(plugin, name).inc()


# -- serving them -----------------------------------------------------------------------


def exposition() -> tuple[bytes, str]:
    """The metrics as Prometheus text: this process's, or every worker's summed in
    multiprocess mode."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    folder = os.environ.get(MULTIPROCESS_ENV)
    if folder:
        registry: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_dead(pid: int) -> None:
    """A worker exited: its live gauges no longer count (multiprocess mode)."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


async def serve(config: Config) -> None:
    """The ``/metrics`` endpoint of ``[main] listen``, until cancelled."""
    from aiohttp import web

    settings = metrics_settings(config)

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = await asyncio.to_thread(exposition)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    log.info("metrics on http://%s:%d/metrics", settings.host, settings.port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
