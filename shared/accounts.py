"""Who may use the operator console: named accounts from the channels file (`[[operators]]`), each with a role and a
password stored only as a scrypt hash (hashlib's scrypt: memory-hard like argon2 or bcrypt, and no new dependency).

Roles, each allowed what the one before is: `viewer` reads (the session browser), `operator` also takes sessions
over, replies and hands its own back, `admin` also hands back anyone's. ADMIN_TOKEN, when set, is one more account
named "admin" with the admin role.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
TOKEN_ACCOUNT = "admin"  # the account ADMIN_TOKEN logs in as

OPERATOR_NAME = re.compile(r"[^\W_][\w .'-]{0,99}")  # what names an operator to users ("{operator}: " prefixes)
# scrypt's cost: 16 MiB and ~50 ms per check, so a stolen hash is slow to guess. The console checks a password once
# per process (PasswordCache), not on every page.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SALT_BYTES, DIGEST_BYTES = 2**14, 8, 1, 16, 32


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str = field(repr=False)

    def may(self, role: str) -> bool:
        """Whether this account has `role` or a stronger one."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: str) -> str:
    """The string to put in `password_hash`: scrypt$N$r$p$salt$digest (base64)."""
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=DIGEST_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown scheme {scheme!r}")
    n, r, p = int(n), int(r), int(p)
    if n < 2**14 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters too weak or out of range (N a power of two >= 16384)")
    return n, r, p, base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)


def check_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made from."""
    try:
        n, r, p, salt, digest = _parse(stored)
    except ValueError:
        return False
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024,
                               dklen=len(digest))
    return hmac.compare_digest(candidate, digest)


class PasswordCache:
    """Passwords this process has checked, by a keyed hash (never the password): HTTP basic auth sends the
    password with every request, and scrypt on each one would make the console's live refresh costly."""

    LIMIT = 1000

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._known: dict[bytes, bool] = {}

    def check(self, account: Account, password: str) -> bool:
        tag = hmac.new(self._key, f"{account.name}\0{account.password_hash}\0{password}".encode(),
                       hashlib.sha256).digest()
        known = self._known.get(tag)
        if known is None:
            known = check_password(password, account.password_hash)
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            self._known[tag] = known
        return known


def load_accounts(raw: Any, path: Path) -> dict[str, Account]:
    """The `[[operators]]` tables of the channels file; ConfigError on anything wrong."""
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: [[operators]] must be an array of tables")
    accounts: dict[str, Account] = {}
    for i, entry in enumerate(raw):
        where = f"{path}: operators[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(entry) - {"name", "role", "password_hash"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (name, role, password_hash)")
        name, role, stored = entry.get("name"), entry.get("role", OPERATOR), entry.get("password_hash")
        if not isinstance(name, str) or not OPERATOR_NAME.fullmatch(name):
            raise ConfigError(f"{where}: name must be 1-100 letters, digits, spaces, . ' - (starting with a letter "
                              f"or digit), got {name!r}")
        where = f"{path}: operator {name!r}"
        if name in accounts or name == TOKEN_ACCOUNT:
            raise ConfigError(f"{where} appears twice" if name in accounts else
                              f"{where}: the name {TOKEN_ACCOUNT!r} is ADMIN_TOKEN's account")
        if role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(stored, str):
            raise ConfigError(f"{where}: password_hash is required (make one with `chatsessions operators "
                              "hash-password`)")
        try:
            _parse(stored)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: password_hash is not a scrypt hash of `chatsessions operators "
                              f"hash-password` ({exc})") from None
        accounts[name] = Account(name, role, stored)
    return accounts
