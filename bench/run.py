"""Run the benchmark scenarios against harakapy, Haraka and Postfix in one run, and write
a dated markdown table with the ratios harakapy/peer to bench/results/.

    python -m bench.run                 # everything (installs the peers on first use)
    python -m bench.run --repeat 3      # servers take turns three times; medians
    python -m bench.run --quick --peers harakapy --harakapy dev   # the smoke run
    python -m bench.run --peers harakapy,postfix --scenarios inbound+deliver

Absolute numbers on a shared 2-core machine drift; ratios measured side by side do not
drift as much, so the table leads with them. How each server is set up, and the command
for each row: bench/PEERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import make_message, run_load
from bench.measure import PeakRss, cpu_seconds, rss_bytes
from bench.peers import Verify

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SINK_NAME = "sink.bench.test"
SCENARIOS = ("inbound+deliver", "inbound", "relay", "idle", "queued")
# Counts, not rates: a ratio of them means nothing, so the table leaves it out.
COUNTS = {"accepted", "delivered", "undelivered", "errors", "processes", "greeted"}


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel handed out with
    bind(0) can be taken again, before the server binds it, as the source port of one of
    the many connections the load generator opens (seen as 'is in use')."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


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
    """bench/sink.py in its own process; a context manager that stops it."""

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
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("sink did not start")
            time.sleep(0.05)

    def count(self) -> tuple[int, float, float]:
        """``(messages received, time of the first, time of the last)``."""
        data = json.loads(self.status.read_text())
        return data["count"], data["first"], data["last"]

    def wait_for(self, expected: int, *, timeout: float = 300, stall: float = 60) -> int:
        """Wait until the sink has ``expected`` messages, for at most ``timeout`` seconds
        and at most ``stall`` seconds without a new one; the count reached."""
        deadline = time.monotonic() + timeout
        seen, moved = -1, time.monotonic()
        while True:
            count = self.count()[0]
            now = time.monotonic()
            if count != seen:
                seen, moved = count, now
            if count >= expected or now > deadline or now - moved > stall:
                return count
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def accept_only(peer, workdir: Path, *, connections: int, messages: int, size: int) -> dict:
    """Accept into the queue; relayed to a closed port, so nothing is delivered."""
    port = free_port()
    peer.start(port=port, relay_to=None, workdir=workdir)
    try:
        before = cpu_seconds(peer.pids())
        with PeakRss(peer.pids) as memory:
            result = asyncio.run(run_load("127.0.0.1", port, connections=connections,
                                          messages=messages, size=size))
        cpu = cpu_seconds(peer.pids()) - before
    finally:
        peer.stop()
    return {"msgs_per_s": result.msgs_per_s, "p50_ms": result.p50_ms, "p95_ms": result.p95_ms,
            "p99_ms": result.p99_ms,
            "cpu_ms_per_msg": round(cpu * 1000 / max(1, result.accepted), 3),
            **memory.metrics(), "errors": result.errors}


def inbound_deliver(peer, workdir: Path, *, connections: int, messages: int,
                    size: int) -> dict:
    """The full path: every accepted message is relayed to the sink while the load goes
    on. Accepted msgs/s is the load generator's; delivered msgs/s is the sink's, first
    to last delivery (and end to end, first message sent to last delivered); CPU and
    memory are the server's until the last delivery."""
    port = free_port()
    with Sink(workdir, tls=False) as sink:
        peer.start(port=port, relay_to=("127.0.0.1", sink.port), workdir=workdir)
        try:
            before = cpu_seconds(peer.pids())
            with PeakRss(peer.pids) as memory:
                started = time.time()
                result = asyncio.run(run_load("127.0.0.1", port, connections=connections,
                                              messages=messages, size=size))
                loaded = time.time()
                sink.wait_for(result.accepted)
                cpu = cpu_seconds(peer.pids()) - before
        finally:
            peer.stop()
        delivered, first, last = sink.count()
    return {"accepted_per_s": result.msgs_per_s,
            # N deliveries from the first to the last make N - 1 intervals.
            "delivered_per_s": round((delivered - 1) / (last - first), 1)
            if delivered > 1 and last > first else 0.0,
            # The same from the first message sent: a server that holds mail back and
            # delivers it in one burst at the end looks fast above, not here.
            "end_to_end_per_s": round(delivered / (last - started), 1)
            if delivered and last > started else 0.0,
            "p50_ms": result.p50_ms, "p95_ms": result.p95_ms, "p99_ms": result.p99_ms,
            "cpu_ms_per_msg": round(cpu * 1000 / max(1, delivered), 3),
            # How long delivery ran on after the last message was accepted.
            "drain_s": round(max(0.0, last - loaded), 2) if delivered else 0.0,
            **memory.metrics(),
            "undelivered": max(0, result.accepted - delivered), "errors": result.errors}


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
    """``total`` messages through the server to a sink that offers STARTTLS (``tls``) or
    not; every server's outbound TLS is opportunistic as shipped."""
    workdir = workdir.resolve()
    check, cert = sink_certificate(workdir) if verify else (None, None)
    port = free_port()
    with Sink(workdir, tls=tls, cert=cert) as sink:
        peer.start(port=port, relay_to=("127.0.0.1", sink.port), workdir=workdir,
                   **({"verify": check} if verify else {}))
        try:
            rate, count, accepted = relay_through(port, sink, total=total,
                                                  connections=connections, size=size)
            extra = getattr(peer, "side_metrics", lambda _count: {})(count)
        finally:
            peer.stop()
    return {"delivered_per_s": rate, "delivered": count, "accepted": accepted, **extra}


def relay_through(port: int, sink: Sink, *, total: int, connections: int = 50,
                  size: int = 5000) -> tuple[float, int, int]:
    """Send ``total`` messages to ``port`` and wait until the sink has them all:
    ``(delivered per second end to end, delivered, accepted)``."""
    started = time.time()
    result = asyncio.run(run_load("127.0.0.1", port, connections=connections,
                                  messages=total // connections, size=size))
    sink.wait_for(result.accepted)
    count, _first, last = sink.count()
    return round(count / max(1e-6, last - started), 1), count, result.accepted


def idle_connections(peer, workdir: Path, *, count: int = 1000) -> dict:
    """Memory for ``count`` connections that got their greeting and then say nothing."""
    port = free_port()
    peer.start(port=port, relay_to=None, workdir=workdir)

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
    port = free_port()
    recovered = {}

    def preload(home: Path) -> None:
        # The harness's own harakapy writes the spool: the same source tree as the one
        # the peer runs (bench.peers.source_key), so the same spool format.
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

    with Sink(workdir, tls=False) as sink:
        started = time.monotonic()
        peer.start(port=port, relay_to=("127.0.0.1", sink.port), workdir=workdir,
                   prepare=preload)
        recovered["start_s"] = round(time.monotonic() - started - recovered["preload_s"], 1)
        try:
            with PeakRss(peer.pids) as memory:  # the backlog held, and the relay on top
                rate, _count, _accepted = relay_through(port, sink, total=total)
        finally:
            peer.stop()
    return {"delivered_per_s": rate, "startup_s": recovered["start_s"], **memory.metrics()}


@dataclass(frozen=True)
class Case:
    """One row group of the table: ``measure(peer, workdir)`` gives its metrics."""

    label: str
    measure: Callable[..., dict]
    only: frozenset[str] | None = None  # the peers it applies to; None: all

    def applies(self, peer) -> bool:
        return self.only is None or peer.name in self.only


def cases(scenarios: list[str], verifiers: set[str], *, quick: bool = False) -> list[Case]:
    """The cases of ``scenarios`` in table order, the headline (inbound+deliver) first;
    ``quick`` (the smoke run): a tenth of the inbound messages and at c=50 only; relays of
    200 messages; 1,000 queued."""
    found: list[Case] = []
    scale = 0.1 if quick else 1.0

    def inbound_cases(label: str, measure: Callable[..., dict]) -> None:
        for size in (5_000, 100_000):
            for connections in (50,) if quick else (1, 10, 50):
                total = int((1000 if size == 5_000 else 300) * scale)
                found.append(Case(
                    f"{label} c={connections} {size // 1000}KB",
                    lambda peer, work, c=connections, t=total, s=size: measure(
                        peer, work, connections=c, messages=max(1, t // c), size=s)))

    if "inbound+deliver" in scenarios:
        inbound_cases("inbound+deliver", inbound_deliver)
    if "inbound" in scenarios:
        inbound_cases("inbound accept-only", accept_only)
    if "relay" in scenarios:
        total = 200 if quick else 5000
        for tls in (False, True):
            found.append(Case(f"relay {total} msgs {'STARTTLS' if tls else 'plaintext'}",
                              lambda peer, work, t=total, tls=tls: relay(
                                  peer, work, total=t, connections=50, tls=tls)))
        # The policy engine's cost: chain and name checked per session.
        found.append(Case(f"relay {total} msgs STARTTLS verify",
                          lambda peer, work, t=total: relay(peer, work, total=t,
                                                            connections=50, tls=True,
                                                            verify=True),
                          only=frozenset(verifiers)))
    if "idle" in scenarios:
        found.append(Case("1000 idle connections", idle_connections))
    if "queued" in scenarios:
        total = 200 if quick else 5000
        for backlog in (0, 1_000 if quick else 100_000):  # quick: the code path only
            found.append(Case(f"relay {total} msgs, " + (f"{backlog} queued" if backlog
                                                          else "empty queue"),
                              lambda peer, work, b=backlog, t=total: queued(
                                  peer, work, backlog=b, total=t),
                              only=frozenset({"harakapy"})))
    return found


def write_table(rows: list[Row], names: list[str], notes: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    path = out / f"{stamp}.md"
    peers = [n for n in names if n != "harakapy"] if "harakapy" in names else []
    head = ["scenario", "metric", *names, *(f"harakapy/{p}" for p in peers)]
    lines = [f"# Benchmark {stamp}", "", *notes, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        values = [str(row.values.get(n, "-")) for n in names]
        ratios = []
        for peer in peers:
            ours, theirs = row.values.get("harakapy"), row.values.get(peer)
            fit = ours and theirs and row.metric not in COUNTS
            ratios.append(f"{ours / theirs:.2f}" if fit else "-")
        lines.append("| " + " | ".join([row.scenario, row.metric, *values, *ratios]) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    from bench.peers import PEERS, HarakapyPeer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="harakapy,haraka,haraka-cpus,postfix",
                        help=f"comma-separated, of: {', '.join(PEERS)}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true",
                        help="the smoke run: a few hundred messages a case, inbound at c=50 "
                             "only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table goes")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every case this many times, servers taking turns; medians")
    parser.add_argument("--harakapy", choices=("install", "dev"), default="install",
                        help="install: `pip install .` into a fresh venv, as the README "
                             "does (default); dev: the running interpreter's harakapy, "
                             "for the smoke run only")
    args = parser.parse_args(argv)
    names = args.peers.split(",")
    scenarios = args.scenarios.split(",")
    for name in names:
        if name not in PEERS:
            parser.error(f"unknown peer {name!r} (expected one of {', '.join(PEERS)})")
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r} (expected one of "
                         f"{', '.join(SCENARIOS)})")
    rows: dict[tuple[str, str], Row] = {}

    def put(scenario: str, metrics: dict, name: str) -> None:
        for metric, value in metrics.items():
            row = rows.setdefault((scenario, metric), Row(scenario, metric))
            row.samples.setdefault(name, []).append(value)

    notes: list[str] = []
    peers = {}
    for name in names:
        if name.startswith("harakapy"):
            extras = tuple(name.split("-")[1:])
            peer = HarakapyPeer(args.harakapy, extras) if extras else \
                HarakapyPeer(args.harakapy)
        else:
            peer = PEERS[name]()
        try:
            peer.install()
            notes.append(f"- {peer.describe()}")
        except Exception as exc:  # one broken peer must not lose the others' numbers
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            notes.append(f"- {name} not installed: {type(exc).__name__}: {exc}")
            continue
        peers[name] = peer
    verifiers = {name for name, peer in peers.items() if peer.verifies}
    plan = cases(scenarios, verifiers, quick=args.quick)
    # Not under /tmp: Postfix refuses a queue below a world-writable directory.
    (ROOT / ".peers").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=ROOT / ".peers") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue
        for case in plan:
            for turn in range(args.repeat):
                for name in turns(list(peers), turn):
                    peer = peers[name]
                    if not case.applies(peer):
                        continue
                    try:
                        put(case.label, case.measure(peer, workdir / name), name)
                    except Exception as exc:  # the other servers' numbers still count
                        print(f"{name} {case.label}: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
                        notes.append(f"- {name} failed {case.label}: "
                                     f"{type(exc).__name__}: {exc}")
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    given = " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"command: `python -m bench.run {given}`",
            f"machine: {cores} cores; every server fsyncs its queue file before answering 250.",
            f"repetitions: {args.repeat} per case, servers taking turns (medians)",
            "Ratios > 1 favour harakapy for rates; < 1 for latency, CPU and memory.", ""]
    path = write_table(list(rows.values()), names, [*head, *notes], args.out)
    print(path.read_text())
    return path


def turns(names: list[str], turn: int) -> list[str]:
    """The servers in the order of this turn: each turn starts one further along, so no
    server always runs right after the same one (or always first)."""
    shift = turn % len(names) if names else 0
    return names[shift:] + names[:shift]


if __name__ == "__main__":
    main()
