"""SMTP AUTH: only over TLS, hashed passwords only, and an authenticated user may relay."""

from __future__ import annotations

import base64

import pytest

from harakapy.config import Config, ConfigError
from harakapy.passwords import hash_password
from harakapy.server import MailServer
from tests.harness import CAPTURE_PLUGIN, RawClient, insecure_client_context, running_server


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("s3cret pass")


@pytest.fixture
def auth_dir(config_dir, alice_hash):
    return config_dir({
        "plugins": "tls\nauth/flat_file\nrelay\ncapture\n",
        "relay_acl_allow": "192.0.2.0/24\n",  # 127.0.0.1 may relay only after AUTH
        "auth_flat_file.ini": f"[users]\nalice = {alice_hash}\n",
    }, {"capture": CAPTURE_PLUGIN})


async def tls_session(port: int) -> RawClient:
    client = await RawClient.connect(port)
    await client.reply()
    _code, text = await client.command("EHLO c")
    assert "AUTH" not in text  # never offered in plaintext
    assert (await client.command("STARTTLS"))[0] == 220
    await client.starttls(insecure_client_context())
    _code, text = await client.command("EHLO c")
    assert "AUTH PLAIN LOGIN" in text.splitlines()
    return client


async def test_auth_refused_before_tls(auth_dir):
    async with running_server(auth_dir) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        code, text = await client.command(f"AUTH PLAIN {plain('alice', 's3cret pass')}")
        assert (code, text[:6]) == (538, "5.7.11")
        await client.close()


async def test_auth_plain_then_relay(auth_dir):
    async with running_server(auth_dir) as hp:
        client = await tls_session(hp.port)
        await client.command("MAIL FROM:<alice@c.test>")
        code, _ = await client.command("RCPT TO:<x@outside.test>")
        assert code == 550  # not yet authenticated: no relaying
        await client.command("RSET")
        code, text = await client.command(f"AUTH PLAIN {plain('alice', 's3cret pass')}")
        assert (code, text) == (235, "2.7.0 Authentication successful")
        await client.command("MAIL FROM:<alice@c.test>")
        assert (await client.command("RCPT TO:<x@outside.test>"))[0] == 250
        await client.command("DATA")
        assert (await client.command("Subject: a\r\n\r\nhi\r\n."))[0] == 250
        await client.close()
        (hook, transaction), = hp.captured
        assert hook == "queue_outbound"
        assert b"with ESMTPSA id" in transaction.message
        assert b"(Authenticated sender: alice)" in transaction.message


async def test_auth_login_challenge_exchange(auth_dir):
    async with running_server(auth_dir) as hp:
        client = await tls_session(hp.port)
        assert await client.command("AUTH LOGIN") == (334, b64("Username:"))
        assert await client.command(b64("alice")) == (334, b64("Password:"))
        assert (await client.command(b64("s3cret pass")))[0] == 235
        await client.close()


async def test_wrong_password_and_lockout(auth_dir):
    async with running_server(auth_dir) as hp:
        client = await tls_session(hp.port)
        for _ in range(2):
            code, text = await client.command(f"AUTH PLAIN {plain('alice', 'wrong')}")
            assert (code, text[:5]) == (535, "5.7.8")
        code, text = await client.command(f"AUTH PLAIN {plain('mallory', 'x')}")
        assert code == 535
        assert (await client.reply())[0] == 421  # third failure: max_auth_failures = 3
        assert await client.closed()
        await client.close()


async def test_malformed_auth_data(auth_dir):
    async with running_server(auth_dir) as hp:
        client = await tls_session(hp.port)
        assert (await client.command("AUTH PLAIN !!!notbase64"))[0] == 501
        assert (await client.command(f"AUTH PLAIN {b64('no-nul-separators')}"))[0] == 501
        assert (await client.command("AUTH CRAM-MD5"))[0] == 504
        assert (await client.command("NOOP"))[0] == 250
        await client.close()


async def test_implicit_tls_listener_offers_auth(config_dir, alice_hash):
    root = config_dir({
        "smtp.ini": "listen = 127.0.0.1:0\nlisten_tls = 127.0.0.1:0\n",
        "plugins": "tls\nauth/flat_file\n",
        "auth_flat_file.ini": f"[users]\nalice = {alice_hash}\n",
    })
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.ports[1], ssl_context=insecure_client_context())
        assert (await client.reply())[0] == 220
        _code, text = await client.command("EHLO c")
        assert "AUTH PLAIN LOGIN" in text and "STARTTLS" not in text
        assert (await client.command(f"AUTH PLAIN {plain('alice', 's3cret pass')}"))[0] == 235
        await client.close()


async def test_plaintext_password_in_config_is_refused_with_its_line(config_dir):
    root = config_dir({"plugins": "auth/flat_file\n",
                       "auth_flat_file.ini": "[users]\n; comment\nbob = hunter2\n"})
    server = MailServer(Config.load(root))
    with pytest.raises(ConfigError) as error:
        await server.start()
    assert str(error.value).startswith(
        f"{root}/config/auth_flat_file.ini:3: [users] bob: not an Argon2id hash")
    assert "harakapy passwd bob" in str(error.value)


async def test_no_auth_plugin_means_no_auth(config_dir):
    root = config_dir({"plugins": "tls\n"})
    async with running_server(root) as hp:
        client = await RawClient.connect(hp.port)
        await client.reply()
        await client.command("EHLO c")
        await client.command("STARTTLS")
        await client.starttls(insecure_client_context())
        _code, text = await client.command("EHLO c")
        assert "AUTH" not in text
        assert (await client.command("AUTH PLAIN x"))[0] == 502
        await client.close()


@pytest.mark.parametrize(("answer", "reply", "closes"), [
    ('deny("account locked", enhanced="5.7.8")', (535, "5.7.8 account locked"), False),
    ("denysoft()", (454, "4.7.0 Temporary authentication failure"), False),
    ('denydisconnect("go away")', (535, "5.7.8 go away"), True),
])
async def test_auth_plugin_answers_become_rfc4954_replies(config_dir, answer, reply, closes):
    plugin = (f"from harakapy import hookimpl, deny, denysoft, denydisconnect\n\n"
              f"@hookimpl\ndef auth():\n    return {answer}\n")
    root = config_dir({"plugins": "tls\nmine\n"}, {"mine": plugin})
    async with running_server(root) as hp:
        client = await tls_session(hp.port)
        assert await client.command(f"AUTH PLAIN {plain('u', 'p')}") == reply
        if closes:
            assert await client.closed(timeout=5)
        else:  # still open: the next command is answered
            assert (await client.command("NOOP"))[0] == 250
        await client.close()


async def test_flat_file_leaves_unknown_users_to_later_plugins(config_dir, alice_hash):
    other = "from harakapy import hookimpl, ok\n\n@hookimpl\ndef auth(user):\n" \
            "    return ok() if user == 'bob' else None\n"
    root = config_dir({"plugins": "tls\nauth/flat_file\nother\n",
                       "auth_flat_file.ini": f"[users]\nalice = {alice_hash}\n"},
                      {"other": other})
    async with running_server(root) as hp:
        client = await tls_session(hp.port)
        assert (await client.command(f"AUTH PLAIN {plain('bob', 'x')}"))[0] == 235
        await client.close()
