"""The ``harakapy`` command as an operator uses it: in a subprocess, with real clients."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from harakapy import __version__
from tests.harness import insecure_client_context
from tests.processes import MAILDROP_PLUGIN, ServerProcess, free_port, harakapy, write


@dataclass
class MtaDir:
    root: Path
    port: int


@pytest.fixture
def mta_dir(tmp_path):
    """``harakapy init`` output, made to listen on a free port and keep mail as files."""
    root = tmp_path / "mta"
    assert harakapy("init", str(root)).returncode == 0
    port = free_port()
    write(root, "config/smtp.ini", f"[main]\nlisten = 127.0.0.1:{port}\nshutdown_grace = 5\n")
    write(root, "config/host_list", "example.test\n")
    write(root, "config/relay_acl_allow", "192.0.2.0/24\n")
    write(root, "config/plugins", "tls\nrcpt_to.in_host_list\nrelay\nmaildrop\n")
    write(root, "plugins/maildrop.py", MAILDROP_PLUGIN)
    return MtaDir(root, port)


@pytest.fixture
def running(mta_dir):
    server = ServerProcess("-c", str(mta_dir.root))
    server.wait_for("harakapy ready")
    yield server
    server.stop()


def test_version_and_help():
    assert harakapy("--version").stdout.strip() == f"harakapy {__version__}"
    for command in ("run", "init", "passwd"):
        result = harakapy(command, "--help")
        assert result.returncode == 0 and "usage: harakapy" in result.stdout


def test_init_writes_a_working_directory_and_refuses_a_non_empty_one(tmp_path):
    target = tmp_path / "new"
    assert harakapy("init", str(target)).returncode == 0
    assert (target / "config" / "smtp.ini").is_file()
    assert (target / "plugins").is_dir() and (target / "queue").is_dir()
    again = harakapy("init", str(target))
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr
    assert harakapy("init", "--force", str(target)).returncode == 0


def test_send_with_and_without_starttls_and_received_shows_tls(running, mta_dir):
    context = insecure_client_context()
    with smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30) as smtp:
        smtp.sendmail("a@client.test", ["b@example.test"], b"Subject: plain\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.sendmail("a@client.test", ["b@example.test"], b"Subject: tls\r\n\r\nx\r\n")
    drops = {path.read_bytes().split(b"Subject: ")[1][:5]: path.read_bytes()
             for path in (mta_dir.root / "maildrop").iterdir()}
    assert b"with ESMTP id" in drops[b"plain"] and b"using TLS" not in drops[b"plain"]
    assert b"with ESMTPS id" in drops[b"tls\r\n"] and b"(using TLSv1." in drops[b"tls\r\n"]


def test_relay_attempt_from_outside_the_acl_gets_550(running, mta_dir):
    with smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30) as smtp:
        smtp.ehlo("c")
        smtp.mail("a@client.test")
        code, text = smtp.rcpt("victim@elsewhere.test")
    assert code == 550 and text.startswith(b"5.7.1")


def test_broken_config_exits_2_before_listening_naming_file_and_line(mta_dir):
    write(mta_dir.root, "config/smtp.ini", f"[main]\nlisten = 127.0.0.1:{mta_dir.port}\n"
                                      "max_connections = lots\n")
    result = harakapy("run", "-c", str(mta_dir.root))
    assert result.returncode == 2
    assert (f"harakapy: config error: {mta_dir.root}/config/smtp.ini:3: [main] max_connections: "
            "expected a whole number, got 'lots'") in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stderr


def test_unknown_plugin_exits_2_listing_places_searched(mta_dir):
    write(mta_dir.root, "config/plugins", "tls\nno_such_plugin\n")
    result = harakapy("run", "-c", str(mta_dir.root))
    assert result.returncode == 2
    assert f"{mta_dir.root}/config/plugins:2: no_such_plugin: unknown plugin; searched: " \
           f"{mta_dir.root}/plugins/no_such_plugin.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_address_in_use_exits_1(running, mta_dir):
    result = harakapy("run", "-c", str(mta_dir.root))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mta_dir.port}" in result.stderr


def test_sigterm_lets_the_transaction_in_flight_finish_then_exits_0(running, mta_dir):
    smtp = smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30)
    smtp.ehlo("c")
    smtp.mail("a@client.test")
    smtp.rcpt("b@example.test")
    idle = smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30)
    idle.ehlo("idle")
    running.signal(signal.SIGTERM)
    running.wait_for("listening", timeout=1)  # (already logged; keeps the log in failures)
    # The idle client is told and let go: its 421 shows the drain has begun. The busy one
    # may still finish its message.
    assert idle.getreply()[0] == 421
    code, text = smtp.data(b"Subject: drained\r\n\r\nbody\r\n")
    smtp.close()
    idle.close()
    assert code == 250, text
    assert running.wait(timeout=10) == 0
    assert len(list((mta_dir.root / "maildrop").iterdir())) == 1
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=5)


def test_sighup_reloads_without_dropping_connections(running, mta_dir):
    smtp = smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30)
    smtp.ehlo("c")
    smtp.mail("a@client.test")
    assert smtp.rcpt("b@new.test")[0] == 550
    write(mta_dir.root, "config/host_list", "example.test\nnew.test\n")
    mark = len(running.lines)
    running.signal(signal.SIGHUP)
    running.wait_for("config reloaded", start=mark)
    assert smtp.rcpt("b@new.test")[0] == 250  # same connection, new config
    smtp.quit()


def test_sighup_with_broken_config_keeps_the_old_one(running, mta_dir):
    write(mta_dir.root, "config/host_list", "other.test\n")
    write(mta_dir.root, "config/relay_acl_allow", "not-a-network\n")
    mark = len(running.lines)
    running.signal(signal.SIGHUP)
    line = running.wait_for("config reload refused", start=mark)
    assert f"{mta_dir.root}/config/relay_acl_allow:1: not-a-network: not an IP network" in line
    with smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30) as smtp:
        smtp.ehlo("c")
        smtp.mail("a@client.test")
        assert smtp.rcpt("b@example.test")[0] == 250  # the old host_list still rules
        assert smtp.rcpt("b@other.test")[0] == 550


def test_json_log_format(mta_dir):
    server = ServerProcess("-c", str(mta_dir.root), "--log-format", "json")
    try:
        server.wait_for("harakapy ready")
        with smtplib.SMTP("127.0.0.1", mta_dir.port, timeout=30) as smtp:
            smtp.noop()
    finally:
        assert server.stop() == 0
    events = [json.loads(line) for line in server.lines]
    assert {"ts", "level", "logger", "msg"} <= set(events[0])
    assert any("connect from [127.0.0.1]" in event["msg"] for event in events)


def test_run_on_shipped_defaults_without_a_config_dir(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServerProcess(env=env)
    try:
        server.wait_for("harakapy ready")
        with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as smtp:
            code, text = smtp.ehlo("c")
        assert code == 250 and b"STARTTLS" in text
    finally:
        assert server.stop() == 0


def test_passwd_prints_an_argon2id_line():
    result = harakapy("passwd", "alice", input="correct horse\n")
    assert result.returncode == 0
    user, _, stored = result.stdout.strip().partition(" = ")
    assert user == "alice" and stored.startswith("$argon2id$")
    from harakapy.passwords import verify_password
    assert verify_password(stored, "correct horse")


def test_sighup_renews_the_certificate_for_starttls_and_implicit_tls(mta_dir, tls_ca):
    import socket

    tls_port = free_port()
    config = mta_dir.root / "config"

    def issue(serial_name: str) -> None:
        cert = tls_ca.issue_cert("localhost", organization_unit_name=serial_name)
        cert.private_key_pem.write_to_path(str(config / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(config / "cert.pem"))

    def implicit_cert() -> bytes:
        context = ssl.create_default_context()
        tls_ca.configure_trust(context)
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1024)  # the greeting arrives over TLS
            return tls.getpeercert(binary_form=True)

    def starttls_cert() -> bytes:
        context = ssl.create_default_context()
        tls_ca.configure_trust(context)
        with smtplib.SMTP("localhost", mta_dir.port, timeout=10) as smtp:
            smtp.starttls(context=context)
            return smtp.sock.getpeercert(binary_form=True)

    issue("first")
    write(mta_dir.root, "config/smtp.ini", f"[main]\nlisten = 127.0.0.1:{mta_dir.port}\n"
                                           f"listen_tls = 127.0.0.1:{tls_port}\n")
    write(mta_dir.root, "config/tls.ini", "[main]\nkey = key.pem\ncert = cert.pem\n")
    server = ServerProcess("-c", str(mta_dir.root))
    try:
        server.wait_for("harakapy ready")
        first = implicit_cert()
        assert starttls_cert() == first
        issue("second")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for("config reloaded", start=mark)
        assert implicit_cert() != first
        assert starttls_cert() == implicit_cert()
    finally:
        assert server.stop() == 0


@pytest.fixture
def queued_dir(mta_dir):
    """A server that relays from 127.0.0.1 but cannot resolve anything: mail stays queued."""
    write(mta_dir.root, "config/relay_acl_allow", "127.0.0.1/32\n")
    write(mta_dir.root, "config/plugins", "relay\n")
    write(mta_dir.root, "config/dns.ini", "[main]\nnameservers = 127.0.0.1\nport = 9\n"
                                          "timeout = 0.2\n")
    return mta_dir


def test_queue_commands_while_running_and_stopped(queued_dir):
    root, port = str(queued_dir.root), queued_dir.port
    assert harakapy("queue", "list", "-c", root).returncode == 2  # no spool yet
    server = ServerProcess("-c", root)
    try:
        server.wait_for("harakapy ready")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            for n in range(3):
                smtp.sendmail("a@client.test", [f"b{n}@dest.test"],
                              f"Subject: q{n}\r\n\r\nx\r\n".encode())
        server.wait_for("deferred")
        listing = harakapy("queue", "list", "-c", root)
        assert listing.returncode == 0 and "3 message(s) queued" in listing.stdout
        first = listing.stdout.split()[0]
        shown = harakapy("queue", "show", first, "-c", root)
        assert shown.returncode == 0
        assert "<b0@dest.test> deferred" in shown.stdout and "Subject: q0" in shown.stdout
        stats = json.loads(harakapy("queue", "stats", "--json", "-c", root).stdout)
        assert stats["messages"] == 3 and stats["recipients"] == {"deferred": 3}
        deleted = harakapy("queue", "delete", first, "-c", root)
        assert deleted.returncode == 0
        assert "2 message(s) queued" in harakapy("queue", "list", "-c", root).stdout
        flushed = harakapy("queue", "flush", "-c", root)
        assert flushed.returncode == 0 and "retrying 2 delivery job(s) now" in flushed.stdout
        bad = harakapy("queue", "show", "../../etc/passwd", "-c", root)
        assert bad.returncode == 2 and "is not a queue id" in bad.stderr
        gone = harakapy("queue", "show", first, "-c", root)
        assert gone.returncode == 2 and f"no message {first}" in gone.stderr
    finally:
        assert server.stop() == 0
    stopped = harakapy("queue", "flush", "-c", root)
    assert "no server running: 2 message(s) will be tried at its start" in stopped.stdout
    assert "2 message(s) queued" in harakapy("queue", "list", "-c", root).stdout
