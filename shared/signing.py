"""The server's secret (SECRET_KEY) at work: keyed hashes of personal identifiers and values only the server issues.

A keyed hash stands in for a value where the value itself must not travel (a phone number in a log line, a web chat
visitor's credential in a session key): stable for one key, so log lines and rows still join, and useless without
the key (a plain hash of a phone number is reversed by trying every number). Each use has its own `purpose`, so a
hash made for one can never be replayed as another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from shared.errors import InvalidSignature

HASH_CHARS = 22  # 132 bits of HMAC-SHA256, URL-safe base64: short enough for keys and log lines
SIGNATURE_CHARS = 27  # 160 bits


def _mac(key: str, purpose: str, value: str) -> bytes:
    return hmac.new(key.encode(), f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def keyed_hash(key: str, purpose: str, value: str) -> str:
    """A stable pseudonym of `value` for one purpose; without `key` it says nothing about the value."""
    return _b64(_mac(key, purpose, value))[:HASH_CHARS]


def sign(key: str, purpose: str, value: str) -> str:
    """`value.signature`: a token the server can later recognise as its own (`unsign`)."""
    return f"{value}.{_b64(_mac(key, 'signed:' + purpose, value))[:SIGNATURE_CHARS]}"


def unsign(key: str, purpose: str, token: str | None) -> str:
    """The value of a token `sign` made with this key and purpose; InvalidSignature for anything else."""
    value, dot, signature = (token or "").rpartition(".")
    if not dot or not value:
        raise InvalidSignature(f"{purpose}: not a signed value")
    expected = _b64(_mac(key, "signed:" + purpose, value))[:SIGNATURE_CHARS]
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise InvalidSignature(f"{purpose}: signature does not match")
    return value
