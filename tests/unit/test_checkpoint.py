"""CheckpointReader / load_module on the golden checkpoint, and a clear error for every broken-checkpoint case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from services.common.checkpoint import (
    INDEX_FILE,
    UNUSED_AT_INFERENCE,
    CheckpointError,
    CheckpointReader,
    load_module,
)
from services.common.checkpoint_layout import SERVICE_PREFIXES, layer_pattern


class AudioProjection(nn.Module):
    """A module whose state-dict names are full checkpoint names (`audio_projection_layer.linear1.weight`, ...)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.audio_projection_layer = nn.Module()
        self.audio_projection_layer.linear1 = nn.Linear(in_dim, out_dim)
        self.audio_projection_layer.linear2 = nn.Linear(out_dim, out_dim)


def _projection_dims(reader: CheckpointReader) -> tuple[int, int]:
    out_dim, in_dim = reader.shape("audio_projection_layer.linear1.weight")
    return in_dim, out_dim


def _linked_copy(src: Path, dst: Path, replace: tuple[str, ...] = ()) -> Path:
    """Symlink every file of `src` into `dst` except those in `replace` (copied, so the test may break them)."""
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in replace:
            shutil.copyfile(f, dst / rel)
        else:
            (dst / rel).symlink_to(f)
    return dst


def _shard_of(reader: CheckpointReader, key: str) -> str:
    return reader.weight_map[key]


@pytest.fixture(scope="module")
def reader(golden) -> CheckpointReader:
    return CheckpointReader(golden.checkpoint)



def test_key_names_equal_official_keys(golden, reader):
    """Same names as the real checkpoint; only the number of layers differs (the tiny config has fewer)."""
    official = json.loads(golden.path("official_keys.json").read_text())["shapes"]
    assert set(reader.keys()) <= set(official)
    assert {layer_pattern(k) for k in reader.keys()} == {layer_pattern(k) for k in official}


@pytest.mark.parametrize("service", list(SERVICE_PREFIXES))
def test_load_by_prefix(reader, service):
    prefixes = SERVICE_PREFIXES[service]
    tensors = reader.load(prefixes, dtype=torch.float32)
    expected = [k for k in reader.keys(prefixes) if not k.startswith(tuple(UNUSED_AT_INFERENCE))]
    assert sorted(tensors) == expected
    for k, t in tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == reader.shape(k)
        assert torch.isfinite(t).all(), k


def test_load_keeps_stored_dtype_and_strips(reader):
    tensors = reader.load(["audio_projection_layer."], strip="audio_projection_layer.")
    assert set(tensors) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    stored = reader.dtype("audio_projection_layer.linear1.weight")
    assert str(tensors["linear1.weight"].dtype).endswith({"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[stored])


def test_unused_tensors_are_never_loaded(reader):
    tensors = reader.load(["tts."])
    assert not [k for k in tensors if k.startswith(tuple(UNUSED_AT_INFERENCE))]
    assert any(k.startswith(tuple(UNUSED_AT_INFERENCE)) for k in reader.keys(["tts."]))


def test_load_module_on_meta_device(reader):
    with torch.device("meta"):
        module = AudioProjection(*_projection_dims(reader))
    load_module(module, reader, ["audio_projection_layer."], dtype=torch.float32)
    weight = module.audio_projection_layer.linear1.weight
    assert weight.device.type == "cpu" and weight.dtype == torch.float32
    expected = reader.load(["audio_projection_layer.linear1.weight"], dtype=torch.float32)
    assert torch.equal(weight, expected["audio_projection_layer.linear1.weight"])


def test_single_file_checkpoint(tmp_path):
    save_file({"llm.lm_head.weight": torch.ones(3, 2)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.keys() == ["llm.lm_head.weight"] and reader.shape("llm.lm_head.weight") == (3, 2)
    assert torch.equal(reader.load(["llm."])["llm.lm_head.weight"], torch.ones(3, 2))


# ----- every broken-checkpoint case names the file or key at fault ------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=str(missing)):
        CheckpointReader(missing)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*{INDEX_FILE}"):
        CheckpointReader(tmp_path)


def test_missing_shard(golden, reader, tmp_path):
    shard = _shard_of(reader, "llm.lm_head.weight")
    broken = _linked_copy(golden.checkpoint, tmp_path / "ckpt")
    (broken / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        CheckpointReader(broken)


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000])
def test_truncated_shard(golden, reader, tmp_path, keep_bytes):
    """Cut inside the 8-byte length, inside the header, and inside the tensor data."""
    shard = _shard_of(reader, "llm.lm_head.weight")
    broken = _linked_copy(golden.checkpoint, tmp_path / "ckpt", replace=(shard,))
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated"):
        CheckpointReader(broken)


def test_corrupt_index(golden, tmp_path):
    broken = _linked_copy(golden.checkpoint, tmp_path / "ckpt", replace=(INDEX_FILE,))
    (broken / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        CheckpointReader(broken)


def test_index_names_key_the_shard_lacks(golden, reader, tmp_path):
    broken = _linked_copy(golden.checkpoint, tmp_path / "ckpt", replace=(INDEX_FILE,))
    index = json.loads((broken / INDEX_FILE).read_text())
    shard = index["weight_map"]["llm.lm_head.weight"]
    index["weight_map"]["llm.extra_head.weight"] = shard
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard}.*llm\.extra_head\.weight"):
        CheckpointReader(broken)


def test_missing_key(golden, reader, tmp_path):
    broken = _linked_copy(golden.checkpoint, tmp_path / "ckpt", replace=(INDEX_FILE,))
    index = json.loads((broken / INDEX_FILE).read_text())
    del index["weight_map"]["audio_projection_layer.linear2.bias"]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    broken_reader = CheckpointReader(broken)
    with pytest.raises(CheckpointError, match=r"missing keys: audio_projection_layer\.linear2\.bias"):
        load_module(AudioProjection(*_projection_dims(reader)), broken_reader, ["audio_projection_layer."])
    with pytest.raises(CheckpointError, match=r"no tensor 'audio_projection_layer\.linear2\.bias'"):
        broken_reader.shape("audio_projection_layer.linear2.bias")


def test_unexpected_key(reader):
    module = AudioProjection(*_projection_dims(reader))
    del module.audio_projection_layer.linear2
    with pytest.raises(CheckpointError, match=r"unexpected keys: audio_projection_layer\.linear2\.bias"):
        load_module(module, reader, ["audio_projection_layer."])


def test_shape_mismatch(reader):
    in_dim, out_dim = _projection_dims(reader)
    with pytest.raises(CheckpointError, match=r"shape mismatch: audio_projection_layer\.linear1\.bias"):
        load_module(AudioProjection(in_dim, out_dim + 1), reader, ["audio_projection_layer."])


def test_no_tensors_under_prefix(reader):
    with pytest.raises(CheckpointError, match="nothing_here"):
        reader.load(["nothing_here."])
