"""Read the official checkpoint layout: `model.safetensors.index.json` + shards, or one `model.safetensors`.

Each service loads only its own prefixes, straight from the memory-mapped shards (no full-model load), cast to the
dtype and moved to the device it asks for. Every failure names the file or key at fault.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Tensors the official checkpoint stores but inference never uses: the one place they are listed, with why.
# A key under one of these prefixes is skipped silently; any other key a module does not expect is an error.
UNUSED_AT_INFERENCE: Mapping[str, str] = {
    "tts.dvae.downsample_conv.": "DVAE encoder path; only decode (codes -> mel) runs at inference",
    "tts.dvae.encoder.": "DVAE encoder path; only decode (codes -> mel) runs at inference",
    "tts.model.embed_tokens.": "LlamaModel's default 32000-token table; the TTS always feeds inputs_embeds",
}


class CheckpointError(RuntimeError):
    """A checkpoint directory or file that cannot be loaded as asked; the message names the file/key."""


def _safetensors_header(path: Path) -> dict:
    """Parse a shard's header and check that the file holds every byte the header promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + data_end} bytes, file has {size}"
        )
    return header


class CheckpointReader:
    """Index of a checkpoint directory; loads tensors by prefix without touching the others."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: model directory does not exist")
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from e
        elif (self.model_dir / SINGLE_FILE).is_file():
            weight_map = {k: SINGLE_FILE for k in _safetensors_header(self.model_dir / SINGLE_FILE) if k != "__metadata__"}
        else:
            raise CheckpointError(f"{self.model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map = weight_map
        self._headers: dict[str, dict] = {}
        for shard in sorted(set(weight_map.values())):
            path = self.model_dir / shard
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named by {INDEX_FILE} is missing")
            self._headers[shard] = _safetensors_header(path)
        for key, shard in weight_map.items():
            if key not in self._headers[shard]:
                raise CheckpointError(f"{self.model_dir / shard}: index says it holds {key!r}, but it does not")

    @property
    def shards(self) -> list[str]:
        return sorted(self._headers)

    def keys(self, prefixes: Sequence[str] = ("",)) -> list[str]:
        return sorted(k for k in self.weight_map if k.startswith(tuple(prefixes)))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it (e.g. "BF16")."""
        return self._entry(key)["dtype"]

    def _entry(self, key: str) -> dict:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.model_dir}: checkpoint has no tensor {key!r}")
        return self._headers[self.weight_map[key]][key]

    def load(
        self,
        prefixes: Sequence[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        strip: str = "",
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tensors under any of `prefixes` (except UNUSED_AT_INFERENCE), cast to `dtype`, on `device`.

        `strip` is cut off the front of the returned names.
        """
        keys = [k for k in self.keys(prefixes) if not _skipped(k)]
        if not keys:
            raise CheckpointError(f"{self.model_dir}: no tensors under {list(prefixes)}")
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.weight_map[k], []).append(k)
        bar = tqdm(total=len(keys), desc=f"loading {','.join(prefixes)}", unit="tensor", disable=not progress)
        for shard, shard_keys in by_shard.items():
            path = self.model_dir / shard
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for k in shard_keys:
                        t = f.get_tensor(k)
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        out[k.removeprefix(strip)] = t.to(device)
                        bar.update(1)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types; name the file
                raise CheckpointError(f"{path}: cannot read tensors ({e})") from e
        bar.close()
        return out


def _skipped(key: str) -> bool:
    return key.startswith(tuple(UNUSED_AT_INFERENCE))


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Size | tuple[int, ...]],
    where: str,
) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches (full names)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not _skipped(k))
    mismatched = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:20]))
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))


def load_module(
    module: torch.nn.Module,
    reader: CheckpointReader,
    prefixes: Iterable[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.nn.Module:
    """Load `module`'s state dict from the checkpoint tensors under `prefixes` (names as in the checkpoint).

    The module's state-dict keys must be the checkpoint names with the prefixes included (a module wrapping
    `vpm` and `resampler` has keys `vpm.…`, `resampler.…`). Skipped keys (UNUSED_AT_INFERENCE) are not read.
    Works for modules built on the meta device (tensors are assigned, not copied). The module is returned in eval
    mode with gradients off: serving never trains, and parameters that require grad make every op record autograd
    state (and refuse inference-mode inputs).
    """
    prefixes = tuple(prefixes)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    found = {k: reader.shape(k) for k in reader.keys(prefixes)}
    check_state_dict(expected, found, f"{reader.model_dir} {list(prefixes)}")
    state = reader.load(prefixes, dtype=dtype, device=device, progress=progress)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
