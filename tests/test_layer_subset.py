"""model.layers (a subset of hidden states) and model.dtype=bfloat16 on a tiny random Llama.

A subset run must give the same per-layer probes and CKA as the same layers of a full run (same
seed), name the model's layer numbers everywhere, store only the kept layers, and run the pipeline
(LayerSelector picks a model layer, the reduced extractor truncates there) and lexp.predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.layers import config_shape, model_columns, neuron_layers, resolve_layers, spec_problem
from lexp.schema import check_config
from lexp.store import open_store
from tiny_llama import tiny_llama

RUN = [
    "task=pos",
    "limit.train=60",
    "limit.dev=20",
    "limit.test=20",
    "probe.epochs=2",
    "progress=false",
    "logger=none",
]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "m", layers=4, hidden=32)  # hidden states 0..4


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _base(data_root: Path, cache: Path, llama: Path) -> list[str]:
    return [
        f"data_root={data_root}",
        f"cache_dir={cache}",
        f"model.name_or_path={llama}",
        "model.name=tinyllama",
    ]


def test_resolve_layers() -> None:
    assert resolve_layers("every:4", 13) == [0, 4, 8, 12]
    assert resolve_layers("every:5", 13) == [0, 5, 10, 12]  # the last layer is always kept
    assert resolve_layers([8, 0, 4], 13) == [0, 4, 8]  # a list: exactly these, sorted
    assert resolve_layers(list(range(13)), 13) is None  # every layer = the full model
    assert resolve_layers("every:1", 13) is None and resolve_layers(None, 13) is None
    with pytest.raises(LexpInputError, match="names layer 13, but .* has 12 layers"):
        resolve_layers([0, 13], 13)
    assert spec_problem([0, 0]) == "holds layer 0 twice"
    assert spec_problem([-1]) is not None and spec_problem("every:0") is not None
    assert spec_problem("evry:3") is not None and spec_problem([]) is not None
    cols = np.array([0, 3, 4, 9, 11])  # hidden 4, stored layers [0, 2, 5]
    np.testing.assert_array_equal(model_columns(cols, [0, 2, 5], 4), [0, 3, 8, 21, 23])
    np.testing.assert_array_equal(neuron_layers([0, 2, 5], 2), [0, 0, 2, 2, 5, 5])


def test_schema_checks_the_spelling(llama: Path) -> None:
    with pytest.raises(LexpInputError, match="model.layers=.*is invalid"):
        check_config(_cfg(["model.layers=every:x"]), device=False)
    check_config(_cfg(["model.layers=[0,2]"]), device=False)
    check_config(_cfg(["model.layers=every:2"]), device=False)
    assert config_shape(llama) == (5, 32)


def test_a_layer_beyond_the_depth_is_one_error_before_any_work(
    data_root: Path, cache: Path, llama: Path, tmp_path: Path
) -> None:
    cfg = _cfg([*_base(data_root, cache, llama), *RUN, "model.layers=[0,7]"])
    with pytest.raises(LexpInputError, match="names layer 7, but .* has 4 layers"):
        run(cfg, tmp_path / "r")
    assert not (cache / "stores" / "tinyllama").exists()
    cfg = _cfg([*_base(data_root, cache, llama), *RUN, "model.layers=[0,2]", "analysis=layerdrop"])
    with pytest.raises(LexpInputError, match="analysis=layerdrop needs every layer"):
        run(cfg, tmp_path / "d")


def test_extraction_of_a_subset_stops_at_its_top_layer(llama: Path) -> None:
    """The core, as a notebook calls it: layers=[0,2] of 4 runs 2 layers (stats.layers_run) and gives
    the full model's layers 0 and 2, words and sentence vectors alike."""
    from lexp.encoders.extract import extract_cls, extract_words
    from lexp.encoders.loading import load_encoder

    enc = load_encoder({"name_or_path": str(llama)})
    words = [["The", "cat", "sat", "."], ["Dogs", "bark", "loudly"]]
    full = extract_words(enc.model, enc.tokenizer, words, progress=False)
    full_rows = dict(full)
    sub = extract_words(enc.model, enc.tokenizer, words, layers=[0, 2], progress=False)
    sub_rows = dict(sub)
    assert sub.stats.layers_run == 2 and full.stats.layers_run is None
    assert "layers_run" not in full.stats.as_dict() and sub.stats.as_dict()["layers_run"] == 2
    for i in full_rows:
        np.testing.assert_allclose(
            sub_rows[i], np.hstack([full_rows[i][:, :32], full_rows[i][:, 64:96]]), atol=1e-5
        )
    pairs = [("The cat sat .", None), ("Dogs bark", "loudly")]
    whole = dict(extract_cls(enc.model, enc.tokenizer, pairs, sentence="mean", progress=False))
    top = extract_cls(enc.model, enc.tokenizer, pairs, sentence="mean", layers=[1], progress=False)
    top_rows = dict(top)
    assert top.stats.layers_run == 1
    for i in whole:
        np.testing.assert_allclose(top_rows[i], whole[i][32:64], atol=1e-5)
    assert len(enc.model.layers) == 4  # the loaded model itself is untouched


def test_subset_equals_the_same_layers_of_a_full_run(
    data_root: Path, cache: Path, llama: Path, tmp_path: Path
) -> None:
    base = [*_base(data_root, cache, llama), *RUN]
    full = run(_cfg([*base, "analysis=layers"]), tmp_path / "full")
    sub = run(_cfg([*base, "analysis=layers", "model.layers=[0,2,4]"]), tmp_path / "sub")
    assert full["layer_ids"] == [0, 1, 2, 3, 4] and sub["layer_ids"] == [0, 2, 4]
    assert sub["n_layers"] == 3 and sub["n_neurons"] == 3 * 32
    store = open_store(sub["stores"]["train"])
    assert store.manifest["layer_ids"] == [0, 2, 4] and store.activations.shape[1] == 96
    full_store = open_store(full["stores"]["train"])
    np.testing.assert_array_equal(  # the stored columns are the full store's columns of those layers
        np.asarray(store.activations),
        np.asarray(full_store.activations)[:, full_store.layer_columns([0, 2, 4])],
    )
    assert store.activations.nbytes * 5 == full_store.activations.nbytes * 3
    rows_full = {r["layer"]: r for r in full["layers"]["table"]}
    rows_sub = {r["layer"]: r for r in sub["layers"]["table"]}
    assert sorted(rows_sub) == [0, 2, 4]  # the model's layer numbers
    for layer in (0, 2, 4):
        assert rows_sub[layer]["dev"] == pytest.approx(rows_full[layer]["dev"], abs=1e-6)
        assert rows_sub[layer]["test"] == pytest.approx(rows_full[layer]["test"], abs=1e-6)
    # layers 0..2 of a subset read the stored layers 0 and 2
    assert set(sub["layers"]["heads"]) >= {"layer_4", "layers_0_0", "layers_0_2"}
    saved = json.loads((tmp_path / "sub" / "results.json").read_text())
    assert saved["layer_ids"] == [0, 2, 4] and [r["layer"] for r in saved["layers"]["table"]] == [0, 2, 4]
    from lexp.tables import main as tables

    assert tables([str(tmp_path / "sub"), "--out", str(tmp_path / "t.md")]) in (0, None)
    table7 = (tmp_path / "t.md").read_text()
    assert "| 4 " in table7 or "| 4|" in table7.replace(" ", "|")

    # [0,2] of 4 layers: the forward pass stops after layer 2 (the final norm, applied after layer
    # 4 only, is dropped with the rest), and the stored rows are the full model's
    low = run(_cfg([*base, "analysis=layers", "model.layers=[0,2]"]), tmp_path / "low")
    low_store = open_store(low["stores"]["train"])
    assert low_store.manifest["extraction"]["layers_run"] == 2
    assert "layers_run" not in full_store.manifest["extraction"]
    np.testing.assert_allclose(
        np.asarray(low_store.activations),
        np.asarray(full_store.activations)[:, full_store.layer_columns([0, 2])],
        atol=1e-6,
    )

    full_g = run(_cfg([*base, "analysis=general", "analysis.ct=0.3"]), tmp_path / "gfull")
    sub_g = run(
        _cfg([*base, "analysis=general", "analysis.ct=0.3", "model.layers=[0,2,4]"]), tmp_path / "gsub"
    )
    cka_full, cka_sub = np.asarray(full_g["general"]["cka"]), np.asarray(sub_g["general"]["cka"])
    np.testing.assert_allclose(cka_sub, cka_full[np.ix_([0, 2, 4], [0, 2, 4])], atol=1e-6)
    assert sub_g["general"]["cka_layers"] == [0, 2, 4]
    assert sub_g["general"]["n_neurons_total"] == 96


def test_pipeline_and_predict_on_every_2(data_root: Path, cache: Path, llama: Path, tmp_path: Path) -> None:
    from lexp.extractor import ReducedExtractor
    from lexp.predict import main as predict

    out = run(
        _cfg(
            [
                *_base(data_root, cache, llama),
                *RUN,
                "model.layers=every:3",  # 0, 3 and the last layer, 4
                "analysis=pipeline",
                "analysis.ls_delta=0.0",  # the oracle's score: LS stops at the top stored layer or before
                "analysis.grid.step=40",
                "analysis.ranking_steps=50",
                "analysis.timing.enabled=false",
            ]
        ),
        tmp_path / "pipeline",
    )
    assert out["status"] == "complete" and out["layer_ids"] == [0, 3, 4]
    ls = out["pipeline"]["ls_layer"]
    assert ls in (0, 3, 4)  # a model layer number, never a stored-block index of a missing layer
    ex = out["extractor"]
    assert ex["n_layers_kept"] == ls + 1
    assert ex["test_accuracy_reloaded"] == pytest.approx(ex["test_accuracy_reported"])
    tagger = ReducedExtractor.load(tmp_path / "pipeline" / "extractor")
    assert int(tagger.model.config.num_hidden_layers) == ls
    hidden = 32
    kept = sorted({int(c) // hidden for c in tagger.columns})
    assert set(kept) <= {0, 3, 4} and max(kept) <= ls  # columns name model layers
    text = tmp_path / "in.txt"
    text.write_text("The cat sat on the mat .\n")
    tags = tmp_path / "tags.tsv"
    assert (
        predict([str(tmp_path / "pipeline"), "--input", str(text), "--output", str(tags), "--device", "cpu"])
        == 0
    )
    assert [
        line.split("\t")[0] for line in tags.read_text().splitlines() if line
    ] == "The cat sat on the mat .".split()


def test_bfloat16_weights_on_the_cpu(data_root: Path, cache: Path, llama: Path, tmp_path: Path) -> None:
    base = [*_base(data_root, cache, llama), *RUN]
    f32 = run(_cfg(base), tmp_path / "f32")
    bf16 = run(_cfg([*base, "model.dtype=bfloat16"]), tmp_path / "bf16")
    assert bf16["status"] == "complete" and bf16["stores"]["train"] != f32["stores"]["train"]
    store, ref = open_store(bf16["stores"]["train"]), open_store(f32["stores"]["train"])
    assert store.manifest["dtype"] == "float16" and store.manifest["extraction"]["model_dtype"] == "bfloat16"
    a, b = np.asarray(store.activations, dtype=np.float32), np.asarray(ref.activations, dtype=np.float32)
    assert a.shape == b.shape and np.isfinite(a).all()
    scale = np.abs(b).max()
    assert np.abs(a - b).max() < 0.1 * scale and not np.array_equal(a, b)  # bfloat16 rounding, same states
    assert 0 < bf16["oracle"]["dev"]["accuracy"] <= 1
