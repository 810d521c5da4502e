"""Session-store errors cross Ray process boundaries by pickle and must keep their message intact."""

import pickle

import pytest

from services.gateway.sessions import (
    InvalidTurn,
    LeaseLost,
    SessionInputError,
    SessionLimitExceeded,
    SessionNotFound,
    StoreUnavailable,
)


@pytest.mark.parametrize(
    "error",
    [
        SessionNotFound("s-1"),
        SessionLimitExceeded("over 8192 tokens"),
        LeaseLost("epoch 3 < 4"),
        InvalidTurn("answering"),
        StoreUnavailable("redis down"),
        SessionInputError("bad mode"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_survives_pickle_with_the_same_message(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


def test_session_not_found_names_the_session_once() -> None:
    message = str(pickle.loads(pickle.dumps(SessionNotFound("s-1"))))
    assert message.count("s-1") == 1 and message.count("not found") == 1
