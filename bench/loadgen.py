"""Load generator: N concurrent SMTP connections, each sending M messages of S bytes.

Reports accepted messages per second and p50/p95/p99 transaction latency (MAIL FROM to the
reply after the final dot). Uses harakapy's own delivery client (PIPELINING when offered),
so the client costs the same against every server measured.

    python -m bench.loadgen --port 2525 --connections 50 --messages 20 --size 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

from harakapy.outbound.client import SessionError, SmtpSession, Timeouts


@dataclass
class LoadResult:
    connections: int
    messages: int
    size: int
    accepted: int
    refused: int
    errors: int
    seconds: float
    msgs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def make_message(size: int, n: int) -> bytes:
    head = (f"From: bench@load.test\r\nTo: sink@sink.test\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{n}.{os.getpid()}@load.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghij\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _one_connection(host: str, port: int, count: int, size: int, recipient: str,
                          offset: int, latencies: list[float], tally: dict[str, int],
                          starttls: bool) -> None:
    timeouts = Timeouts(connect=30, command=120, data_done=120)
    try:
        session = await SmtpSession.open(host, port, timeouts=timeouts)
        await session.ehlo("loadgen.test")
        if starttls and session.supports("STARTTLS"):
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # a load generator measures, it trusts
            await session.starttls(context, None)
    except SessionError:
        tally["errors"] += count
        return
    try:
        for n in range(count):
            message = make_message(size, offset + n)
            started = time.perf_counter()
            try:
                result = await session.send("bench@load.test", [recipient], message)
            except SessionError:
                tally["errors"] += count - n
                return
            latencies.append((time.perf_counter() - started) * 1000)
            if all(r.positive for r in result.recipients):
                tally["accepted"] += 1
            else:
                tally["refused"] += 1
    finally:
        await session.quit()


async def run_load(host: str, port: int, *, connections: int, messages: int, size: int,
                   recipient: str = "sink@sink.test", starttls: bool = False) -> LoadResult:
    """Drive the load; ``messages`` is per connection."""
    latencies: list[float] = []
    tally = {"accepted": 0, "refused": 0, "errors": 0}
    started = time.perf_counter()
    await asyncio.gather(*(
        _one_connection(host, port, messages, size, recipient, i * messages, latencies, tally,
                        starttls)
        for i in range(connections)))
    seconds = time.perf_counter() - started
    return LoadResult(connections, messages, size, tally["accepted"], tally["refused"],
                      tally["errors"], round(seconds, 3),
                      round(tally["accepted"] / seconds, 1) if seconds else 0.0,
                      round(statistics.median(latencies), 2) if latencies else 0.0,
                      round(percentile(latencies, 0.95), 2), round(percentile(latencies, 0.99), 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--messages", type=int, default=10, help="per connection")
    parser.add_argument("--size", type=int, default=5000, help="bytes per message")
    parser.add_argument("--recipient", default="sink@sink.test")
    parser.add_argument("--starttls", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run_load(args.host, args.port, connections=args.connections,
                                  messages=args.messages, size=args.size,
                                  recipient=args.recipient, starttls=args.starttls))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
