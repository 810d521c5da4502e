"""Errors in OpenAI's shape (`{"message", "type", "param", "code"}`), with the HTTP status of the gRPC status the
error carries (`services.gateway.servicer.status_for`, the same mapping the gRPC API uses), and the one log line
per error the gRPC servicer writes too (a traceback only for INTERNAL)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from pydantic import ValidationError

from services.gateway.openai.media import InvalidParam
from services.gateway.servicer import status_for
from services.runtime import metrics
from services.runtime.errors import original

log = logging.getLogger("ray.serve")
C = grpc.StatusCode
HTTP = {  # gRPC status -> (HTTP status, OpenAI error type)
    C.INVALID_ARGUMENT: (400, "invalid_request_error"),
    C.UNAUTHENTICATED: (401, "authentication_error"),
    C.PERMISSION_DENIED: (403, "permission_error"),
    C.NOT_FOUND: (404, "not_found_error"),
    C.FAILED_PRECONDITION: (409, "conflict_error"),
    C.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    C.UNAVAILABLE: (503, "service_unavailable_error"),
    C.INTERNAL: (500, "server_error"),
}


def openai_error(exc: BaseException, where: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, error object) of any error; counted and logged under `where` (e.g. the route)."""
    code, message = status_for(exc)
    status, kind = HTTP.get(code, (500, "server_error"))
    metrics.ERRORS.inc(tags={"rpc": where, "code": code.name})
    if code == C.INTERNAL:
        log.error("%s failed", where, exc_info=exc)
    else:
        log.warning("%s refused: %s %s", where, code.name, message)
    param = getattr(original(exc), "param", None)
    return status, {"message": message, "type": kind, "param": param, "code": code.name.lower()}


def validation_error(e: ValidationError) -> InvalidParam:
    """A pydantic error of a request body as a 400 naming the parameter (its most specific problem)."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    param = param_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return InvalidParam(f"unsupported parameter {param!r}: this server does not take it", param)
    return InvalidParam(f"{param}: {err['msg']}" if param else err["msg"], param)


def param_path(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names parameters: `messages[0].content[1].image_url.url`. The tag of a
    tagged union (which pydantic puts in the location: the event or content-part type) is left out."""
    path = ""
    for i, p in enumerate(loc):
        if isinstance(p, int):
            path += f"[{p}]"
        elif not _is_tag(loc, i):
            path += f".{p}" if path else str(p)
    return path or None


def _is_tag(loc: tuple, i: int) -> bool:
    return (i == 0 and len(loc) > 1 and "." in str(loc[0])) or (  # a realtime event's type
        i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "content"  # a content part's type
    )
