"""Debian's real Postfix (3.7) as the receiving MX of an interop test: our outbound client
talks to the SMTP server most of the Internet's mail meets, not to a fake written to agree
with it.

    async with PostfixReceiver(ip="127.0.0.21", port=2525, cert=(cert_file, key_file),
                               domains=["example.test"]) as mx:
        ... deliver to 127.0.0.21:2525 ...
        [message] = await mx.wait_for_messages(1)
        message.sender, message.recipients, message.message["Received"]
        await mx.wait_for_log(r"disconnect from ")   # the test's session has ended
        mx.transcript()   # ["> 220 mx.example.test ESMTP Postfix", "< EHLO ...", ...]

Each instance is a private Postfix (``postfix -c CONF start``): its own main.cf and
master.cf, queue, data directory and log file in a fresh directory, listening on one
address (master.cf ``IP:PORT inet n - n - - smtpd``), started and stopped by the test.
Postfix's defaults stay as compatibility level 3.6 (Debian 12's) makes them: EHLO offers
what 3.7 has (PIPELINING, SIZE, STARTTLS, 8BITMIME, DSN, SMTPUTF8, CHUNKING; no REQUIRETLS),
and a MAIL FROM parameter it does not know gets ``555 5.5.4 Unsupported option``. The
lines :func:`main_cf` sets differ from them only where a private instance on loopback
must, or where loopback would make Postfix treat the test's client as one of its own and
not as the remote peer a receiving MX sees:

- ``mydestination`` is the domains and ``local_recipient_maps`` empty: any local part of
  them is accepted (by default Postfix would look it up among the machine's users).
- ``mynetworks`` is empty, ``local_header_rewrite_clients`` too: the client connects from
  127.0.0.1, which by default would be a trusted network (relay to anywhere allowed) and a
  local client (Message-ID, Date and From added, addresses rewritten). Mail for other
  domains gets ``454 4.7.1 Relay access denied``, as from any stranger.
- ``smtpd_tls_received_header = yes`` and ``smtpd_tls_loglevel = 1``: the Received header
  says ``(using TLSv1.3 with cipher ...)`` and the log says ``TLS connection established``.
- ``debug_peer_list`` is the loopback network (``transcript=False`` turns it off): smtpd
  logs every command and reply of the session (``< client: MAIL FROM:...``, ``> client:
  555 ...``). Postfix logs nothing else about a refused MAIL FROM parameter (its
  ``disconnect`` line counts it, ``mail=1/2``); the transcript is the only record of
  which one. It makes the log verbose (hundreds of lines a session).

Where received mail goes: the hold queue. ``smtpd_end_of_data_restrictions =
check_client_access static:HOLD`` puts every accepted message (DATA or BDAT LAST) on
hold, and :meth:`PostfixReceiver.messages` reads each held queue file with ``postcat``,
Postfix's own reader. Why not a mailbox: a queue file holds the envelope exactly as smtpd
accepted it (the sender, every recipient with its DSN NOTIFY and ORCPT, ENVID, RET, BODY,
in one file per transaction), and the message exactly as queued, Postfix's Received
header on top. A mailbox has one copy per recipient with the envelope only as Return-Path
and Delivered-To headers; a virtual mailbox wants a uid and a directory it owns; local
delivery as root writes to real users' mailboxes (root@ to /var/mail/root). Held mail is
never delivered; should a message escape the hold anyway, ``local_transport = discard``
keeps it from reaching a mailbox.

Where the files live: a fresh ``postfix-receiver-*`` directory under the temporary
directory (/tmp), mode 0755 and root's, removed at stop. Postfix's daemons run as the
user ``postfix``, so every parent directory must let others through (o+x): pytest's
tmp_path does not (``/tmp/pytest-of-root`` is 0700, and ``master`` then dies with "open
lock file .../data/master.lock: Permission denied"). A world-writable parent such as /tmp
is not a problem to Postfix 3.7. The log is kept in memory at stop, so
:meth:`PostfixReceiver.log` answers after the directory is gone.

Postfix runs as root, as packaged: its master process must start as root. Without root,
or without Postfix, the test is skipped (the reason says how to install it); under
``CI=true`` Postfix is installed when missing (:func:`require_postfix`) and anything else
missing fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import functools
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.dnssec_world import missing_binary

# Where Debian puts Postfix's commands; a non-root PATH often lacks /usr/sbin.
SBIN = "/usr/sbin:/usr/local/sbin"
# "No configuration": the package writes no /etc/postfix/main.cf, so it has no system
# instance to start and nothing listens on port 25; each test runs its own instance.
PRESEED = "postfix postfix/main_mailer_type select No configuration\n"

# Seconds; a start takes about 0.3 s and a stop about 0.05 s (Debian 12, Postfix 3.7).
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.02

# Postfix's client-side attributes of one recipient: they precede its recipient record.
RECIPIENT_ATTRIBUTES = frozenset({"notify_flags", "dsn_orig_rcpt"})

# master.cf: Debian 12's /usr/share/postfix/master.cf.dist, with the smtpd service on
# {listen} instead of "smtp", chroot "n" everywhere (a private queue directory has none of
# the files a chroot needs), and the pipe transports (maildrop, uucp, ...) left out.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class ReceiverError(RuntimeError):
    """Postfix did not start, stop, or receive in time. The message carries its log tail."""


@dataclass(frozen=True)
class PostfixTools:
    """The commands of the installed Postfix, as absolute paths."""

    postfix: str
    postcat: str


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _installed() -> PostfixTools | None:
    postfix, postcat = _which("postfix"), _which("postcat")
    return PostfixTools(postfix, postcat) if postfix and postcat else None


def install_postfix() -> None:
    """Install Debian's postfix package with "No configuration" (see :data:`PRESEED`), and
    stop the package's own instance should its install have started one."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=PRESEED, text=True, check=True, env=env)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    if subprocess.run(install, env=env, capture_output=True).returncode:
        # A fresh machine may have no package lists yet.
        for argv in (["apt-get", "update", "-q"], install):
            result = subprocess.run(argv, env=env, capture_output=True, text=True)
            if result.returncode:
                raise ReceiverError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                    + (result.stdout + result.stderr)[-2000:])
    tools = _installed()
    if tools is None:
        raise ReceiverError("apt-get installed postfix, but postfix or postcat is missing")
    if subprocess.run([tools.postfix, "status"], capture_output=True).returncode == 0:
        subprocess.run([tools.postfix, "stop"], capture_output=True, check=True)


@functools.cache
def _require_postfix_once() -> PostfixTools:
    tools = _installed()
    if tools is None:
        install_postfix()
        tools = _installed()
    assert tools is not None
    return tools


def require_postfix() -> PostfixTools:
    """Postfix's commands, for a test about to start an instance.

    Without root (Postfix's master must start as root) or without Postfix the test is
    skipped; under ``CI=true`` a missing Postfix is installed (once per session) and a
    missing root fails the test (:func:`tests.dnssec_world.missing_binary`). Outside CI
    this never installs anything: the developer's machine is theirs.
    """
    if os.geteuid() != 0:
        missing_binary("PostfixReceiver needs root: Postfix's master process starts as root")
    tools = _installed()
    if tools is not None:
        return tools
    if os.environ.get("CI") != "true":
        missing_binary("postfix not found: echo 'postfix postfix/main_mailer_type select No "
                       "configuration' | debconf-set-selections; apt-get install postfix")
    return _require_postfix_once()


@dataclass(frozen=True)
class HeldMessage:
    """One accepted SMTP transaction, as Postfix queued it.

    :ivar queue_id: Postfix's queue ID (the one in its Received header and "queued as").
    :ivar sender: The MAIL FROM address ("" for the null sender ``<>``).
    :ivar recipients: Every accepted RCPT TO address, in order.
    :ivar raw: The message as queued: Postfix's Received header on top, lines ending in LF
        (Postfix stores lines, not CRLF), the end-of-data dot and dot-stuffing gone.
    :ivar attributes: The envelope's named attributes, e.g. ``encoding`` (``8bit`` after
        BODY=8BITMIME), ``envelope_id`` (ENVID), ``ret_flags`` (RET), ``helo_name``,
        ``protocol_name`` (``ESMTP``; TLS shows in the Received header, not here).
    :ivar recipient_attributes: Per recipient address, its DSN attributes
        (``notify_flags``, ``dsn_orig_rcpt``) and ``original_recipient``.
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    recipient_attributes: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def message(self) -> email.message.EmailMessage:
        """``raw`` parsed; ``message["Received"]`` is the header Postfix added."""
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    @property
    def received(self) -> str:
        """The topmost Received header, the one this Postfix added, with each run of
        whitespace (folding included) as one space, e.g. ``from client.test (localhost
        [127.0.0.1]) (using TLSv1.3 with cipher ...) ... by mx.example.test (Postfix) with
        ESMTPS id ...``."""
        header = self.message.get_all("Received", [""])[0]
        return " ".join(str(header).split())

    @property
    def body(self) -> bytes:
        """The bytes after the header's empty line."""
        return self.raw.partition(b"\n\n")[2]


def parse_postcat(queue_id: str, output: bytes) -> HeldMessage:
    """A :class:`HeldMessage` from ``postcat -q ID``'s output: envelope records up to the
    ``*** MESSAGE CONTENTS`` line, then the message verbatim up to ``*** HEADER
    EXTRACTED``. The markers name the queue file, so a message line cannot pass for one."""
    lines = output.split(b"\n")
    markers = [n for n, line in enumerate(lines)
               if re.fullmatch(rb"\*\*\* (MESSAGE CONTENTS|HEADER EXTRACTED) \w+/"
                               + re.escape(queue_id.encode()) + rb" \*\*\*", line)]
    if len(markers) < 2:
        raise ReceiverError(f"postcat output for {queue_id} has no message section:\n"
                            + output.decode(errors="replace")[-2000:])
    contents, extracted = markers[0], markers[1]
    sender: str | None = None
    recipients: list[str] = []
    attributes: dict[str, str] = {}
    per_recipient: dict[str, dict[str, str]] = {}
    pending: dict[str, str] = {}
    for line in lines[1:contents]:
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        value = value.removeprefix(" ")
        if name == "named_attribute":
            key, _, attribute = value.partition("=")
            (pending if key in RECIPIENT_ATTRIBUTES else attributes)[key] = attribute
        elif name == "sender":
            sender = value
        elif name == "original_recipient":
            pending["original_recipient"] = value
        elif name == "recipient":
            recipients.append(value)
            per_recipient[value] = pending
            pending = {}
    if sender is None:
        raise ReceiverError(f"postcat output for {queue_id} has no sender record")
    raw = b"\n".join(lines[contents + 1:extracted])
    return HeldMessage(queue_id, sender, tuple(recipients), raw + b"\n" if raw else b"",
                       attributes, per_recipient)


def main_cf(*, home: Path, hostname: str, domains: Iterable[str], cert: Path | None,
            key: Path | None, transcript: bool) -> dict[str, str]:
    """The main.cf of one instance, as parameter to value (see the module docstring)."""
    settings = {
        "compatibility_level": "3.6",
        "myhostname": hostname,
        "mydestination": ", ".join(domains),
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "local_transport": "discard:held mail only",
        "mynetworks": "",
        "local_header_rewrite_clients": "",
        "inet_protocols": "ipv4",
        "inet_interfaces": "loopback-only",
        "queue_directory": str(home / "queue"),
        "data_directory": str(home / "data"),
        "maillog_file": str(home / "postfix.log"),
        "maillog_file_prefixes": str(home),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "smtpd_end_of_data_restrictions": "check_client_access static:HOLD",
        "smtpd_tls_security_level": "none" if cert is None else "may",
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_loglevel": "1",
    }
    if cert is not None and key is not None:
        settings["smtpd_tls_cert_file"] = str(cert)
        settings["smtpd_tls_key_file"] = str(key)
    if transcript:
        settings["debug_peer_list"] = "127.0.0.0/8"
    return settings


def _port_free(ip: str, port: int) -> bool:
    """Could Postfix bind ``ip:port`` now? SO_REUSEADDR as Postfix sets it: connections
    left in TIME_WAIT do not count, a listener (master or an smtpd child) does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError:
            return False
        return True


def _free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``. Postfix's master leads its own group and
    its daemons stay in it, also once the master is gone and they belong to init;
    zombies count as gone (a container's init may never reap them)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _check_traversable(directory: Path) -> None:
    for parent in (directory, *directory.parents):
        if not parent.stat().st_mode & 0o001:
            raise ReceiverError(f"{parent} is not searchable by others (o+x): Postfix's "
                                f"daemons (user postfix) could not reach {directory}")


def _read_pem(path: Path, kind: str) -> bytes:
    data = Path(path).read_bytes()
    if kind.encode() not in data:
        raise ValueError(f"{path}: no {kind} (cert is (certificate file, key file))")
    return data


class PostfixReceiver:
    """A private Postfix accepting mail for ``domains`` on ``ip:port``; ``async with``.

    :param ip: The IPv4 address smtpd listens on (any 127.0.0.0/8 address works on
        Linux without configuring it).
    :param port: Its port; ``None``: one the OS says is free now.
    :param cert: ``(certificate file, key file)`` in PEM (the certificate file may hold
        the chain after the leaf): STARTTLS is offered with them (level ``may``).
        ``None``: no STARTTLS.
    :param domains: The domains Postfix is the final destination for; any local part is
        accepted, other domains get ``454 4.7.1 Relay access denied``.
    :param hostname: ``myhostname``: the greeting, EHLO and Received header name
        (default ``mx.`` and the first domain).
    :param settings: main.cf parameters over those of :func:`main_cf`, for a test that
        needs Postfix otherwise (e.g. ``{"smtpd_tls_security_level": "encrypt"}``).
    :param transcript: Log every SMTP command and reply (see the module docstring).
    :param parent: Where the instance's directory is made (default: the temporary
        directory); every directory on the way must be searchable by others.
    """

    def __init__(self, ip: str = "127.0.0.1", port: int | None = None, *,
                 cert: tuple[Path | str, Path | str] | None = None,
                 domains: Iterable[str] = ("example.test",), hostname: str | None = None,
                 settings: Mapping[str, str] | None = None, transcript: bool = True,
                 parent: Path | None = None) -> None:
        if ipaddress.ip_address(ip).version != 4:
            raise ValueError(f"{ip}: the receiver listens on IPv4 only (inet_protocols)")
        self.ip = ip
        self.port = port or 0
        self.domains = tuple(domains)
        if not self.domains:
            raise ValueError("PostfixReceiver needs at least one domain")
        self.hostname = hostname or f"mx.{self.domains[0]}"
        # Read now: a swapped pair or a missing file fails here, not in Postfix's log.
        self._cert = ((_read_pem(Path(cert[0]), "CERTIFICATE"),
                       _read_pem(Path(cert[1]), "PRIVATE KEY"))
                      if cert is not None else None)
        self._settings = dict(settings or {})
        self._transcript = transcript
        self._parent = parent
        self.directory = Path()
        self.tools: PostfixTools | None = None
        self._master: int | None = None
        self._messages: dict[str, HeldMessage] = {}
        self._final_log: str | None = None
        self._probes = 0  # sessions the start opened, in the log before the tests' own
        self._log_offset = 0  # where the log after those begins

    @property
    def conf(self) -> Path:
        """The instance's config directory, for ``postfix -c`` / ``postconf -c``."""
        return self.directory / "conf"

    @property
    def queue(self) -> Path:
        return self.directory / "queue"

    @property
    def log_path(self) -> Path:
        return self.directory / "postfix.log"

    # -- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> PostfixReceiver:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Write the instance, ``postfix -c CONF start`` and wait until smtpd greets with
        220 and answers EHLO, and with a certificate until a STARTTLS handshake succeeds:
        a key Postfix cannot use shows here, not in the test's first session."""
        self.tools = require_postfix()
        if self.port == 0:
            self.port = _free_port(self.ip)
        elif not _port_free(self.ip, self.port):
            raise ReceiverError(f"{self.ip}:{self.port} is in use")
        parent = Path(self._parent or tempfile.gettempdir()).resolve()
        self.directory = Path(tempfile.mkdtemp(prefix="postfix-receiver-", dir=parent))
        try:
            self.directory.chmod(0o755)
            _check_traversable(self.directory)
            self._write_config()
            await self._run("start")
            self._master = self._read_master()
            await self._wait_greeting()
            await self._until(self._probes_logged, START_TIMEOUT,
                              "the start's probe session to end in the log")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """``postfix -c CONF stop``; wait until every process of the instance is gone and
        its port is free; keep the log in memory; remove the directory. Idempotent."""
        if not self.directory.name:
            return
        try:
            master = self._master or self._read_master()
            if master is not None and _group_members(master):
                await self._run("stop", check=False)
                await self._until(lambda: not _group_members(master), STOP_TIMEOUT,
                                  f"Postfix's processes (group {master}) to end")
            if self.port:
                await self._until(lambda: _port_free(self.ip, self.port), STOP_TIMEOUT,
                                  f"{self.ip}:{self.port} to be free")
        finally:
            self._final_log = self._read_log()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = Path()
            self._master = None

    def _write_config(self) -> None:
        conf = self.conf
        conf.mkdir(mode=0o755)
        (self.directory / "queue").mkdir(mode=0o755)  # Postfix fills it, but does not make it
        cert = key = None
        if self._cert is not None:
            cert, key = conf / "cert.pem", conf / "key.pem"
            cert.write_bytes(self._cert[0])
            key.touch(mode=0o600)
            key.write_bytes(self._cert[1])
        settings = main_cf(home=self.directory, hostname=self.hostname, domains=self.domains,
                           cert=cert, key=key, transcript=self._transcript)
        settings.update(self._settings)
        main = conf / "main.cf"
        main.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
        # Postfix rereads a main.cf changed in the last second or so (it may be mid-edit),
        # 0.3 s a time: about 1.8 s of every start, for a file that is complete already.
        written = time.time() - 60
        os.utime(main, (written, written))
        (conf / "master.cf").write_text(MASTER_CF.replace("{listen}", f"{self.ip}:{self.port}"))

    async def _run(self, command: str, *, check: bool = True) -> None:
        assert self.tools is not None
        # An absolute -c: postfix-script changes into the queue directory first.
        argv = [self.tools.postfix, "-c", str(self.conf.resolve()), command]
        result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                         stdin=subprocess.DEVNULL)
        if check and result.returncode:
            # Without a terminal postfix-script writes its reasons to the log only.
            raise ReceiverError(f"{' '.join(argv)} exited {result.returncode}\n"
                                f"{result.stdout}{result.stderr}{self.log_tail()}")

    def _read_master(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text())
        except (OSError, ValueError):
            return None

    async def _wait_greeting(self) -> None:
        async def probe() -> bool:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.ip, self.port), 5)
            except OSError:
                return False
            self._probes += 1
            try:
                async with asyncio.timeout(10):
                    if not (await reader.readline()).startswith(b"220"):
                        return False
                    await self._probe_session(reader, writer)
            except ssl.SSLError as error:
                raise ReceiverError(f"the TLS handshake after STARTTLS failed: {error}\n"
                                    + self.log_tail()) from error
            except (OSError, TimeoutError):
                return False
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await probe():
            if self._master is None or not _group_members(self._master):
                raise ReceiverError("Postfix's master is gone\n" + self.log_tail())
            if loop.time() > deadline:
                raise ReceiverError(f"no SMTP greeting on {self.ip}:{self.port} within "
                                    f"{START_TIMEOUT} s\n{self.log_tail()}")
            await asyncio.sleep(POLL_INTERVAL)

    async def _probe_session(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """EHLO, and with a certificate STARTTLS and a handshake: Postfix offers STARTTLS
        even when it cannot load the key, and says so only to the STARTTLS command
        (``454 4.7.0 TLS not available due to local problem``)."""

        async def reply() -> bytes:
            lines = [await reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(await reader.readline())
            return b"".join(lines)

        writer.write(b"EHLO probe.invalid\r\n")
        await reply()
        if self._cert is not None:
            writer.write(b"STARTTLS\r\n")
            answer = await reply()
            if not answer.startswith(b"220"):
                raise ReceiverError(f"Postfix answers STARTTLS with {answer!r}: it could not "
                                    f"use the certificate and key\n{self.log_tail()}")
            # The probe asks whether TLS works, not whether the test's CA trusts it.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await writer.start_tls(context)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await reader.readline()

    def _probes_logged(self) -> bool:
        """Has smtpd logged the end of every session the start opened? Then the log from
        :attr:`_log_offset` on is the tests' own (see :meth:`session_log`)."""
        text = self._read_log()
        ends = [found.end() for found in
                re.finditer(r"postfix/smtpd\[\d+\]: disconnect from .*\n", text)]
        if len(ends) < self._probes:
            return False
        self._log_offset = ends[self._probes - 1]
        return True

    async def _until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if loop.time() > deadline:
                raise ReceiverError(f"timed out after {timeout} s waiting for {what}\n"
                                    + self.log_tail())
            await asyncio.sleep(POLL_INTERVAL)

    # -- received mail -------------------------------------------------------------------

    async def messages(self) -> list[HeldMessage]:
        """Every message received so far, in the order Postfix queued them (by the queue
        file's time; queue IDs are not ordered)."""
        hold = self.queue / "hold"
        try:
            entries = [(entry.stat().st_mtime_ns, entry.name) for entry in os.scandir(hold)
                       if entry.is_file()]
        except FileNotFoundError:
            return []
        for _, queue_id in entries:
            if queue_id not in self._messages:
                self._messages[queue_id] = await self._postcat(queue_id)
        return [self._messages[queue_id] for _, queue_id in sorted(entries)]

    async def _postcat(self, queue_id: str) -> HeldMessage:
        assert self.tools is not None
        argv = [self.tools.postcat, "-c", str(self.conf.resolve()), "-q", queue_id]
        result = await asyncio.to_thread(subprocess.run, argv, capture_output=True,
                                         stdin=subprocess.DEVNULL)
        if result.returncode:
            raise ReceiverError(f"{' '.join(argv)} exited {result.returncode}: "
                                + result.stderr.decode(errors="replace"))
        return parse_postcat(queue_id, result.stdout)

    async def wait_for_messages(self, count: int = 1, timeout: float = 10.0
                                ) -> list[HeldMessage]:
        """Until at least ``count`` messages are on hold; all of them, in queue order.

        A message is on hold by the time its client has read the 250 (cleanup moves it
        there before it answers smtpd), so this only waits for a delivery in flight.
        Raises :class:`ReceiverError` with the queues' contents and the log tail when
        ``timeout`` seconds pass first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(held := await self.messages()) < count:
            if loop.time() > deadline:
                elsewhere = {name: sorted(os.listdir(self.queue / name))
                             for name in ("incoming", "active", "deferred", "corrupt")
                             if (self.queue / name).is_dir() and os.listdir(self.queue / name)}
                raise ReceiverError(f"{len(held)} of {count} messages on hold after "
                                    f"{timeout} s; other queues: {elsewhere or 'empty'}\n"
                                    + self.log_tail())
            await asyncio.sleep(POLL_INTERVAL)
        return held

    # -- Postfix's log -------------------------------------------------------------------

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return ""

    def log(self) -> str:
        """Postfix's log (maillog_file) so far, from its start; after :meth:`stop`, all of
        it. postlogd writes what the daemons send it a moment later: wait for a line with
        :meth:`wait_for_log` rather than reading right after a session."""
        if self._final_log is not None and not self.directory.name:
            return self._final_log
        return self._read_log()

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log, for failure messages."""
        text = self.log().splitlines()[-lines:]
        return "--- postfix.log\n" + ("\n".join(text) if text else "(empty)")

    def session_log(self) -> str:
        """The log after :meth:`start` returned: without the start's own lines and its
        probe session (which :meth:`start` waits to see logged), so that whatever smtpd
        logs here came from the test's sessions."""
        return self.log()[self._log_offset:]

    async def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0
                           ) -> re.Match[str]:
        """Until a line of :meth:`session_log` matches ``pattern`` (``re.search``, ``^``
        and ``$`` at a line's ends for a ``str`` pattern); the first match.

        smtpd's last line of a session is ``disconnect from CLIENT`` with its command
        counts (``ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=6``); once it is
        there, so is the whole session's transcript.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.M)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if found := regex.search(self.session_log()):
                return found
            if loop.time() > deadline:
                raise ReceiverError(f"no log line matched {regex.pattern!r} within "
                                    f"{timeout} s\n{self.log_tail()}")
            await asyncio.sleep(POLL_INTERVAL)

    def transcript(self) -> list[str]:
        """The SMTP lines smtpd logged of the test's sessions (``transcript=True``), in
        order, as ``"< COMMAND"`` (from the client) and ``"> REPLY"`` (to it); the
        handshake after STARTTLS is not in it, only commands and replies. Read it after
        :meth:`wait_for_log` saw the session's ``disconnect from`` line."""
        found = re.finditer(r"postfix/smtpd\[\d+\]: ([<>]) [^:\s]+: (.*)$",
                            self.session_log(), re.MULTILINE)
        return [f"{match[1]} {match[2]}" for match in found]
