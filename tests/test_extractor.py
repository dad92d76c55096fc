"""The reduced extractor: save (truncated encoder + neurons + probe), load, identical predictions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lexp.encoders.extract import extract_words
from lexp.errors import LexpInputError
from lexp.extractor import ReducedExtractor, save_reduced_extractor
from lexp.redundancy.timing import truncate_encoder
from tiny_models import tiny_bert, tiny_xlnet

SENTENCES = [
    ["The", "quick", "brown", "foxes", "jumped", "."],
    ["A", "cat"],
    ["red", "houses", "and", "old", "dogs"],
]
LABELS = ["DT", "JJ", "NN", "VB"]


def _expected(model, tokenizer, k: int, columns: np.ndarray, W: np.ndarray, b: np.ndarray) -> list[list[str]]:
    """Predictions computed from the FULL model's hidden states 0..k (no truncation, no saving)."""
    out = []
    rows = dict(extract_words(model, tokenizer, SENTENCES, batch_size=2, progress=False))
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    for i, words in enumerate(SENTENCES):
        feats = rows[i][:, : (k + 1) * hidden][:, columns]
        ids = (torch.from_numpy(feats) @ torch.from_numpy(W).T + torch.from_numpy(b)).argmax(1).numpy()
        out.append([LABELS[j] for j in ids])
        assert len(out[-1]) == len(words)
    return out


@pytest.mark.parametrize("k", [0, 1])  # 0: embeddings only (LayerSelector can pick layer 0)
@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_round_trip_gives_identical_predictions(family: str, k: int, tmp_path: Path) -> None:
    model, tokenizer = (tiny_bert if family == "bert" else tiny_xlnet)(tmp_path)
    rng = np.random.default_rng(0)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    columns = np.sort(rng.choice((k + 1) * hidden, size=20, replace=False))
    W = rng.standard_normal((len(LABELS), 20)).astype(np.float32)
    b = rng.standard_normal(len(LABELS)).astype(np.float32)
    path = save_reduced_extractor(
        tmp_path / "extractor",
        model=truncate_encoder(model, k),
        tokenizer=tokenizer,
        n_layers_kept=k + 1,
        columns=columns,
        weights=W,
        bias=b,
        labels=LABELS,
        kind="labelling",
        settings={"subword": "last", "store_dtype": "float32"},
    )
    assert not list(tmp_path.glob("extractor.partial-*"))
    tagger = ReducedExtractor.load(path)
    assert len(tagger.model.encoder.layer if family == "bert" else tagger.model.layer) == k
    assert tagger.tag(SENTENCES) == _expected(model, tokenizer, k, columns, W, b)


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_a_sentence_extractor_classifies_like_the_full_model(family: str, k: int, tmp_path: Path) -> None:
    """[CLS] extractors too, down to the embeddings alone (transformers 5's BERT then returns no
    hidden_states at all: found when an rte pipeline's LayerSelector picked layer 0)."""
    from lexp.encoders.extract import extract_cls

    model, tokenizer = (tiny_bert if family == "bert" else tiny_xlnet)(tmp_path)
    pairs = [("the quick brown fox", "a cat"), ("red houses and old dogs", None), ("a cat", "the fox")]
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    rng = np.random.default_rng(4)
    columns = np.sort(rng.choice((k + 1) * hidden, size=10, replace=False))
    W = rng.standard_normal((2, 10)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    rows = dict(extract_cls(model, tokenizer, pairs, progress=False))
    feats = np.stack([rows[i] for i in range(len(pairs))])[:, columns]
    expected = [["no", "yes"][j] for j in (feats @ W.T + b).argmax(1)]
    path = save_reduced_extractor(
        tmp_path / "extractor",
        model=truncate_encoder(model, k),
        tokenizer=tokenizer,
        n_layers_kept=k + 1,
        columns=columns,
        weights=W,
        bias=b,
        labels=["no", "yes"],
        kind="classification",
        settings={"store_dtype": "float32"},
    )
    assert ReducedExtractor.load(path).classify(pairs) == expected


def test_predict_cli_and_its_errors(tmp_path: Path) -> None:
    model, tokenizer = tiny_bert(tmp_path)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((len(LABELS), 8)).astype(np.float32)
    save_reduced_extractor(
        tmp_path / "run" / "extractor",
        model=truncate_encoder(model, 1),
        tokenizer=tokenizer,
        n_layers_kept=2,
        columns=np.arange(8),
        weights=W,
        bias=np.zeros(len(LABELS), np.float32),
        labels=LABELS,
        kind="labelling",
        settings={},
    )
    text = tmp_path / "in.txt"
    text.write_text("\n".join(" ".join(s) for s in SENTENCES) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "lexp.predict", str(tmp_path / "run"), "--input", str(text)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    blocks = [b.splitlines() for b in done.stdout.strip().split("\n\n")]
    assert [[line.split("\t")[0] for line in block] for block in blocks] == SENTENCES
    assert all(line.split("\t")[1] in LABELS for block in blocks for line in block)
    text.write_text("The cat\n\nA dog\n")
    bad = subprocess.run(
        [sys.executable, "-m", "lexp.predict", str(tmp_path / "run"), "--input", str(text)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "in.txt:2" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(LexpInputError, match="no reduced extractor"):
        ReducedExtractor.load(tmp_path)


# ------------------------------------------------------------------------------ device and predict
def save_tiny_extractor(tmp_path: Path, *, settings: dict | None = None) -> tuple[Path, list[list[str]]]:
    """A tiny BERT extractor (layers 0..1, 8 neurons) and the predictions of the same maths by hand
    (also used by tests/test_hostile.py)."""
    model, tokenizer = tiny_bert(tmp_path)
    rng = np.random.default_rng(2)
    columns = np.array([1, 5, 9, 30, 33, 40, 50, 63])
    W = rng.standard_normal((len(LABELS), len(columns))).astype(np.float32)
    b = rng.standard_normal(len(LABELS)).astype(np.float32)
    path = save_reduced_extractor(
        tmp_path / "run" / "extractor",
        model=truncate_encoder(model, 1),
        tokenizer=tokenizer,
        n_layers_kept=2,
        columns=columns,
        weights=W,
        bias=b,
        labels=LABELS,
        kind="labelling",
        settings={"subword": "last", "store_dtype": "float32", **(settings or {})},
    )
    return path, _expected(model, tokenizer, 1, columns, W, b)


def test_load_puts_encoder_and_probe_on_the_device(device: torch.device, tmp_path: Path) -> None:
    path, expected = save_tiny_extractor(tmp_path)
    tagger = ReducedExtractor.load(path, device=device)
    assert tagger.device.type == device.type
    assert next(tagger.model.parameters()).device.type == device.type
    for tensor in (tagger.columns, tagger.weight, tagger.bias):
        assert tensor.device.type == device.type
    assert tagger.tag(SENTENCES, batch_size=2) == expected
    feats = tagger.features(SENTENCES)
    assert feats.shape == (sum(map(len, SENTENCES)), 8) and feats.dtype == np.float32
    assert ReducedExtractor.load(path, device="cpu").tag(SENTENCES) == expected  # same on the CPU


def test_the_extractor_rebuilds_rows_with_the_stores_batching_and_arithmetic(tmp_path: Path) -> None:
    """The pipeline checks that its extractor reproduces the reported test score: the rows must come
    from the same token budget and precision as the store (bf16-mixed moves them by ~1e-2)."""
    settings = {"max_tokens": 7, "precision": "bf16-mixed"}
    path, _ = save_tiny_extractor(tmp_path, settings=settings)
    model, tokenizer = tiny_bert(tmp_path)  # the same seeded weights save_tiny_extractor truncated
    rows = dict(extract_words(model, tokenizer, SENTENCES, progress=False, **settings))
    plain = dict(extract_words(model, tokenizer, SENTENCES, progress=False))
    columns = np.array([1, 5, 9, 30, 33, 40, 50, 63])
    want = np.concatenate([rows[i][:, columns] for i in range(len(SENTENCES))])
    assert np.abs(want - np.concatenate([plain[i][:, columns] for i in range(len(SENTENCES))])).max() > 1e-4
    np.testing.assert_array_equal(ReducedExtractor.load(path).features(SENTENCES), want)


def predict_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``python -m lexp.predict argv`` in this process: (exit code, stdout, stderr)."""
    from lexp.predict import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err
