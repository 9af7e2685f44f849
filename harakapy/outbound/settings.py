"""The outbound queue's settings, from ``config/outbound.ini`` (each key documented there)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from harakapy.config import Config
from harakapy.outbound.client import Timeouts


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    concurrency: int
    domain_concurrency: int
    port: int
    local_address: str | None
    ipv4: bool
    ipv6: bool
    timeouts: Timeouts
    min_backoff: float
    max_backoff: float
    max_queue_lifetime: float
    bounce_lifetime: float
    delay_warning: float
    connection_reuse: bool
    idle_timeout: float
    max_messages_per_connection: int
    fsync: bool
    chunking: bool = True

    @classmethod
    def from_config(cls, config: Config) -> OutboundSettings:
        ini = config.ini("outbound.ini")
        ini.check_known(config.shipped_ini("outbound.ini"))
        local = ini.get_str("main", "local_address") or None
        if local is not None:
            try:
                ipaddress.ip_address(local)
            except ValueError:
                raise ini.error("main", "local_address", f"{local!r} is not an IP address"
                                ) from None
        protocols = {p.lower() for p in ini.get_list("main", "inet_protocols",
                                                      ["ipv4", "ipv6"])}
        unknown = protocols - {"ipv4", "ipv6"}
        if unknown or not protocols:
            raise ini.error("main", "inet_protocols", "expected ipv4, ipv6 or both")
        min_backoff = ini.get_duration("main", "min_backoff", 300)
        max_backoff = ini.get_duration("main", "max_backoff", 3600)
        if max_backoff < min_backoff:
            raise ini.error("main", "max_backoff", "must not be less than min_backoff")
        return cls(
            concurrency=ini.get_int("main", "concurrency", 100, minimum=1),
            domain_concurrency=ini.get_int("main", "domain_concurrency", 10, minimum=1),
            port=ini.get_port("main", "port", 25),
            local_address=local,
            ipv4="ipv4" in protocols,
            ipv6="ipv6" in protocols,
            timeouts=Timeouts(connect=ini.get_duration("main", "connect_timeout", 30),
                              command=ini.get_duration("main", "command_timeout", 300),
                              data_done=ini.get_duration("main", "data_timeout", 600)),
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            max_queue_lifetime=ini.get_duration("main", "max_queue_lifetime", 432000),
            bounce_lifetime=ini.get_duration("main", "bounce_lifetime", 432000),
            delay_warning=ini.get_duration("main", "delay_warning", 0),
            connection_reuse=ini.get_bool("main", "connection_reuse", True),
            idle_timeout=ini.get_duration("main", "idle_timeout", 10),
            max_messages_per_connection=ini.get_int("main", "max_messages_per_connection",
                                                    100, minimum=1),
            fsync=ini.get_bool("main", "fsync", True),
            chunking=ini.get_bool("main", "chunking", True),
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones: doubling from
        ``min_backoff`` up to ``max_backoff`` (Postfix's shape)."""
        return min(self.max_backoff, self.min_backoff * 2 ** max(0, attempts - 1))

