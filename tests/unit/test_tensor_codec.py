"""Tensor <-> minicpmo.v1.Tensor: exact round trips for every dtype and layout; bad messages are rejected."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
import torch

from protos.minicpmo.v1 import tensor_pb2
from services.common.tensor_codec import TensorCodecError, from_proto, to_proto

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 1e3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen, dtype=torch.int64).to(dtype)


def _round_trip(t: torch.Tensor) -> torch.Tensor:
    wire = tensor_pb2.Tensor.FromString(to_proto(t).SerializeToString())
    return from_proto(wire)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5), (7,), ()], ids=["3d", "1d", "scalar"])
def test_round_trip_every_dtype(dtype, shape):
    t = _sample(dtype, shape)
    back = _round_trip(t)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bfloat16_bits_are_preserved():
    """Values bf16 represents but float16 does not (and NaN/inf) survive: the raw 16-bit pattern travels."""
    t = torch.tensor([1e30, -1e-30, float("inf"), float("nan"), 3.140625], dtype=torch.bfloat16)
    back = _round_trip(t)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(dtype):
    t = torch.empty((0, 4), dtype=dtype)
    msg = to_proto(t)
    assert len(msg.data) == 0 and list(msg.shape) == [0, 4]
    back = from_proto(msg)
    assert back.shape == (0, 4) and back.dtype == dtype


def test_non_contiguous():
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base[0].unsqueeze(0).expand(3, 4, 5)):
        assert not view.is_contiguous()
        back = _round_trip(view)
        assert back.shape == view.shape and torch.equal(back, view)


def test_decode_wraps_the_bytes_without_copying():
    """from_proto builds the tensor on the message's buffer itself (frombuffer), so no second copy is made.

    protobuf hands out a fresh `bytes` for every `msg.data` access, so sharing is shown with a message-shaped
    object whose buffer the test can write to.
    """
    src = torch.tensor([1.0, 2.0, 3.0])
    msg = to_proto(src)
    buf = bytearray(msg.data)
    view = from_proto(SimpleNamespace(dtype=msg.dtype, shape=list(msg.shape), data=buf))
    buf[0:4] = struct.pack("<f", 42.0)
    assert view[0].item() == 42.0
    assert torch.equal(from_proto(msg), src)


def test_decode_to_device_meta_keeps_shape():
    back = from_proto(to_proto(torch.ones(2, 3)), device="meta")
    assert back.device.type == "meta" and back.shape == (2, 3)


@pytest.mark.parametrize(
    "msg, message",
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15), "needs 16 bytes, got 15"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[3], data=b"\0" * 32), "needs 24 bytes, got 32"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "unknown Tensor dtype"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"), "unknown Tensor dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[-1, 2], data=b""), "negative dimension"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[], data=b""), "needs 4 bytes, got 0"),
    ],
    ids=["short", "long", "unspecified", "unknown", "negative", "scalar-without-data"],
)
def test_bad_messages_raise(msg, message):
    with pytest.raises(TensorCodecError, match=message):
        from_proto(msg)
    assert issubclass(TensorCodecError, ValueError)  # the gateway maps ValueError to INVALID_ARGUMENT


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16])
def test_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(TensorCodecError, match=str(dtype)):
        to_proto(torch.zeros(2, dtype=dtype))
