"""API-key authentication for every public RPC, and session ownership by key.

Public API
----------
``ApiKeyAuth(keys: Iterable[str])``: the accepted keys (at least one).
    ``ApiKeyAuth.from_config(api_keys=None, environ=os.environ)``: keys from config (a comma list or a list of
    strings) or, when config gives none, from env ``MINICPMO_API_KEYS`` (comma list); raises ``AuthConfigError``
    when neither names a key (serving without keys is never the silent default).
    ``authenticate(presented: str | None) -> str``: the presented key's hash (its identity for storage, e.g. the
    session's ``owner``); raises ``Unauthenticated`` for a missing or unknown key.
    ``authenticate_metadata(metadata) -> str``: the same, reading the key from gRPC invocation metadata
    (``authorization: Bearer <key>`` or ``x-api-key: <key>``).
``key_hash(key: str) -> str``: SHA-256 hex of the key (what Redis stores; a key never lands in Redis in clear).
``check_owner(caller_hash: str, owner_hash: str) -> None``: raises ``PermissionDenied`` unless equal.
``extract_api_key(metadata) -> str | None``: the key from metadata pairs (keys case-insensitive).

Errors: ``Unauthenticated`` (UNAUTHENTICATED) and ``PermissionDenied`` (PERMISSION_DENIED) from the error
taxonomy; ``AuthConfigError(ValueError)`` is a deployment mistake, raised at start-up.

Comparisons are constant-time (``hmac.compare_digest``) and run over every configured key, so the time taken
does not tell a caller how close its guess was or which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

from services.runtime.errors import PermissionDenied, Unauthenticated

ENV_VAR = "MINICPMO_API_KEYS"
_HASH_DOMAIN = b"minicpmo.v1 api key:"


class AuthConfigError(ValueError):
    """The deployment names no usable API key."""


def key_hash(key: str) -> str:
    # API keys are long random tokens, not passwords: a plain (domain-separated) SHA-256 is enough to keep them
    # out of Redis in clear; a slow password hash would only add latency to every RPC.
    return hashlib.sha256(_HASH_DOMAIN + key.encode("utf-8")).hexdigest()


def parse_api_keys(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [k.strip() for k in items if k and k.strip()]


def extract_api_key(metadata: Iterable[tuple[str, str]] | Mapping[str, str] | None) -> str | None:
    if metadata is None:
        return None
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    for name, value in pairs:
        name = name.lower()
        if name == "x-api-key":
            return value.strip() or None
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def check_owner(caller_hash: str, owner_hash: str) -> None:
    if not hmac.compare_digest(caller_hash.encode(), owner_hash.encode()):
        raise PermissionDenied("this session belongs to another API key; use the key that created it")


class ApiKeyAuth:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [bytes.fromhex(key_hash(k)) for k in parse_api_keys(keys)]
        if not self._digests:
            raise AuthConfigError(f"no API keys configured: pass api_keys or set {ENV_VAR}=key1,key2")

    @classmethod
    def from_config(
        cls, api_keys: str | Iterable[str] | None = None, environ: Mapping[str, str] = os.environ
    ) -> ApiKeyAuth:
        keys = parse_api_keys(api_keys) or parse_api_keys(environ.get(ENV_VAR))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, presented: str | None) -> str:
        if not presented:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>' or 'x-api-key'")
        digest = bytes.fromhex(key_hash(presented))
        matched = False
        for known in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Unauthenticated("unknown API key")
        return digest.hex()

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str]] | Mapping[str, str] | None) -> str:
        return self.authenticate(extract_api_key(metadata))
