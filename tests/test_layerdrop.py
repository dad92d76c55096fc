"""analysis=layerdrop: BI, angular distance and adjacent CKA against direct computations; blocks
dropped from an encoder and a decoder; the run on MiniLM and a tiny random Llama, its table and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lexp.experiment import config_dir, run
from lexp.redundancy.cka import cka_matrix
from lexp.redundancy.covariance import streaming_moments
from lexp.redundancy.layerdrop import block_list, drop_blocks, layer_similarity
from lexp.store import StoreWriter, open_store
from tiny_llama import tiny_llama
from tiny_models import tiny_bert


def _store(tmp_path: Path, x: np.ndarray, n_layers: int, hidden: int):
    manifest = {"fingerprint": "t", "model": "m", "task": "t", "split": "train", "label_vocab": ["a"]}
    with StoreWriter(
        tmp_path / "s", n_rows=len(x), n_layers=n_layers, hidden=hidden, dtype="float32", manifest=manifest
    ) as w:
        w.write_rows(0, x)
        w.finish(np.zeros(len(x), dtype=np.int64))
    return open_store(tmp_path / "s")


def test_measures_equal_direct_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    L, H, T = 5, 8, 300
    h = [rng.standard_normal((T, H)) + 2.0]
    for ell in range(1, L):
        h.append(h[-1] if ell == 2 else h[-1] + rng.uniform(0.3, 2.0) * rng.standard_normal((T, H)))
    x = np.concatenate(h, axis=1).astype(np.float32)  # block 1 (h1 -> h2) is the identity
    out = layer_similarity(_store(tmp_path, x, L, H), max_gap=3, chunk_rows=64)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), -1, 1)

    hs = [x[:, i * H : (i + 1) * H].astype(np.float64) for i in range(L)]
    bi = [1 - cos(hs[i], hs[i + 1]).mean() for i in range(L - 1)]
    np.testing.assert_allclose(out["block_influence"], bi, atol=1e-6)
    assert abs(out["block_influence"][1]) < 1e-6  # the identity block has no influence
    for g in (1, 2, 3):
        d = [np.mean(np.arccos(cos(hs[i], hs[i + g])) / np.pi) for i in range(L - g)]
        np.testing.assert_allclose(out["angular_distance"][str(g)], d, atol=1e-4)
    assert out["best_blocks"]["1"] == {"start": 1, "blocks": [1], "distance": pytest.approx(0, abs=1e-3)}
    cka = cka_matrix(streaming_moments(x, chunk_rows=64), L, H)
    np.testing.assert_allclose(out["cka_adjacent"], [cka[i, i + 1] for i in range(L - 1)], atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dropped_blocks_leave_the_prefix_and_change_the_rest(family: str, tmp_path: Path) -> None:
    if family == "bert":
        model, tok = tiny_bert(tmp_path)
    else:
        from transformers import AutoModel, AutoTokenizer

        folder = tiny_llama(tmp_path / "l", layers=4)
        model, tok = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    model.eval()
    n = len(block_list(model)[2])
    enc = tok("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True).hidden_states
        b = 0 if family == "bert" else 1  # tiny BERT has 2 blocks
        drop_blocks(model, [b])
        dropped = model(**enc, output_hidden_states=True).hidden_states
    assert len(dropped) == len(full) - 1 == n and model.config.num_hidden_layers == n - 1
    torch.testing.assert_close(dropped[b], full[b])  # the input of the removed block is unchanged
    assert not torch.allclose(dropped[b + 1], full[b + 1], atol=1e-4)  # block b+1 now reads h_b


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


SMALL = [
    "limit.train=60",
    "limit.dev=30",
    "limit.test=30",
    "probe.epochs=2",
    "progress=false",
    "logger=none",
    "analysis=layerdrop",
    "analysis.drop=[1,2]",
    "analysis.max_gap=2",
    "analysis.ppl_sentences=10",
]


def test_layerdrop_runs_on_minilm_and_a_tiny_llama(data_root: Path, tmp_path: Path) -> None:
    llama = tiny_llama(tmp_path / "llama", layers=4, hidden=32)
    runs = {}
    for name, model in (("minilm", []), ("llama", [f"model.name_or_path={llama}", "model.name=tinyllama"])):
        cfg = _cfg([f"data_root={data_root}", f"cache_dir={tmp_path / 'cache'}", *SMALL, *model])
        runs[name] = run(cfg, tmp_path / name)["layerdrop"]
    mini, dec = runs["minilm"], runs["llama"]
    assert len(mini["block_influence"]) == 6 and len(dec["block_influence"]) == 4
    assert not mini["causal_lm"] and dec["causal_lm"] and dec["perplexity_full"] > 1
    for result, blocks_left in ((mini, (5, 4)), (dec, (3, 2))):
        assert [d["n"] for d in result["drops"]] == [1, 2]
        assert [d["n_blocks_left"] for d in result["drops"]] == list(blocks_left)
        for d in result["drops"]:
            assert 0 < d["probe_dev"] <= 1 and 0 < d["full_dev"] <= 1
            assert len(d["blocks"]) == d["n"]
            best = result["angular_distance"][str(d["n"])]
            assert d["blocks"][0] == int(np.argmin(best))
    for d in dec["drops"]:
        assert d["perplexity"] > 1 and d["perplexity_ratio"] == pytest.approx(
            d["perplexity"] / dec["perplexity_full"]
        )
    assert (tmp_path / "llama" / "figures" / "layerdrop.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "minilm" / "results.json").read_text())
    assert saved["layerdrop"]["table"][0]["block"] == 0
    tables = subprocess.run(
        [sys.executable, "-m", "lexp.tables", str(tmp_path / "minilm"), str(tmp_path / "llama")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Block Influence" in tables and "n=1: blocks" in tables
    html = tmp_path / "report.html"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.report",
            str(tmp_path / "minilm"),
            str(tmp_path / "llama"),
            "--out",
            str(html),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'id="layerdrop"' in html.read_text()
