"""torch.Tensor <-> `minicpmo.v1.Tensor` (dtype, shape, raw little-endian bytes).

Decoding wraps the message's bytes without copying (`torch.frombuffer`); the result is read-only in spirit:
clone it before writing in place. bfloat16 has no numpy dtype, so it travels as its raw 16-bit pattern.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch

from protos.minicpmo.v1 import tensor_pb2

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}

if sys.byteorder != "little":  # the wire format is little-endian; every platform we serve on is too
    raise ImportError("tensor_codec assumes a little-endian host")


class TensorCodecError(ValueError):
    """A Tensor message that does not describe a valid tensor."""


def to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a tensor (any device, any strides) as a Tensor message."""
    if t.dtype not in _TO_PROTO:
        raise TensorCodecError(f"dtype {t.dtype} cannot be sent as a Tensor message")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return tensor_pb2.Tensor(dtype=_TO_PROTO[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def from_proto(msg: tensor_pb2.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode a Tensor message; on the CPU the result shares memory with `msg.data` (no copy)."""
    if msg.dtype not in _FROM_PROTO:
        raise TensorCodecError(f"unknown Tensor dtype {msg.dtype}")
    dtype = _FROM_PROTO[msg.dtype]
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"negative dimension in Tensor shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(msg.data) != numel * itemsize:
        raise TensorCodecError(
            f"Tensor of shape {shape} and dtype {dtype} needs {numel * itemsize} bytes, got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    with warnings.catch_warnings():  # frombuffer warns that protobuf bytes are immutable; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(msg.data, dtype=dtype)
    return flat.reshape(shape).to(device)
