"""The keys the simulator accepts, held only as SHA-256 digests of their values.

A key is read once from its environment variable and hashed; afterwards it is known
only by its `api_key_env` name, so no key value can reach a log, a stat or a dump.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from topics.config import SimKey
from topics.errors import SimulatorError

__all__ = ["KeyRing", "bearer_token"]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class KeyRing:
    """Maps a presented key to its SimKey, comparing digests only."""

    def __init__(self, keys: list[SimKey], environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._by_digest: dict[bytes, SimKey] = {}
        seen_env: set[str] = set()
        for key in keys:
            name = key.api_key_env
            if name in seen_env:
                raise SimulatorError(f"simulator.keys: api_key_env {name!r} is listed twice")
            seen_env.add(name)
            value = env.get(name)
            if not value:
                raise SimulatorError(
                    f"simulator.keys: environment variable {name!r} is not set or empty"
                )
            digest = _digest(value)
            if digest in self._by_digest:
                other = self._by_digest[digest].api_key_env
                raise SimulatorError(
                    f"simulator.keys: {other!r} and {name!r} hold the same key value"
                )
            self._by_digest[digest] = key

    def lookup(self, presented: str) -> SimKey | None:
        """The SimKey whose value is `presented`, or None."""
        return self._by_digest.get(_digest(presented))

    @property
    def keys(self) -> list[SimKey]:
        """Every configured key, in config order."""
        return list(self._by_digest.values())
