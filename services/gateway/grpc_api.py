"""The public gRPC service as Ray Serve's gRPC proxy registers it (`grpc_options.grpc_servicer_functions`).

The same registration as the generated `add_MiniCPMOServicer_to_server`, with one change: request bytes that
are not a valid message (invalid UTF-8 in a string field, truncated bytes) do not fail inside grpcio with
UNKNOWN before any of our code runs; they reach the Gateway as a `MalformedRequest`, which refuses them with
INVALID_ARGUMENT and a message saying what was wrong. Kept free of heavy imports: the proxy imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from protos.minicpmo.v1 import omni_pb2

SERVICE = "minicpmo.v1.MiniCPMO"


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that did not parse as the method's request message."""

    message_type: str
    error: str


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(cls.DESCRIPTOR.full_name, str(e) or "unparseable bytes")

    return parse


def add_MiniCPMOServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated name, as configs use it)
    handlers = {}
    for method in omni_pb2.DESCRIPTOR.services_by_name["MiniCPMO"].methods:
        request_cls = getattr(omni_pb2, method.input_type.name)
        response_cls = getattr(omni_pb2, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
