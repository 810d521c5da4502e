"""`official_shapes` reproduces the official checkpoint layout for the real config and the golden tiny config."""

from __future__ import annotations

import dataclasses
import json

from services.common.checkpoint import CheckpointReader
from services.common.checkpoint_layout import SERVICE_PREFIXES, official_shapes, service_of
from services.common.config import ModelConfig, real_config


def test_real_config_matches_official_keys(golden):
    official = json.loads(golden.path("official_keys.json").read_text())
    expected = {k: tuple(v) for k, v in official["shapes"].items()}
    shapes = official_shapes(real_config())
    assert len(shapes) == official["num_tensors"]
    assert shapes == expected
    assert list(shapes) == list(expected), "upstream state-dict order"


def test_golden_config_matches_golden_checkpoint(golden):
    reader = CheckpointReader(golden.checkpoint)
    stored = {k: reader.shape(k) for k in reader.keys()}
    assert official_shapes(ModelConfig.from_model_dir(golden.checkpoint)) == stored


def test_every_key_belongs_to_one_service():
    shapes = official_shapes(real_config())
    owners = {k: service_of(k) for k in shapes}
    assert None not in owners.values()
    assert set(owners.values()) == set(SERVICE_PREFIXES)


def test_config_changes_shapes():
    """Layer counts, widths and flags drive the layout (a regression guard against hard-coded dims)."""
    cfg = real_config()
    dropped = official_shapes(cfg.replace(drop_vision_last_layer=True))
    last = cfg.vision.num_hidden_layers - 1
    assert f"vpm.encoder.layers.{last}.mlp.fc1.weight" not in dropped
    assert f"vpm.encoder.layers.{last - 1}.mlp.fc1.weight" in dropped
    tied = official_shapes(cfg.replace(llm=dataclasses.replace(cfg.llm, tie_word_embeddings=True)))
    assert "llm.lm_head.weight" not in tied
