"""The servers under test, each started as a private instance with one interface.

    peer = PEERS["postfix"]()
    peer.install()                     # idempotent
    peer.start(port=2525, relay_to=("127.0.0.1", 2600), starttls_out=True, workdir=WORK)
    ... load; sum /proc/PID/stat over peer.pids() ...
    peer.stop()                        # waits until the port is free and processes are gone

Each instance lives in ``workdir/NAME`` (fresh at each start): config, queue, log and a
self-signed certificate that all three offer for inbound STARTTLS. It listens on
127.0.0.1:port, lets 127.0.0.0/8 relay, and hands every relayed message to ``relay_to``;
with ``relay_to=None`` to a closed port, so mail is accepted into the queue and deferred
(the first retry of every peer is 5 minutes later). Durability is the same: all three
fsync the queue file before answering 250 (Postfix's cleanup; Haraka's FsyncWriteStream,
which does not fsync the directory after its rename; harakapy fsyncs file and directory).

``pids()`` are the processes alive now. Processes that exit during a run (Postfix's
smtpd and smtp come and go) are counted in their parent's cutime/cstime once reaped, so
CPU time is utime+stime+cutime+cstime of every pid, sampled before and after.

``workdir`` must not be under a world-writable directory such as /tmp: Postfix refuses
such a queue. ``bench/.peers/`` (git-ignored) is the place:

    python -m bench.peers postfix --port 2525 --relay-to 2600   # start; Ctrl-C stops
"""

from __future__ import annotations

import os
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

from harakapy.tls.context import self_signed

HERE = Path(__file__).resolve().parent
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

    def start(self, *, port: int, relay_to: tuple[str, int] | None, starttls_out: bool,
              workdir: Path, verify: Verify | None = None) -> None: ...

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


def _check_closed(route: tuple[str, int]) -> None:
    if route == CLOSED and _port_open(CLOSED[1]):
        raise RuntimeError(f"something listens on 127.0.0.1:{CLOSED[1]}; need a closed port")


# -- one process we start ourselves (harakapy, Haraka) ---------------------------------------


class _Child:
    """A peer that is one foreground process (and whatever it forks)."""

    name: ClassVar[str]
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
            return _port_open(port)

        try:
            _wait(f"{self.name} to listen on {port}", ready)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return _tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = self.pids()
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
    name = "harakapy"

    verifies = True

    def start(self, *, port: int, relay_to: tuple[str, int] | None, starttls_out: bool,
              workdir: Path, verify: Verify | None = None,
              prepare: Callable[[Path], None] | None = None) -> None:
        """As :class:`Peer`; ``prepare(home)`` runs before launch (to preload a spool)."""
        # Outbound STARTTLS is always opportunistic in harakapy (no switch): with a sink
        # that offers none, starttls_out=False is the same thing.
        route = relay_to or CLOSED
        _check_closed(route)
        home = _instance_dir(workdir, self.name)
        _run(sys.executable, "-m", "harakapy", "init", home, stdout=subprocess.DEVNULL)
        config = home / "config"
        cert, key = _write_cert(config, "bench-harakapy.test")
        (config / "me").write_text("bench-harakapy.test\n")
        (config / "smtp.ini").write_text(f"[main]\nlisten = 127.0.0.1:{port}\n")
        tls_ini = f"[main]\nkey = {key}\ncert = {cert}\n"
        plugins = "tls\nrelay\nbench_route\n"
        if verify is not None:
            tls_ini += f"[outbound]\nca_file = {verify.ca_file}\n"
            (config / "tls_policy").write_text(
                f"[{route[0]}]:{route[1]} verify match={verify.name}\n")
            plugins += "tls_require\n"
        (config / "tls.ini").write_text(tls_ini)
        (config / "relay_acl_allow").write_text("127.0.0.0/8\n")
        (config / "plugins").write_text(plugins)
        (home / "plugins" / "bench_route.py").write_text(
            '"""Benchmark routing: every domain to the sink (or a closed port)."""\n\n'
            "from harakapy import hookimpl\n\n\n"
            f"@hookimpl\ndef get_mx(domain):\n    if domain == \"dead.test\":\n"
            f"        return \"{CLOSED[0]}:{CLOSED[1]}\"\n"
            f"    return \"{route[0]}:{route[1]}\"\n")
        if prepare is not None:
            prepare(home)
        self._launch([sys.executable, "-m", "harakapy", "run", "-c", home,
                      "--log-level", "warning"], home, port)


class HarakaPeer(_Child):
    name = "haraka"
    verifies = False  # its outbound TLS checks are not set up here

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

    def start(self, *, port: int, relay_to: tuple[str, int] | None, starttls_out: bool,
              workdir: Path) -> None:
        route = relay_to or CLOSED
        _check_closed(route)
        home = _instance_dir(workdir, self.name)
        config = home / "config"
        _run(HARAKA_DIR / "node_modules" / ".bin" / "haraka", "-i", home,
             stdout=subprocess.DEVNULL)  # Haraka's own defaults, then ours over them
        shutil.copy(TEMPLATES / "haraka-bench_route.js", home / "plugins" / "bench_route.js")
        shutil.copy(HARAKA_DIR / "dhparams.pem", config / "dhparams.pem")
        _write_cert(config, "bench-haraka.test")
        files = {
            "me": "bench-haraka.test",
            "bench_route": f"{route[0]}:{route[1]}",
            # nodes=0: no cluster, one process that listens and runs the queue.
            "smtp.ini": f"[main]\nlisten=127.0.0.1:{port}\nnodes=0\n"
                        "force_shutdown_timeout=10\n",
            "log.ini": "[main]\nlevel=warn\n",
            "plugins": "tls\nrelay\nbench_route\n",
            "relay_acl_allow": "127.0.0.0/8",
            "tls.ini": "[main]\nkey=tls_key.pem\ncert=tls_cert.pem\ndhparam=dhparams.pem\n",
            # First retry after 5 minutes like Postfix and harakapy (Haraka's own: 64 s).
            "outbound.ini": f"enable_tls={'true' if starttls_out else 'false'}\n"
                            "temp_fail_intervals=5m,10m,20m,40m,1h*8\n",
        }
        for name, text in files.items():
            (config / name).write_text(text + "\n")
        self._launch([HARAKA_DIR / "node_modules" / ".bin" / "haraka", "-c", home], home, port)


# -- Postfix ---------------------------------------------------------------------------------


class PostfixPeer:
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
            subprocess.run(["debconf-set-selections"], check=True, text=True, env=env,
                           input="postfix postfix/main_mailer_type select No configuration\n")
            _run("apt-get", "install", "-y", "postfix", env=env, stdout=subprocess.DEVNULL)
        stop_system_postfix()

    def start(self, *, port: int, relay_to: tuple[str, int] | None, starttls_out: bool,
              workdir: Path, verify: Verify | None = None) -> None:
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
                  "tls_out": "verify" if verify else "may" if starttls_out else "none",
                  "tls_verify": (f"smtp_tls_CAfile = {verify.ca_file}\n"
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
        _wait(f"postfix to listen on {port}", lambda: _port_open(port))

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


PEERS: dict[str, type[Peer]] = {peer.name: peer
                                 for peer in (HarakapyPeer, HarakaPeer, PostfixPeer)}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start one peer by hand; Ctrl-C stops it.")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--relay-to", type=int, metavar="PORT",
                        help="the sink's port on 127.0.0.1; none: mail stays deferred")
    parser.add_argument("--starttls-out", action="store_true")
    parser.add_argument("--workdir", type=Path, default=PEERS_DIR / "manual")
    args = parser.parse_args()
    peer = PEERS[args.peer]()
    peer.install()
    peer.start(port=args.port, relay_to=args.relay_to and ("127.0.0.1", args.relay_to),
               starttls_out=args.starttls_out, workdir=args.workdir)
    print(f"{peer.name} on 127.0.0.1:{args.port}, pids {peer.pids()}", flush=True)
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
