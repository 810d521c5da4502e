"""API keys: parsing, authentication, ownership checks."""

from __future__ import annotations

import grpc
import pytest

from services.gateway.auth import (
    ENV_VAR,
    ApiKeyAuth,
    AuthConfigError,
    PermissionDenied,
    Unauthenticated,
    check_owner,
    extract_api_key,
    key_hash,
)


def test_config_keys_win_over_env():
    auth = ApiKeyAuth.from_config("k1, k2,,", environ={ENV_VAR: "envkey"})
    assert len(auth) == 2
    auth.authenticate("k2")
    with pytest.raises(Unauthenticated):
        auth.authenticate("envkey")


def test_env_keys_used_when_config_has_none():
    auth = ApiKeyAuth.from_config(None, environ={ENV_VAR: "a,b"})
    assert auth.authenticate("a") == key_hash("a")
    assert ApiKeyAuth.from_config([], environ={ENV_VAR: "a"}).authenticate("a") == key_hash("a")


def test_list_config():
    assert ApiKeyAuth.from_config(["x", " y "], environ={}).authenticate("y") == key_hash("y")


def test_no_keys_anywhere_is_a_config_error():
    with pytest.raises(AuthConfigError, match=ENV_VAR):
        ApiKeyAuth.from_config(None, environ={})
    with pytest.raises(AuthConfigError):
        ApiKeyAuth.from_config(" , ", environ={ENV_VAR: ""})


@pytest.mark.parametrize("presented", [None, "", "k", "k1 ", "K1", "k1k1"])
def test_missing_or_unknown_key_is_unauthenticated(presented):
    auth = ApiKeyAuth(["k1"])
    with pytest.raises(Unauthenticated):
        auth.authenticate(presented)


def test_hash_is_stable_distinct_and_not_the_key():
    assert key_hash("secret") == key_hash("secret")
    assert key_hash("secret") != key_hash("secret2")
    assert "secret" not in key_hash("secret") and len(key_hash("secret")) == 64


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("Authorization", "bearer  abc ")], "abc"),
        ([("x-api-key", "xyz")], "xyz"),
        ({"x-api-key": "m"}, "m"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([("user-agent", "grpc")], None),
        (None, None),
    ],
)
def test_extract_api_key(metadata, expected):
    assert extract_api_key(metadata) == expected


def test_authenticate_metadata():
    auth = ApiKeyAuth(["tok"])
    assert auth.authenticate_metadata([("authorization", "Bearer tok")]) == key_hash("tok")
    with pytest.raises(Unauthenticated, match="missing"):
        auth.authenticate_metadata([])


def test_session_of_another_key_is_permission_denied():
    auth = ApiKeyAuth(["alice", "bob"])
    owner = auth.authenticate("alice")
    check_owner(auth.authenticate("alice"), owner)
    with pytest.raises(PermissionDenied) as err:
        check_owner(auth.authenticate("bob"), owner)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
