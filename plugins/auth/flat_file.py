"""auth/flat_file: SMTP AUTH (PLAIN, LOGIN) against users in config/auth_flat_file.ini.

Passwords are stored as Argon2id hashes, never in plaintext: ``harakapy passwd USER``
prints a line to paste. A plaintext value is a config error that names its line. AUTH is
offered only over TLS (STARTTLS or an implicit-TLS listener); an authenticated user may
relay.

Settings: config/auth_flat_file.ini [users]   Docs: docs/plugins/auth.flat_file.md
"""

from __future__ import annotations

import asyncio
import functools

from harakapy import (
    Config,
    checked_config,
    deny,
    hash_password,
    hookimpl,
    is_password_hash,
    ok,
    verify_password,
)


def load_users(config: Config) -> dict[str, str]:
    ini = config.ini("auth_flat_file.ini")
    users = {}
    for user in ini.keys("users"):
        entry = ini.entry("users", user)
        assert entry is not None
        if not is_password_hash(entry.value):
            raise entry.error(f"[users] {user}", "not an Argon2id hash; plaintext passwords "
                                                 "are refused. Make one with: harakapy "
                                                 f"passwd {user}")
        users[user] = entry.value
    return users


def _users(server) -> dict[str, str]:
    return server.config.derive("auth_flat_file.users", load_users)


startup, config_reload = checked_config("auth_flat_file.users", load_users)


@hookimpl
async def auth(user, password, server):
    stored = _users(server).get(user.lower())
    if stored is None:
        # Spend the same time as for a real user, so timing does not reveal who exists.
        await asyncio.to_thread(verify_password, _dummy_hash(), password)
        return None  # not one of ours: a later auth plugin may know the user
    if await asyncio.to_thread(verify_password, stored, password):
        return ok()
    return deny()


@functools.cache
def _dummy_hash() -> str:
    return hash_password("no such user")
