"""The generated tiny checkpoint has the official layout and loads exactly like the golden checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from vocos import Vocos
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from services.common.checkpoint import INDEX_FILE, CheckpointReader
from services.common.checkpoint_layout import SERVICE_PREFIXES, layer_pattern, official_shapes
from services.common.cli import main as cli_main
from services.common.config import ModelConfig
from services.common.tiny_checkpoint import CHATTTS_TOKENS, make_tiny_checkpoint
from tests.fixtures import tiny_checkpoint_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_checkpoint_dir(tmp_path_factory)



def _added_tokens(model_dir: Path) -> list[tuple[int, dict]]:
    decoder = json.loads((model_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return sorted(((int(i), tok) for i, tok in decoder.items()), key=lambda it: it[0])


def test_cli_generates_and_inspects(tiny, tmp_path, capsys):
    """Through the `minicpmo` command, with another seed: other weights, same tokenizer."""
    out = tmp_path / "ckpt"
    assert cli_main(["make-tiny-checkpoint", str(out), "--seed", "5"]) == 0
    assert "noise" in capsys.readouterr().out
    assert cli_main(["inspect-checkpoint", str(out)]) == 0
    report = capsys.readouterr().out
    assert "0 missing, 0 unexpected, 0 shape mismatches" in report
    for service, prefixes in SERVICE_PREFIXES.items():
        assert re.search(rf"^  {service}\s+{re.escape('+'.join(prefixes))}\s+[\d,]+$", report, re.M), service
    assert "BF16 x" in report and report.rstrip().endswith("OK")
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    a = CheckpointReader(tiny).load(["llm.lm_head."])["llm.lm_head.weight"]
    b = CheckpointReader(out).load(["llm.lm_head."])["llm.lm_head.weight"]
    assert not torch.equal(a, b)


def test_inspect_reports_a_missing_key(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / INDEX_FILE).unlink()
    index = json.loads((tiny / INDEX_FILE).read_text())
    del index["weight_map"]["llm.model.norm.weight"]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    assert cli_main(["inspect-checkpoint", str(broken)]) == 1
    report = capsys.readouterr().out
    assert "1 missing" in report and "llm.model.norm.weight" in report


def test_inspect_reports_missing_files(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        if f.name != "preprocessor_config.json":
            (broken / f.name).symlink_to(f)
    assert cli_main(["inspect-checkpoint", str(broken)]) == 1
    assert "preprocessor_config.json" in capsys.readouterr().out


def test_inspect_unreadable_directory(tmp_path, capsys):
    assert cli_main(["inspect-checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_key_set_equals_golden(tiny, golden):
    mine, theirs = CheckpointReader(tiny), CheckpointReader(golden.checkpoint)
    assert set(mine.keys()) == set(theirs.keys())
    assert {layer_pattern(k) for k in mine.keys()} == {layer_pattern(k) for k in theirs.keys()}
    assert {k: mine.shape(k) for k in mine.keys()} == official_shapes(ModelConfig.from_model_dir(tiny))
    assert len(mine.shards) >= 2
    assert {mine.dtype(k) for k in mine.keys()} == {"BF16"}
    index = json.loads((tiny / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(
        2 * torch.Size(mine.shape(k)).numel() for k in mine.keys()
    )


@pytest.mark.parametrize("service", list(SERVICE_PREFIXES))
def test_both_load_with_the_same_reader(tiny, golden, service):
    for model_dir in (tiny, golden.checkpoint):
        tensors = CheckpointReader(model_dir).load(SERVICE_PREFIXES[service], dtype=torch.float32)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        assert all(t.abs().max() > 0 for t in tensors.values())


def test_config_schema_matches_golden(tiny, golden):
    mine = json.loads((tiny / "config.json").read_text())
    theirs = json.loads((golden.checkpoint / "config.json").read_text())
    assert set(mine) == set(theirs)
    for section in ("vision_config", "tts_config", "slice_config"):
        assert set(mine[section]) == set(theirs[section]), section
    pre_mine = json.loads((tiny / "preprocessor_config.json").read_text())
    assert pre_mine == json.loads((golden.checkpoint / "preprocessor_config.json").read_text())


def test_llm_special_tokens_in_official_order(tiny, golden):
    mine, theirs = _added_tokens(tiny), _added_tokens(golden.checkpoint)
    assert [tok for _, tok in mine] == [tok for _, tok in theirs]  # strings, order and flags
    ids = [i for i, _ in mine]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous after the BPE vocabulary
    config = json.loads((tiny / "config.json").read_text())
    assert config["vocab_size"] == ids[-1] + 1
    by_text = {tok["content"]: i for i, tok in mine}
    assert config["bos_token_id"] == by_text["<|endoftext|>"] and config["eos_token_id"] == by_text["<|im_end|>"]
    for name in ("special_tokens_map.json",):
        assert json.loads((tiny / name).read_text()) == json.loads((golden.checkpoint / name).read_text())
    tok_cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    gold_cfg = json.loads((golden.checkpoint / "tokenizer_config.json").read_text())
    assert {k: v for k, v in tok_cfg.items() if k != "added_tokens_decoder"} == {
        k: v for k, v in gold_cfg.items() if k != "added_tokens_decoder"}


def test_llm_tokenizer_is_byte_level_bpe(tiny):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny / "tokenizer.json"))
    assert tok.convert_ids_to_tokens(0) == "!"  # Qwen2 byte order
    for text in ("Hello there! 你好，世界。", "<|im_start|>user\nhi<|im_end|>\n", "naïve café ☃"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<unit><|spk|>") == tok.convert_tokens_to_ids(["<unit>", "<|spk|>"])
    vocab = json.loads((tiny / "vocab.json").read_text())
    merges = (tiny / "merges.txt").read_text().splitlines()
    assert len(vocab) == 256 + len(merges) - 1  # "#version" header + one merge per non-byte token


def test_chattts_tokenizer(tiny, golden):
    from transformers import BertTokenizerFast

    config = ModelConfig.from_model_dir(tiny)
    tok = BertTokenizerFast.from_pretrained(str(tiny / "assets" / "chattts_tokenizer"))
    gold = BertTokenizerFast.from_pretrained(str(golden.checkpoint / "assets" / "chattts_tokenizer"))
    n = len(CHATTTS_TOKENS)  # the ChatTTS tokens close the vocabulary, in the official order
    assert tok.convert_ids_to_tokens(list(range(len(tok) - n, len(tok)))) == list(CHATTTS_TOKENS)
    assert gold.convert_ids_to_tokens(list(range(len(gold) - n, len(gold)))) == list(CHATTTS_TOKENS)
    assert tok.encode("[uv_break]", add_special_tokens=False) == [tok.convert_tokens_to_ids("[uv_break]")]
    assert tok.convert_ids_to_tokens(0) == "[PAD]" and tok.pad_token_id == 0
    assert config.tts.num_text_tokens == len(tok)
    assert tok.convert_ids_to_tokens(config.tts.audio_bos_token_id) == "[Ptts]"
    assert tok.convert_ids_to_tokens(config.tts.text_eos_token_id) == "[Etts]"
    assert tok.convert_ids_to_tokens(config.tts.spk_emb_token_id) == "[spk_emb]"
    text = "[Stts][spk_emb]hello, 你好 123[Etts][PAD][Ptts]"
    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert pieces[:2] == ["[Stts]", "[spk_emb]"] and pieces[-3:] == ["[Etts]", "[PAD]", "[Ptts]"]
    assert "[UNK]" not in pieces


def test_vocos_weights_load(tiny):
    vocos = Vocos(
        MelSpectrogramFeatures(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100),
        VocosBackbone(input_channels=100, dim=512, intermediate_dim=1536, num_layers=8),
        ISTFTHead(dim=512, n_fft=1024, hop_length=256),
    )
    state = torch.load(tiny / "assets" / "Vocos.pt", weights_only=True)
    params = {k for k, _ in vocos.named_parameters()}
    assert {k for k, v in state.items() if v.dtype == torch.bfloat16} == params
    vocos.load_state_dict(state)
    with torch.no_grad():
        wav = vocos.decode(torch.randn(1, 100, 8, generator=torch.Generator().manual_seed(0)))
    assert wav.shape == (1, 8 * 256) and torch.isfinite(wav).all()


def test_same_seed_same_files(tiny, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes(), rel

