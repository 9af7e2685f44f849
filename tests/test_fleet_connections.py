"""How a node reaches the fleet's Redis (config/redis.ini): TCP with a password or an ACL
user, a Unix socket, TLS checked against a CA, Sentinel; and what a mistake looks like
(``harakapy check``, and the server's log when Redis refuses it). Real ``redis-server``
processes (tests/redis_server.py)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trustme

from harakapy.config import Config, ConfigError
from harakapy.fleet import fleet_settings
from harakapy.fleet.errors import FleetDown
from harakapy.fleet.link import RedisLink
from tests.harness import write_config_dir
from tests.processes import harakapy
from tests.redis_server import RedisServer


def node_dir(tmp_path: Path, redis_ini: str, name: str = "node") -> Path:
    return write_config_dir(tmp_path / name, {"redis.ini": redis_ini})


def check(root: Path):
    return harakapy("check", "-c", str(root))


@pytest.fixture
def redis_server(tmp_path):
    servers: list[RedisServer] = []

    def start(**options) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_a_password_and_an_acl_user_reach_redis_and_a_wrong_one_is_named(redis_server,
                                                                         tmp_path):
    server = redis_server(password="s3cret")
    with server.client() as client:
        client.acl_setuser("fleet", enabled=True, passwords=["+fleetpw"],
                           keys=["harakapy:*"], commands=["+@all"])
    (tmp_path / "pw").write_text("s3cret\n")
    good = check(node_dir(tmp_path, f"[main]\nurl = {server.url}\npassword_file = "
                                    f"{tmp_path / 'pw'}\nnode = n1\n", "a"))
    assert good.returncode == 0, good.stderr
    assert f"fleet: Redis ({server.url}) answers; this node is 'n1'" in good.stderr
    acl = check(node_dir(tmp_path, f"[main]\nurl = {server.url}\nusername = fleet\n"
                                   "password = fleetpw\n", "b"))
    assert "answers" in acl.stderr, acl.stderr
    wrong = check(node_dir(tmp_path, f"[main]\nurl = {server.url}\npassword = nope\n", "c"))
    # Redis is not needed to start: a note, not an error.
    assert wrong.returncode == 0
    assert "cannot be reached: Redis refused the credentials" in wrong.stderr
    assert "nope" not in wrong.stderr


def test_a_unix_socket_reaches_redis(redis_server, tmp_path):
    server = redis_server(unix=True)
    done = check(node_dir(tmp_path, f"[main]\nurl = unix://{server.socket}?db=0\n"))
    assert "answers" in done.stderr, done.stderr


def test_tls_is_checked_against_the_configured_ca(redis_server, tmp_path):
    ca, stranger = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = (tmp_path / n for n in ("redis.pem", "redis.key", "ca.pem"))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    stranger.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    server = redis_server(tls=(cert, key, ca_file))
    good = check(node_dir(tmp_path, f"[main]\nurl = {server.url}\n[tls]\nca_file = "
                                    f"{ca_file}\n", "a"))
    assert "answers" in good.stderr, good.stderr
    untrusted = check(node_dir(tmp_path, f"[main]\nurl = {server.url}\n[tls]\nca_file = "
                                         f"{tmp_path / 'other.pem'}\n", "b"))
    assert "cannot be reached" in untrusted.stderr
    assert "certificate verify failed" in untrusted.stderr
    plaintext = check(node_dir(tmp_path, f"[main]\nurl = redis://127.0.0.1:{server.port}/0\n",
                               "c"))
    assert "cannot be reached" in plaintext.stderr


def test_sentinel_gives_the_master(redis_server, tmp_path):
    master = redis_server(password="m")
    sentinel = redis_server(sentinel_of=master)
    done = check(node_dir(tmp_path, "[main]\npassword = m\n[sentinel]\nhosts = "
                                    f"127.0.0.1:{sentinel.port}\nservice = mymaster\n"))
    assert f"fleet: Redis (sentinel mymaster at 127.0.0.1:{sentinel.port}) answers" in \
        done.stderr, done.stderr


@pytest.mark.parametrize(("text", "line", "message"), [
    ("[main]\nurl = http://r:6379\n", 2, "expected a redis://, rediss:// or unix:// URL"),
    ("[main]\nurl = redis://u:pw@r:6379\n", 2, "not in the URL"),
    ("[main]\nurl = redis://r\nlisten = x\n", 3, "unknown key"),
    ("[sentinel]\nhosts = 127.0.0.1:26379\n", 0, "needs the service name"),
    ("[main]\nurl = redis://r\n[tls]\ncert = c.pem\n", 0, "needs both cert and key"),
    ("[main]\nurl = redis://r\n[tlsrpt]\nlease = 0\n", 4, "more than 0 seconds"),
    ("[main]\nurl = redis://r\npassword_file = missing\n", 3, "cannot read"),
])
def test_a_mistake_in_redis_ini_names_the_file_and_line(tmp_path, text, line, message):
    root = node_dir(tmp_path, text)
    done = check(root)
    assert done.returncode == 2
    where = f"{root / 'config' / 'redis.ini'}:{line}" if line else "redis.ini"
    assert where in done.stderr and message in done.stderr, done.stderr
    with pytest.raises(ConfigError):
        fleet_settings(Config.load(root))


async def test_refused_credentials_are_logged_once_without_the_password(
        redis_server, tmp_path, caplog):
    server = redis_server(password="right")
    root = node_dir(tmp_path, f"[main]\nurl = {server.url}\npassword = wrong\n")
    link = RedisLink(fleet_settings(Config.load(root)))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(link.close)
        for _ in range(3):
            with pytest.raises(FleetDown) as raised:
                await link.run(lambda client: client.get("harakapy:x"))
            assert "refused the credentials" in raised.value.reason
    said = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == 1 and "wrong" not in said[0]


async def test_calls_and_outages_are_counted_in_the_metrics(redis_server, tmp_path):
    from prometheus_client import REGISTRY

    from harakapy import metrics

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    metrics.enable(Config.load(write_config_dir(tmp_path / "m", {
        "metrics.ini": "[main]\nenabled = yes\n"})))
    server = redis_server()
    link = RedisLink(fleet_settings(Config.load(node_dir(tmp_path, f"[main]\nurl = "
                                                                   f"{server.url}\n"))))
    ok, down = (sample("harakapy_fleet_redis_calls_total", outcome=o) for o in ("ok", "down"))
    try:
        await link.run(lambda client: client.ping())
        assert sample("harakapy_fleet_redis_up") == 1
        server.kill()
        with pytest.raises(FleetDown):
            await link.run(lambda client: client.ping())
        assert sample("harakapy_fleet_redis_up") == 0
        assert sample("harakapy_fleet_redis_calls_total", outcome="ok") - ok == 1
        assert sample("harakapy_fleet_redis_calls_total", outcome="down") - down == 1
    finally:
        await link.close()
