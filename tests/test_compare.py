"""analysis=compare: cross-model CKA over two aligned stores (tiny BERTs on a slice of real EWT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.analyses.compare import PairedStores, check_aligned, model_labels, other_model_cfg
from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.redundancy.cka import cka_blocks, linear_cka
from lexp.redundancy.covariance import streaming_moments
from lexp.store import StoreWriter, open_store
from tiny_models import save_model, tiny_bert

SMALL = ["limit.train=30", "limit.dev=10", "extract.splits=[train,dev]", "progress=false", "logger=none"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _store(path: Path, x: np.ndarray, n_layers: int, offsets=None, labels=None, split: str = "train"):
    rows = x.shape[0]
    with StoreWriter(
        path,
        n_rows=rows,
        n_layers=n_layers,
        hidden=x.shape[1] // n_layers,
        dtype="float32",
        manifest={"fingerprint": path.name, "task": "pos", "split": split},
    ) as w:
        w.write_rows(0, x)
        w.finish(np.zeros(rows, dtype=np.int64) if labels is None else labels, offsets)
    return open_store(path)


# ------------------------------------------------------------------------------------- units
def test_paired_stores_give_the_cka_of_the_concatenation(tmp_path: Path) -> None:
    """Lockstep chunks (sizes that do not divide the rows, max_rows) = CKA of the arrays side by side."""
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((157, 12)).astype(np.float32) + 40.0  # 3 layers × 4
    xb = (np.concatenate([xa[:, 4:], xa[:, :4]], axis=1) @ rng.standard_normal((12, 10))).astype(np.float32)
    xb += rng.standard_normal(xb.shape).astype(np.float32)  # 2 layers × 5, related to A
    offsets = np.array([0, 50, 157])
    a = _store(tmp_path / "a", xa, 3, offsets)
    b = _store(tmp_path / "b", xb, 2, offsets)
    for chunk_rows, max_rows in ((16, None), (1000, None), (16, 100)):
        source = PairedStores(a, b, max_rows)
        m = streaming_moments(source, chunk_rows=chunk_rows, layer_sizes=source.layer_sizes)
        n = max_rows or 157
        assert m.n == n
        blocks = [xa[:n, i : i + 4] for i in (0, 4, 8)] + [xb[:n, i : i + 5] for i in (0, 5)]
        expected = np.array([[linear_cka(p, q) for q in blocks] for p in blocks])
        np.testing.assert_allclose(cka_blocks(m), expected, atol=1e-6)
        debiased = np.array([[linear_cka(p, q, debiased=True) for q in blocks] for p in blocks])
        np.testing.assert_allclose(cka_blocks(m, debiased=True), debiased, atol=1e-6)
    assert expected[:3, 3:].max() > 0.3  # B mixes A's layers: the cross block is not trivial


def test_stores_of_different_words_are_one_clear_error(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((20, 6)).astype(np.float32)
    a = _store(tmp_path / "a", x, 2, np.array([0, 8, 20]))
    cases = {
        "rows": _store(tmp_path / "rows", x[:19], 2, np.array([0, 8, 19])),
        "sentence offsets differ": _store(tmp_path / "off", x, 2, np.array([0, 9, 20])),
        "labels differ \\(first at row 3\\)": _store(
            tmp_path / "lab", x, 2, np.array([0, 8, 20]), labels=np.eye(1, 20, 3, dtype=np.int64)[0]
        ),
        "split 'train' vs 'dev'": _store(tmp_path / "split", x, 2, np.array([0, 8, 20]), split="dev"),
    }
    for what, other in cases.items():
        with pytest.raises(LexpInputError, match=what) as info:
            check_aligned(a, other)
        assert str(a.path) in str(info.value) and str(other.path) in str(info.value)
    check_aligned(a, a)  # the same words: fine


def test_model_b_config_and_names() -> None:
    a = {"name": "minilm", "name_or_path": "minilm", "revision": None, "dtype": "float32"}
    assert other_model_cfg(a, {"name": None, "dtype": None}) == a
    b = other_model_cfg(a, {"name": "bert", "name_or_path": "bert-base-cased", "dtype": None})
    assert b == {"name": "bert", "name_or_path": "bert-base-cased", "revision": None, "dtype": "float32"}
    assert model_labels(a, b) == ("minilm", "bert")
    twin = other_model_cfg(a, {"random_init": True})
    assert model_labels(a, twin) == ("minilm", "minilm[random_init=true]")
    assert model_labels(a, other_model_cfg(a, {"dtype": "bfloat16"})) == (
        "minilm[dtype=float32]",
        "minilm[dtype=bfloat16]",
    )
    assert model_labels(a, a) == ("minilm (A)", "minilm (B)")
    # model.layers belongs to A's depth: a different checkpoint keeps all of its own layers
    deep = a | {"layers": [0, 12, 24]}
    assert other_model_cfg(deep, {"name_or_path": "/models/six-layer", "layers": None})["layers"] is None
    assert other_model_cfg(deep, {"revision": "v2"})["layers"] is None
    assert other_model_cfg(deep, {"random_init": True})["layers"] == [0, 12, 24]  # A's own twin
    assert other_model_cfg(deep, {"name_or_path": "/m", "layers": "every:2"})["layers"] == "every:2"


def test_config_composes_and_is_checked() -> None:
    from lexp.schema import check_config

    cfg = _cfg(["analysis=compare", "model@analysis.other=bert"])
    assert cfg.analysis.other.name == "bert" and cfg.model.name == "minilm"
    check_config(cfg, device=False)
    assert _cfg(["analysis=compare"]).analysis.other.name is None  # null: model A's
    with pytest.raises(LexpInputError, match="analysis.other.dtype"):
        check_config(_cfg(["analysis=compare", "analysis.other.dtype=float8"]), device=False)


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a = save_model(*tiny_bert(tmp / "a", layers=2, seed=0), tmp / "a" / "model")
    b = save_model(*tiny_bert(tmp / "b", layers=2, hidden=16, intermediate=32, seed=1), tmp / "b" / "model")
    return {"a": a, "b": b}


def _overrides(tiny_models: dict[str, Path], cache: Path, data_root: Path) -> list[str]:
    return [
        f"data_root={data_root}",
        f"cache_dir={cache}",
        "model.name=tiny-a",
        f"model.name_or_path={tiny_models['a']}",
        "analysis=compare",
        "device=cpu",
        *SMALL,
    ]


def test_two_tiny_models_end_to_end(tiny_models, tmp_path: Path, data_root: Path) -> None:
    overrides = _overrides(tiny_models, tmp_path / "cache", data_root) + [
        "analysis.other.name=tiny-b",
        f"analysis.other.name_or_path={tiny_models['b']}",
    ]
    out = run(_cfg(overrides), tmp_path / "run")
    assert out["status"] == "complete" and "oracle" not in out and "oracle" not in out["timings_s"]
    block = out["compare"]
    assert block["models"] == ["tiny-a", "tiny-b"]
    cka, debiased = np.asarray(block["cka"]), np.asarray(block["cka_debiased"])
    assert cka.shape == debiased.shape == (3, 3)  # embeddings + 2 layers each; A: hidden 32, B: 16
    assert ((cka >= 0) & (cka <= 1)).all()
    assert max(block["diagonal"]) < 0.9  # two random models: far from the diagonal of one below
    # the heatmap is the CKA of the two stores' layers, written out
    a, b = open_store(block["model_a"]["store"]), open_store(block["model_b"]["store"])
    assert a.n_rows == b.n_rows == block["rows"] == out["rows"]["train"]
    xa, xb = np.asarray(a.activations, np.float64), np.asarray(b.activations, np.float64)
    expected = np.array(
        [
            [linear_cka(xa[:, i * 32 : (i + 1) * 32], xb[:, j * 16 : (j + 1) * 16]) for j in range(3)]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(cka, expected, atol=1e-6)
    np.testing.assert_allclose(debiased[0, 1], linear_cka(xa[:, :32], xb[:, 16:32], debiased=True), atol=1e-6)
    assert np.asarray(block["cka_b"]).shape == (3, 3)
    np.testing.assert_allclose(block["diagonal"], np.diagonal(cka))
    for name in ("cka_compare.png", "cka_compare_debiased.png"):
        assert (tmp_path / "run" / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in out["figures"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    np.testing.assert_allclose(saved["compare"]["cka"], cka, rtol=1e-12)
    # again: both stores and the CKA are reused
    again = run(_cfg(overrides), tmp_path / "again")
    assert again["compare"]["cache_reused"] and again["compare"]["model_b"]["store_reused"]
    np.testing.assert_allclose(again["compare"]["cka"], cka, rtol=1e-12)


def test_a_layer_subset_of_a_stays_with_a(tiny_models, tmp_path: Path, data_root: Path) -> None:
    """model.layers=[0,2] is A's choice: model B, another checkpoint, gives all of its 3 layers."""
    overrides = _overrides(tiny_models, tmp_path / "cache", data_root) + [
        "model.layers=[0,2]",
        "analysis.other.name=tiny-b",
        f"analysis.other.name_or_path={tiny_models['b']}",
    ]
    block = run(_cfg(overrides), tmp_path / "run")["compare"]
    assert block["model_a"]["layer_ids"] == [0, 2] and block["model_b"]["layer_ids"] == [0, 1, 2]
    assert np.asarray(block["cka"]).shape == (2, 3) and "diagonal" not in block
    assert block["model_b"]["config"]["layers"] is None


def test_a_model_against_itself_has_a_diagonal_of_one(tiny_models, tmp_path: Path, data_root: Path) -> None:
    out = run(_cfg(_overrides(tiny_models, tmp_path / "cache", data_root)), tmp_path / "run")
    block = out["compare"]
    assert block["models"] == ["tiny-a (A)", "tiny-a (B)"]
    assert block["model_a"]["store"] == block["model_b"]["store"]  # one store, reused for B
    np.testing.assert_allclose(block["diagonal"], 1.0, atol=1e-6)
    np.testing.assert_allclose(block["diagonal_debiased"], 1.0, atol=1e-6)
    cka = np.asarray(block["cka"])  # A × A: the model's own Figure 1
    np.testing.assert_allclose(cka, block["cka_a"], atol=1e-6)
    np.testing.assert_allclose(cka, cka.T, atol=1e-6)
