"""Bearer tokens: random, shown once, stored as SHA-256 digests.

A digest suffices (no slow hash): the tokens carry 256 bits of entropy, so they cannot be
guessed from a leaked digest, and every agent frame would otherwise pay for a KDF.
"""

from __future__ import annotations

import hashlib
import secrets


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(headers: list[tuple[bytes, bytes]] | dict[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header (ASGI scope headers or a dict)."""
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
