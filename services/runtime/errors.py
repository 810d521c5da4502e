"""One error taxonomy for the whole pipeline: every error a caller can cause or meet carries its gRPC status.

Stages raise these (or subclasses named for their domain); they cross Ray by pickle and the gateway's servicer
reads the status off the original error (`status_of`), never off the Python class hierarchy of the wrapper Ray
puts around it. Anything that is not a `ServingError` is a bug or an infrastructure failure, mapped by the
servicer on its own terms (a dead replica is UNAVAILABLE, everything else INTERNAL and logged with its traceback).

Constructors take the message as their only positional argument, so the default exception pickling (by
`args`) rebuilds them unchanged on the other side of a Ray call.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base: an error with a gRPC status and a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidArgument(ServingError, ValueError):
    """The request is malformed as sent (corrupt media, out-of-range setting, unknown enum value)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError, LookupError):
    """The named resource (session, utterance) does not exist (never created, closed, expired)."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    """A request or session over the server's limits, or no room right now (queue or KV pool full)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ReplicaFull(ResourceExhausted):
    """This replica cannot take one more session on now; another replica may (a new session is placed again under
    another id, which routes it elsewhere: `services.gateway.live`)."""


class FailedPrecondition(ServingError):
    """The request is valid but not in the resource's current state (e.g. Respond while an answer runs)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    """A stage or the session store cannot serve now; retrying the same request is safe."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServingError):
    """No API key, or one this deployment does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    """A valid key used on a resource (a session) that another key created."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(ServingError):
    """The server failed to compute a correct result for this request (e.g. non-finite model outputs)."""

    code = grpc.StatusCode.INTERNAL


def original(exc: BaseException) -> BaseException:
    """The error a remote stage raised, unwrapped from Ray's task-error wrappers (their `cause`)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc
