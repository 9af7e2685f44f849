"""Run the benchmark scenarios against harakapy, Haraka and Postfix in one run, and write
a dated markdown table with the ratios harakapy/peer to bench/results/.

    python -m bench.run                 # everything (installs the peers on first use)
    python -m bench.run --quick         # a few hundred messages, harakapy only: the smoke
    python -m bench.run --peers harakapy,postfix --scenarios inbound

Absolute numbers on a shared 2-core machine drift; ratios measured side by side do not
drift as much, so the table leads with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import make_message, run_load
from bench.measure import PeakRss, cpu_seconds, rss_bytes
from bench.peers import Verify

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SINK_NAME = "sink.bench.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Row:
    scenario: str
    metric: str
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float]:
        """The median of each server's repetitions."""
        return {name: round(statistics.median(found), 3) for name, found in
                self.samples.items()}


class Sink:
    """bench/sink.py in its own process."""

    def __init__(self, workdir: Path, *, tls: bool,
                 cert: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.status = workdir / f"sink-{self.port}.json"
        given = ["--cert", str(cert[0]), "--key", str(cert[1])] if cert else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--port", str(self.port), "--status",
             str(self.status), *(["--tls"] if tls else []), *given], cwd=ROOT.parent)
        deadline = time.monotonic() + 20
        while not self.status.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("sink did not start")
            time.sleep(0.05)

    def count(self) -> tuple[int, float, float]:
        data = json.loads(self.status.read_text())
        return data["count"], data["first"], data["last"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def get_peer(name: str):
    from bench import peers

    return peers.PEERS[name]()


def inbound(peer, workdir: Path, *, connections: int, messages: int, size: int) -> dict:
    port = free_port()
    peer.start(port=port, relay_to=None, starttls_out=False, workdir=workdir)
    try:
        before = cpu_seconds(peer.pids())
        with PeakRss(peer.pids) as rss:
            result = asyncio.run(run_load("127.0.0.1", port, connections=connections,
                                          messages=messages, size=size))
        cpu = cpu_seconds(peer.pids()) - before
    finally:
        peer.stop()
    return {"msgs_per_s": result.msgs_per_s, "p50_ms": result.p50_ms, "p95_ms": result.p95_ms,
            "p99_ms": result.p99_ms, "cpu_ms_per_msg": round(cpu * 1000 / max(1,
                                                                                result.accepted),
                                                              3),
            "peak_pss_mb": round(rss.peak / 2**20, 1), "errors": result.errors}


def sink_certificate(workdir: Path) -> tuple[Verify, tuple[Path, Path]]:
    """A CA and a certificate from it for the sink, as a relay at ``verify`` needs."""
    import trustme  # a test extra: the benchmark runs from the development install

    ca = trustme.CA()
    issued = ca.issue_cert(SINK_NAME)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = workdir / "sink-ca.pem", workdir / "sink-cert.pem", workdir / "sink-key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    issued.cert_chain_pems[0].write_to_path(str(paths[1]))
    issued.private_key_pem.write_to_path(str(paths[2]))
    return Verify(paths[0], SINK_NAME), (paths[1], paths[2])


def relay(peer, workdir: Path, *, total: int, connections: int, tls: bool,
          size: int = 5000, verify: bool = False) -> dict:
    check, cert = sink_certificate(workdir) if verify else (None, None)
    sink = Sink(workdir, tls=tls, cert=cert)
    port = free_port()
    peer.start(port=port, relay_to=("127.0.0.1", sink.port), starttls_out=tls, workdir=workdir,
               **({"verify": check} if verify else {}))
    try:
        rate, count, accepted = relay_through(port, sink, total=total,
                                              connections=connections, size=size)
    finally:
        peer.stop()
        sink.stop()
    return {"delivered_per_s": rate, "delivered": count, "accepted": accepted}


def relay_through(port: int, sink: Sink, *, total: int, connections: int = 50,
                  size: int = 5000) -> tuple[float, int, int]:
    """Send ``total`` messages to ``port`` and wait until the sink has them all:
    ``(delivered per second end to end, delivered, accepted)``."""
    started = time.time()
    result = asyncio.run(run_load("127.0.0.1", port, connections=connections,
                                  messages=total // connections, size=size))
    deadline = time.monotonic() + 300
    while sink.count()[0] < result.accepted and time.monotonic() < deadline:
        time.sleep(0.1)
    count, _first, last = sink.count()
    return round(count / max(1e-6, last - started), 1), count, result.accepted


def idle_connections(peer, workdir: Path, *, count: int = 1000) -> dict:
    """Memory for ``count`` connections that got their greeting and then say nothing."""
    port = free_port()
    peer.start(port=port, relay_to=None, starttls_out=False, workdir=workdir)

    async def hold() -> tuple[int, int, int]:
        base = rss_bytes(peer.pids())
        writers, greeted = [], 0

        async def one() -> None:
            nonlocal greeted
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            writers.append(writer)
            try:
                if (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220"):
                    greeted += 1
            except (TimeoutError, OSError):
                pass

        await asyncio.gather(*(one() for _ in range(count)))
        held = rss_bytes(peer.pids())
        for writer in writers:
            writer.close()
        return base, held, greeted

    try:
        base, held, greeted = asyncio.run(hold())
    finally:
        peer.stop()
    return {"greeted": greeted,
            "pss_per_1000_idle_mb": round((held - base) / 2**20 * 1000 / max(1, greeted), 1)}


def queued(peer, workdir: Path, *, backlog: int, total: int = 5000) -> dict:
    """harakapy only: delivery with ``backlog`` deferred messages already queued."""
    sink = Sink(workdir, tls=False)
    port = free_port()
    recovered = {}

    def preload(home: Path) -> None:
        from harakapy.spool.store import JournalEvent, Spool

        spool = Spool(home / "queue", fsync=False)
        spool.create()
        body = make_message(5000, 0)
        later = time.time() + 3600
        started = time.monotonic()
        for n in range(backlog):
            message_id = f"BACKLOG{n:08d}"
            spool.accept(id=message_id, sender="bench@load.test",
                         recipients=[f"r{n}@dead.test"], message=body)
            spool.record(message_id, JournalEvent(domain="dead.test", attempts=1,
                                                  next_attempt=later), durable=False)
        recovered["preload_s"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    peer.start(port=port, relay_to=("127.0.0.1", sink.port), starttls_out=False,
               workdir=workdir, prepare=preload)
    recovered["start_s"] = round(time.monotonic() - started - recovered["preload_s"], 1)
    try:
        memory = rss_bytes(peer.pids())
        rate, _count, _accepted = relay_through(port, sink, total=total)
    finally:
        peer.stop()
        sink.stop()
    return {"delivered_per_s": rate, "startup_s": recovered["start_s"],
            "pss_mb": round(memory / 2**20, 1)}


def write_table(rows: list[Row], names: list[str], notes: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    path = out / f"{stamp}.md"
    peers = [n for n in names if n != "harakapy"]
    head = ["scenario", "metric", *names, *(f"harakapy/{p}" for p in peers)]
    lines = [f"# Benchmark {stamp}", "", *notes, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        values = [str(row.values.get(n, "-")) for n in names]
        ratios = []
        for peer in peers:
            ours, theirs = row.values.get("harakapy"), row.values.get(peer)
            ratios.append(f"{ours / theirs:.2f}" if ours and theirs else "-")
        lines.append("| " + " | ".join([row.scenario, row.metric, *values, *ratios]) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="harakapy,haraka,postfix")
    parser.add_argument("--scenarios", default="inbound,relay,idle,queued")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred messages, for the test suite's smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table goes")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every server this many times, taking turns; medians")
    args = parser.parse_args(argv)
    names = args.peers.split(",")
    scenarios = args.scenarios.split(",")
    rows: dict[tuple[str, str], Row] = {}

    def put(scenario: str, metrics: dict, name: str) -> None:
        for metric, value in metrics.items():
            row = rows.setdefault((scenario, metric), Row(scenario, metric))
            row.samples.setdefault(name, []).append(value)

    scale = 0.1 if args.quick else 1.0
    notes_extra: list[str] = []
    # Not under /tmp: Postfix refuses a queue below a world-writable directory.
    (ROOT / ".peers").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=ROOT / ".peers") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue
        # Servers take turns in each repetition, so drift on a shared machine spreads
        # over all of them; the table shows medians.
        for name in [n for _ in range(args.repeat) for n in names]:
            try:
                run_peer(name, get_peer(name), workdir, scenarios, scale, put)
            except Exception as exc:  # one broken peer must not lose the others' numbers
                print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                notes_extra.append(f"{name} failed: {type(exc).__name__}: {exc}")
    notes = [f"machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}"
             " cores; every server fsyncs its queue file before answering 250.",
             f"repetitions: {args.repeat} (medians)",
             "Ratios > 1 favour harakapy for rates; < 1 for latency, CPU and memory.",
             *notes_extra]
    path = write_table(list(rows.values()), names, notes, args.out)
    print(path.read_text())
    return path


def run_peer(name: str, peer, workdir: Path, scenarios: list[str], scale: float, put) -> None:
    """Every scenario against one server; ``put(scenario, metrics, name)`` records them."""
    peer.install()
    if "inbound" in scenarios:
        for connections in (1, 10, 50):
            for size in (5_000, 100_000):
                total = int((1000 if size == 5_000 else 300) * scale)
                label = f"inbound c={connections} {size // 1000}KB"
                put(label, inbound(peer, workdir / name, connections=connections,
                                   messages=max(1, total // connections), size=size), name)
    if "relay" in scenarios:
        total = int(5000 * scale)
        for tls in (False, True):
            label = f"relay {total} msgs {'STARTTLS' if tls else 'plaintext'}"
            put(label, relay(peer, workdir / name, total=total, connections=50, tls=tls),
                name)
        if peer.verifies:  # the policy engine's cost: chain and name checked per session
            put(f"relay {total} msgs STARTTLS verify",
                relay(peer, workdir / name, total=total, connections=50, tls=True,
                      verify=True), name)
    if "idle" in scenarios:
        put("1000 idle connections", idle_connections(peer, workdir / name), name)
    if "queued" in scenarios and name == "harakapy":
        backlog = int(100_000 * scale)
        total = int(5000 * scale)
        put(f"relay {total} msgs, empty queue", queued(peer, workdir / name, backlog=0,
                                                       total=total), name)
        put(f"relay {total} msgs, {backlog} queued",
            queued(peer, workdir / name, backlog=backlog, total=total), name)

if __name__ == "__main__":
    main()
