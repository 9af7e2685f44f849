"""Password hashes for SMTP AUTH: Argon2id in PHC string form, never plaintext.

``harakapy passwd`` writes them; ``auth/flat_file`` checks them. Dovecot's ``{ARGON2ID}``
scheme prefix is accepted, so hashes from ``doveadm pw -s ARGON2ID`` can be pasted in.
"""

from __future__ import annotations

import argon2

_hasher = argon2.PasswordHasher()  # argon2-cffi's defaults follow RFC 9106's advice

_PREFIXES = ("{ARGON2ID}", "{ARGON2I}")


def hash_password(password: str) -> str:
    """An Argon2id PHC string (``$argon2id$v=19$m=...``) for ``password``."""
    return _hasher.hash(password)


def _strip_scheme(stored: str) -> str:
    for prefix in _PREFIXES:
        if stored.upper().startswith(prefix):
            return stored[len(prefix):]
    return stored


def is_password_hash(stored: str) -> bool:
    """Whether ``stored`` looks like a hash we can check (and so is not a plaintext password)."""
    return _strip_scheme(stored).startswith(("$argon2id$", "$argon2i$"))


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored``. Slow on purpose: call it in a thread."""
    try:
        return _hasher.verify(_strip_scheme(stored), password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
