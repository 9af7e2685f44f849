"""The servers under test, each started as a private instance with one interface.

    peer = PEERS["postfix"]()
    peer.install()                     # idempotent
    peer.start(port=2525, relay_to=("127.0.0.1", 2600), workdir=WORK)
    ... load; sum /proc/PID/stat over peer.pids() ...
    peer.stop()                        # waits until the port is free and processes are gone

Each server runs as its distribution ships it, changed only where a scenario must:
harakapy as the README's first command installs it (``pip install .`` into a fresh venv,
no extras), Postfix with the main.cf and master.cf Debian 12 writes, Haraka with what
``haraka -i`` writes (and, as ``haraka-cpus``, ``nodes=cpus``). bench/PEERS.md lists
every line the bench changes and why.

Each instance lives in ``workdir/NAME`` (fresh at each start): config, queue, log and a
self-signed certificate that all of them offer for inbound STARTTLS. It listens on
127.0.0.1:port, lets the load generator (127.0.0.1) relay, and hands every relayed message
to ``relay_to``; with ``relay_to=None`` to a closed port, so mail is accepted into the
queue and deferred (the first retry of every peer is 5 minutes later). Outbound STARTTLS
is opportunistic in all of them as shipped, so the sink decides: it offers STARTTLS or it
does not. Durability is the same: all fsync the queue file before answering 250
(Postfix's cleanup; Haraka's FsyncWriteStream, which does not fsync the directory after
its rename; harakapy fsyncs file and directory).

``pids()`` are the processes alive now. Processes that exit during a run (Postfix's
smtpd and smtp come and go) are counted in their parent's cutime/cstime once reaped, so
CPU time is utime+stime+cutime+cstime of every pid, sampled before and after.

``workdir`` must not be under a world-writable directory such as /tmp: Postfix refuses
such a queue. ``bench/.peers/`` (git-ignored) is the place:

    python -m bench.peers postfix --port 2525 --relay-to 2600   # start; Ctrl-C stops
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from bench.measure import cpu_seconds
from harakapy.tls.context import self_signed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATES = HERE / "peers"
PEERS_DIR = HERE / ".peers"
HARAKA_DIR = PEERS_DIR / "haraka"
RETIRED = ".retired"  # earlier instances, deleted when a run ends (see _instance_dir)
CLOSED = ("127.0.0.1", 1)  # tcpmux: nothing listens here, connections are refused


@dataclass(frozen=True)
class Verify:
    """Relay at level ``verify``: trust only ``ca_file``; the sink's certificate carries
    ``name`` (the route is an address, so that name is the one to match)."""

    ca_file: Path
    name: str


class Peer(Protocol):
    name: str
    verifies: bool  # can be told to verify the sink's certificate

    def install(self) -> None: ...

    def describe(self) -> str: ...

    def start(self, *, port: int, relay_to: tuple[str, int] | None, workdir: Path,
              verify: Verify | None = None) -> None: ...

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


# -- helpers -------------------------------------------------------------------------------


def _run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait(what: str, done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _greets(port: int) -> bool:
    """An SMTP greeting on 127.0.0.1:port: a process serves it, not only a listening
    socket (a master process may bind before its workers can answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            greeted = conn.makefile("rb").readline().startswith(b"220")
            conn.sendall(b"QUIT\r\n")
            return greeted
    except OSError:
        return False


def _settle(pids: Callable[[], list[int]], timeout: float = 60) -> None:
    """Wait until the server's processes are idle (under 20 ms of CPU in 0.25 s), for at
    most ``timeout`` seconds: its start-up work (loading plugins, forking workers, reading
    a spool) is over before any measurement begins, for every server alike. A server
    that never goes idle is measured anyway: its background work is its own cost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pids())
        time.sleep(0.25)
        if cpu_seconds(pids()) - before < 0.02:
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _alive(pid):
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _instance_dir(workdir: Path, name: str) -> Path:
    """A fresh ``workdir/NAME``; the previous instance is moved aside, not deleted.

    Deleting it here would put thousands of freshly freed inodes next to the new queue,
    and ext4 without a journal (this machine's root) skips inodes freed within the last
    minute when it allocates one: every new queue file in the measured run then pays for
    the harness's cleanup (measured: 0.5-1.2 ms of system CPU per message for whichever
    server ran). ``bench.run`` deletes the set aside instances when the run ends.
    """
    home = Path(workdir).resolve() / name
    if home.exists():
        retired = Path(workdir).resolve() / RETIRED
        retired.mkdir(exist_ok=True)
        home.rename(retired / f"{name}-{time.time_ns()}")
    home.mkdir(parents=True, mode=0o755)
    return home


def forget_retired(workdir: Path) -> None:
    """Delete the instances :func:`_instance_dir` set aside (once nothing is measured)."""
    shutil.rmtree(Path(workdir) / RETIRED, ignore_errors=True)


def _write_cert(directory: Path, hostname: str) -> tuple[Path, Path]:
    cert_pem, key_pem = self_signed(hostname)
    cert, key = directory / "tls_cert.pem", directory / "tls_key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return cert, key


def _set_ini(path: Path, section: str | None, values: dict[str, str]) -> None:
    """Set ``key = value`` lines of a shipped ini file, keeping every other line as it is.

    An uncommented key of ``section`` is rewritten where it stands; a missing one goes
    after the section's last key (``section=None``: a file without headers, as Haraka's
    smtp.ini). So the rest stays the shipped defaults, keys a later version adds included.
    """
    lines = path.read_text().splitlines() if path.exists() else []
    todo = dict(values)
    current: str | None = None
    last = -1 if section is None else None  # where missing keys go: after this line
    for n, line in enumerate(lines):
        header = re.fullmatch(r"\s*\[([^\]]+)\]\s*", line)
        if header:
            current = header.group(1).strip()
            if current == section:
                last = n
            continue
        if current != section:
            continue
        key = re.match(r"([\w.-]+)\s*=", line.strip())
        if key or section is None:  # headerless: after its last line, comments included
            last = n
        if key and key.group(1) in todo:
            lines[n] = f"{key.group(1)} = {todo.pop(key.group(1))}"
    added = [f"{key} = {value}" for key, value in todo.items()]
    if added and last is None:
        lines += ["", f"[{section}]", *added]
    elif added:
        assert last is not None
        lines[last + 1:last + 1] = added
    path.write_text("\n".join(lines) + "\n")


def _check_closed(route: tuple[str, int]) -> None:
    if route == CLOSED and _port_open(CLOSED[1]):
        raise RuntimeError(f"something listens on 127.0.0.1:{CLOSED[1]}; need a closed port")


# -- harakapy as the README installs it -----------------------------------------------------

VENV_PREFIX = "harakapy-venv-"
# What `pip install .` puts in the wheel (pyproject.toml: the package, force-included
# config/ and plugins/, the README as its description): the venv is rebuilt when they change.
INSTALLED = ("harakapy", "config", "plugins", "pyproject.toml", "README.md")
STALE_AFTER = 15 * 60  # seconds; a venv used this recently may belong to a run going on


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def source_key(repo: Path = REPO) -> str:
    """``REVISION-DIGEST``: the git revision, and a digest of the files ``pip install .``
    installs as they are in the working tree (uncommitted edits included, so the bench
    measures what the tree holds; a clean tree at one revision always gives one key)."""
    revision = _git(repo, "rev-parse", "--short=12", "HEAD").strip()
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                  *INSTALLED)
    digest = hashlib.sha256()
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = repo / name
        if path.is_file():  # a tracked file deleted in the working tree is not installed
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{revision}-{digest.hexdigest()[:10]}"


def installed_harakapy(repo: Path = REPO, into: Path = PEERS_DIR) -> Path:
    """The venv of README's first command for this tree, made on first use: ``python -m
    venv`` and ``pip install .`` (not ``-e``, no extras: what a new user gets).
    Venvs of other trees not used for STALE_AFTER are deleted."""
    into.mkdir(parents=True, exist_ok=True)
    venv = into / f"{VENV_PREFIX}{source_key(repo)}"
    done = venv / ".installed"  # written last: a venv without it was interrupted
    with open(into / ".harakapy-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            _run(sys.executable, "-m", "venv", venv)
            built = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "."],
                                   cwd=repo, capture_output=True, text=True)
            if built.returncode:
                raise RuntimeError(f"pip install . into {venv} failed:\n"
                                   f"{built.stdout[-2000:]}{built.stderr[-2000:]}")
            done.write_text(f"pip install . of {repo}\n")
        done.touch()  # "last used", for the stale rule below
        for other in into.glob(f"{VENV_PREFIX}*"):
            marker = other / ".installed"
            if other != venv and (not marker.exists()
                                  or time.time() - marker.stat().st_mtime > STALE_AFTER):
                shutil.rmtree(other, ignore_errors=True)
    return venv


# -- one process we start ourselves (harakapy, Haraka) ---------------------------------------


class _Child:
    """A peer that is one foreground process (and whatever it forks)."""

    name: str
    stop_timeout: ClassVar[float] = 60

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log: Path | None = None

    def install(self) -> None:
        pass

    def _launch(self, argv: list[str | Path], home: Path, port: int) -> None:
        if not _port_free(port):
            raise RuntimeError(f"{self.name}: 127.0.0.1:{port} is in use")
        self.port, self.log = port, home / f"{self.name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(a) for a in argv], cwd=home, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} at start; "
                                   f"log {self.log}:\n{self.log.read_text()[-2000:]}")
            return _greets(port)

        try:
            _wait(f"{self.name} to greet on {port}", ready)
            _settle(self.pids)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return _tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = _Child.pids(self)  # this process's, not a helper's a subclass counts too
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _wait(f"{self.name} processes to end", lambda: not any(map(_alive, tree)))
        _wait(f"port {self.port} to be free", lambda: _port_free(self.port))
        self.proc = None


class HarakapyPeer(_Child):
    """harakapy on its shipped config (``harakapy init``), but for the listen address,
    the route to the sink and the bench's certificate.

    ``source="install"`` runs it from :func:`installed_harakapy`, as the README installs
    it. ``source="dev"`` runs the harness's own interpreter (the development install): for
    the test suite's smoke run only, never for a table that is compared with other
    servers.
    """

    verifies = True
    EXTRAS = ("tlsrpt", "dkim", "redis", "status")

    def __init__(self, source: str = "install", extras: tuple[str, ...] = ()) -> None:
        """:param extras: plugins turned on beyond the shipped ones, for what they cost:
            ``tlsrpt`` (every TLS session counted), ``dkim`` (every message signed),
            ``redis`` (a fleet node: config/redis.ini pointed at a redis-server of its
            own, whose CPU counts as the node's and whose commands are counted),
            ``status`` (the status page on: every TLS session recorded for it)."""
        super().__init__()
        if source not in ("install", "dev"):
            raise ValueError(f"harakapy source {source!r}: expected install or dev")
        unknown = set(extras) - set(self.EXTRAS)
        if unknown:
            raise ValueError(f"harakapy extras {sorted(unknown)}: expected {self.EXTRAS}")
        self.extras = tuple(extras)
        self.name = "-".join(("harakapy", *extras))
        self.source = source
        self.command: list[str | Path] = [sys.executable, "-m", "harakapy"]
        self.python: str | Path = sys.executable
        self.redis: RedisProcess | None = None

    def install(self) -> None:
        if self.source == "install":
            venv = installed_harakapy()
            self.command, self.python = [venv / "bin" / "harakapy"], venv / "bin" / "python"

    def describe(self) -> str:
        loop = subprocess.run([str(self.python), "-c", "import uvloop"],
                              capture_output=True).returncode
        how = (f"`pip install .` into {Path(self.command[0]).parent.parent.name}"
               if self.source == "install" else f"the development install ({sys.executable})")
        extra = f"; with {' and '.join(self.extras)} on" if self.extras else ""
        return (f"{self.name} {self._version()}: {how}; event loop "
                f"{'asyncio (no uvloop)' if loop else 'uvloop'}; shipped config "
                f"but listen, route, certificate{extra}")

    def _version(self) -> str:
        return subprocess.run([str(self.python), "-c",
                               "import harakapy; print(harakapy.__version__)"],
                              capture_output=True, text=True).stdout.strip()

    def start(self, *, port: int, relay_to: tuple[str, int] | None, workdir: Path,
              verify: Verify | None = None,
              prepare: Callable[[Path], None] | None = None) -> None:
        """As :class:`Peer`; ``prepare(home)`` runs before launch (to preload a spool)."""
        route = relay_to or CLOSED
        _check_closed(route)
        home = _instance_dir(workdir, self.name)
        _run(*self.command, "init", home, stdout=subprocess.DEVNULL)
        config = home / "config"
        cert, key = _write_cert(config, "bench-harakapy.test")
        # The host name, as Debian's postinst writes Postfix's myhostname (shipped: empty,
        # the system's name): the same kind of name in every server's greeting and EHLO.
        (config / "me").write_text("bench-harakapy.test\n")
        # Everything else in smtp.ini stays as shipped: [main] workers among it.
        _set_ini(config / "smtp.ini", "main", {"listen": f"127.0.0.1:{port}"})
        _set_ini(config / "tls.ini", "main", {"key": str(key), "cert": str(cert)})
        if verify is not None:
            _set_ini(config / "tls.ini", "outbound", {"ca_file": str(verify.ca_file)})
            (config / "tls_policy").write_text(
                f"[{route[0]}]:{route[1]} verify match={verify.name}\n")
        # The shipped plugins, then the route: there is no DNS for the sink's domain. The
        # load generator connects from 127.0.0.1, which the shipped relay_acl_allow lets
        # relay.
        with open(config / "plugins", "a") as plugins:
            plugins.write("\n# bench: every domain to the sink (or a closed port)\n"
                          "bench_route\n")
        (home / "plugins" / "bench_route.py").write_text(
            '"""Benchmark routing: every domain to the sink (or a closed port)."""\n\n'
            "from harakapy import hookimpl\n\n\n"
            f"@hookimpl\ndef get_mx(domain):\n    if domain == \"dead.test\":\n"
            f"        return \"{CLOSED[0]}:{CLOSED[1]}\"\n"
            f"    return \"{route[0]}:{route[1]}\"\n")
        self._turn_on_extras(home)
        if "redis" in self.extras:
            self.redis = RedisProcess(home / "redis")
            (config / "redis.ini").write_text(
                f"[main]\nurl = redis://127.0.0.1:{self.redis.port}/0\nnode = bench\n")
        if prepare is not None:
            prepare(home)
        # Logging at its default level (info), as `harakapy run` logs.
        self._launch([*self.command, "run", "-c", home], home, port)


    def pids(self) -> list[int]:
        return super().pids() + (self.redis.pids() if self.redis is not None else [])

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def side_metrics(self, delivered: int) -> dict[str, float]:
        """What the extras add to a case's row: Redis commands per delivered message."""
        if self.redis is None or not delivered:
            return {}
        return {"redis_commands_per_msg": round(self.redis.commands() / delivered, 3)}

    def _turn_on_extras(self, home: Path) -> None:
        config = home / "config"
        plugins = (config / "plugins").read_text()
        if "tlsrpt" in self.extras:
            # Above the TLS policy plugins, as its docs say; reports go nowhere here (the
            # sink's domain publishes no _smtp._tls record): what is measured is counting.
            plugins = "tlsrpt\n" + plugins
            (config / "tlsrpt.ini").write_text(
                "[main]\norganization = bench\ncontact = tlsrpt@bench-harakapy.test\n")
        if "status" in self.extras:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            (config / "status.ini").write_text(
                f"[main]\nenabled = yes\nlisten = 127.0.0.1:{port}\n")
        if "dkim" in self.extras:
            # The load generator's From: domain, with an RSA-2048 key as keygen makes.
            _run(*self.command, "dkim", "keygen", "load.test", "bench", "-c", home,
                 stdout=subprocess.DEVNULL)
            (config / "dkim_sign.ini").write_text(
                "[sign load.test bench]\nkey = dkim/load.test.bench.key\n")
            plugins += "\ndkim_sign\n"
        (config / "plugins").write_text(plugins)


class RedisProcess:
    """Debian's ``redis-server`` on its packaged defaults (RDB snapshots on the
    ``save`` schedule Debian's redis.conf ships, no AOF) on a loopback port, for a fleet
    node; :meth:`commands` counts what it ran since it started, less the bench's own."""

    SAVE = "3600 1 300 100 60 10000"  # Debian's /etc/redis/redis.conf, Redis 7.0

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server",
                                                               path="/usr/sbin:/usr/bin")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--save", self.SAVE, "--appendonly", "no", "--daemonize", "no",
             "--logfile", str(folder / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        _wait("redis-server to answer", lambda: self._info() is not None)
        self._before = self._processed()

    def _info(self) -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
                data = b""
                while b"total_commands_processed" not in data or not data.endswith(b"\r\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.decode(errors="replace")
        except OSError:
            return None

    def _processed(self) -> int:
        info = self._info() or ""
        for line in info.splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":", 1)[1])
        return 0

    def commands(self) -> int:
        """Commands the node sent (this INFO and the one at start not counted)."""
        return max(0, self._processed() - self._before - 1)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HarakaPeer(_Child):
    """Haraka 3 on the config ``haraka -i`` writes; ``nodes`` as shipped (unset: Haraka
    forks one worker) or set (``"cpus"``: a worker per core)."""

    verifies = False  # its outbound TLS checks are not set up here

    def __init__(self, nodes: str | None = None) -> None:
        super().__init__()
        self.nodes = nodes
        self.name = "haraka" if nodes is None else f"haraka-{nodes}"

    def install(self) -> None:
        if not (HARAKA_DIR / "node_modules" / ".bin" / "haraka").exists():
            if not shutil.which("npm"):
                raise RuntimeError("Haraka needs node and npm (apt-get install nodejs npm)")
            HARAKA_DIR.mkdir(parents=True, exist_ok=True)
            _run("npm", "install", "--no-audit", "--no-fund", "--prefix", HARAKA_DIR,
                 "Haraka@3")
        if not (HARAKA_DIR / "dhparams.pem").exists():
            # Haraka's tls makes one at start when missing: seconds of CPU in the run.
            _run("openssl", "dhparam", "-out", HARAKA_DIR / "dhparams.pem", "2048",
                 stderr=subprocess.DEVNULL)

    def describe(self) -> str:
        package = HARAKA_DIR / "node_modules" / "Haraka" / "package.json"
        version = re.search(r'"version":\s*"([^"]+)"', package.read_text())
        node = subprocess.run(["node", "--version"], capture_output=True, text=True)
        return (f"{self.name}: Haraka {version.group(1) if version else '?'} on node "
                f"{node.stdout.strip()}; `haraka -i` config, nodes "
                f"{self.nodes or 'unset (shipped: 1 worker)'}")

    def start(self, *, port: int, relay_to: tuple[str, int] | None, workdir: Path,
              verify: Verify | None = None) -> None:
        if verify is not None:
            raise ValueError(f"{self.name} is not set up to verify the sink")
        route = relay_to or CLOSED
        _check_closed(route)
        home = _instance_dir(workdir, self.name)
        config = home / "config"
        _run(HARAKA_DIR / "node_modules" / ".bin" / "haraka", "-i", home,
             stdout=subprocess.DEVNULL)  # Haraka's own defaults, then ours over them
        shutil.copy(TEMPLATES / "haraka-bench_route.js", home / "plugins" / "bench_route.js")
        shutil.copy(HARAKA_DIR / "dhparams.pem", config / "dhparams.pem")
        _write_cert(config, "bench-haraka.test")
        smtp = {"listen": f"127.0.0.1:{port}",
                # Stops only (shipped 30 s): no message is in flight when the bench stops it.
                "force_shutdown_timeout": "10"}
        if self.nodes is not None:
            smtp["nodes"] = self.nodes
        _set_ini(config / "smtp.ini", None, smtp)
        files = {
            "me": "bench-haraka.test",
            "bench_route": f"{route[0]}:{route[1]}",
            # haraka -i ships mail_from.is_resolvable (DNS the bench has not got),
            # rcpt_to.in_host_list and queue/smtp_forward (a relay to one backend, not
            # Haraka's outbound). The bench needs STARTTLS, relaying and the route.
            "plugins": "tls\nrelay\nbench_route",
            "relay_acl_allow": "127.0.0.1/32\n::1/128",
            "tls.ini": "[main]\nkey=tls_key.pem\ncert=tls_cert.pem\ndhparam=dhparams.pem",
        }
        if route == CLOSED:
            # Accept-only: the first retry after 5 minutes like Postfix and harakapy, so
            # none falls inside the run (Haraka's own: 64 s).
            files["outbound.ini"] = "temp_fail_intervals=5m,10m,20m,40m,1h*8"
        for name, text in files.items():
            (config / name).write_text(text + "\n")
        # log.ini as shipped (level=info), to the log file.
        self._launch([HARAKA_DIR / "node_modules" / ".bin" / "haraka", "-c", home], home, port)


# -- Postfix ---------------------------------------------------------------------------------


class PostfixPeer:
    """Debian's postfix package, its own instance on bench/peers/postfix-main.cf and
    postfix-master.cf (Debian 12's main.cf and master.cf, the lines the bench adds
    marked there)."""

    name = "postfix"
    verifies = True

    def __init__(self) -> None:
        self.conf: Path | None = None
        self.port = 0

    def install(self) -> None:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "postfix"],
                                capture_output=True, text=True).stdout
        if status != "install ok installed":
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            # "No configuration": no /etc/postfix/main.cf, so no system instance to run.
            # The instance the bench runs gets Debian's main.cf from the template instead.
            subprocess.run(["debconf-set-selections"], check=True, text=True, env=env,
                           input="postfix postfix/main_mailer_type select No configuration\n")
            _run("apt-get", "install", "-y", "postfix", env=env, stdout=subprocess.DEVNULL)
        stop_system_postfix()

    def describe(self) -> str:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"],
                                 capture_output=True, text=True).stdout
        return (f"postfix {version}: Debian 12's main.cf (TLS settings and client session "
                "cache included) and master.cf (process limits as shipped), chroot off")

    def start(self, *, port: int, relay_to: tuple[str, int] | None, workdir: Path,
              verify: Verify | None = None) -> None:
        route = relay_to or CLOSED
        _check_closed(route)
        if not _port_free(port):
            raise RuntimeError(f"postfix: 127.0.0.1:{port} is in use")
        for parent in [Path(workdir).resolve(), *Path(workdir).resolve().parents]:
            if parent.exists() and parent.stat().st_mode & 0o002:
                raise ValueError(f"{workdir}: under world-writable {parent}; Postfix refuses "
                                 f"such a queue directory (use {PEERS_DIR})")
        home = _instance_dir(workdir, self.name)
        conf = home / "conf"
        conf.mkdir()
        cert, key = _write_cert(conf, "bench-postfix.test")
        (home / "queue").mkdir()  # postfix check fills it, but does not make it
        values = {"home": home, "queue": home / "queue", "data": home / "data",
                  "maillog": home / "postfix.log", "relay_host": route[0],
                  "relay_port": route[1], "cert": cert, "key": key,
                  "tls_out": "verify" if verify else "may",
                  "tls_verify": (f"smtp_tls_CAfile = {Path(verify.ca_file).resolve()}\n"
                                 f"smtp_tls_verify_cert_match = {verify.name}")
                  if verify else ""}
        main = (TEMPLATES / "postfix-main.cf").read_text()
        (conf / "main.cf").write_text(main.format(**values))
        master = (TEMPLATES / "postfix-master.cf").read_text()
        (conf / "master.cf").write_text(master.replace("{listen}", f"127.0.0.1:{port}"))
        self.conf, self.port = conf, port
        for command in ("check", "start"):  # check creates the queue directories too
            if subprocess.run(["postfix", "-c", conf, command],
                              capture_output=True).returncode:
                # Without a terminal Postfix says why only in its log (if it got that far).
                log = home / "postfix.log"
                raise RuntimeError(f"postfix -c {conf} {command} failed; "
                                   f"see {log if log.exists() else 'its output on a terminal'}")
        _wait(f"postfix to greet on {port}", lambda: _greets(port))
        _settle(self.pids)

    def _master(self) -> int | None:
        if self.conf is None:
            return None
        try:
            pid = int((self.conf.parent / "queue" / "pid" / "master.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def pids(self) -> list[int]:
        master = self._master()
        return _tree(master) if master else []

    def stop(self) -> None:
        if self.conf is None:
            return
        tree = self.pids()
        if tree:
            _run("postfix", "-c", self.conf, "stop", stderr=subprocess.DEVNULL)
        _wait("postfix processes to end", lambda: not any(map(_alive, tree)))
        _wait(f"port {self.port} to be free", lambda: _port_free(self.port))
        self.conf = None


def stop_system_postfix() -> None:
    """Stop the instance of /etc/postfix if the package's install started it."""
    if subprocess.run(["postfix", "status"], capture_output=True).returncode == 0:
        _run("postfix", "stop", capture_output=True)


PEERS: dict[str, Callable[[], Peer]] = {
    "harakapy": HarakapyPeer,
    "harakapy-tlsrpt": lambda: HarakapyPeer(extras=("tlsrpt",)),
    "harakapy-dkim": lambda: HarakapyPeer(extras=("dkim",)),
    # A fleet node, counting TLS sessions for fleet-wide reports (docs/fleet.md).
    "harakapy-tlsrpt-redis": lambda: HarakapyPeer(extras=("tlsrpt", "redis")),
    # The status page on (docs/status-page.md): what recording every session costs.
    "harakapy-status": lambda: HarakapyPeer(extras=("status",)),
    "haraka": HarakaPeer,
    "haraka-cpus": lambda: HarakaPeer(nodes="cpus"),
    "postfix": PostfixPeer,
}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start one peer by hand; Ctrl-C stops it.")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--relay-to", type=int, metavar="PORT",
                        help="the sink's port on 127.0.0.1; none: mail stays deferred")
    parser.add_argument("--workdir", type=Path, default=PEERS_DIR / "manual")
    args = parser.parse_args()
    peer = PEERS[args.peer]()
    peer.install()
    peer.start(port=args.port, relay_to=args.relay_to and ("127.0.0.1", args.relay_to),
               workdir=args.workdir)
    print(f"{peer.describe()}\non 127.0.0.1:{args.port}, pids {peer.pids()}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
        forget_retired(args.workdir)


if __name__ == "__main__":
    main()
