"""Errors cross Ray process boundaries by pickle and must keep their class, message and gRPC status intact."""

import pickle

import grpc
import pytest

from services.gateway.sessions import InvalidTurn
from services.runtime.errors import InvalidArgument, ServingError, original
from services.runtime.ownership import LeaseLost, SessionLimitExceeded, SessionNotFound, StoreUnavailable


@pytest.mark.parametrize(
    "error, code",
    [
        (SessionNotFound("s-1"), grpc.StatusCode.NOT_FOUND),
        (SessionLimitExceeded("over 8192 tokens"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LeaseLost("epoch 3 < 4"), grpc.StatusCode.UNAVAILABLE),
        (InvalidTurn("answering"), grpc.StatusCode.FAILED_PRECONDITION),
        (StoreUnavailable("redis down"), grpc.StatusCode.UNAVAILABLE),
        (InvalidArgument("bad mode"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_survives_pickle_with_its_message_and_status(error: ServingError, code) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.message == error.message
    assert copy.code == code


def test_session_not_found_names_the_session_once() -> None:
    message = str(pickle.loads(pickle.dumps(SessionNotFound("s-1"))))
    assert message.count("s-1") == 1 and message.count("not found") == 1


def test_original_unwraps_task_error_causes() -> None:
    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    inner = InvalidArgument("x")
    assert original(Wrapper(Wrapper(inner))) is inner
    assert original(inner) is inner
