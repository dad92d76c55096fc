"""model.random_init: the same architecture and tokenizer with seeded random weights, its own store
fingerprint, and every consumer (extraction, analysis=compare) loading the same twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lexp.encoders.loading import (
    RANDOM_MARKER,
    load_encoder,
    materialize_random_init,
    model_digest,
    store_model_settings,
)
from lexp.errors import LexpModelError
from lexp.experiment import config_dir, run
from lexp.store import open_store
from tiny_models import save_model, tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    return save_model(*tiny_bert(tmp, layers=2, seed=0), tmp / "model")


def _weights(encoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.model.state_dict().items()}


def test_twin_has_the_architecture_and_tokenizer_and_seeded_weights(tiny: Path) -> None:
    cfg = {"name": "tiny", "name_or_path": str(tiny)}
    pretrained = load_encoder(cfg)
    rng_before = torch.get_rng_state()
    twin = load_encoder({**cfg, "random_init": True, "init_seed": 1})
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    again = _weights(load_encoder({**cfg, "random_init": True, "init_seed": 1}))
    other = _weights(load_encoder({**cfg, "random_init": True, "init_seed": 2}))
    base, mine = _weights(pretrained), _weights(twin)
    assert type(twin.model) is type(pretrained.model) and mine.keys() == base.keys()
    assert all(mine[k].shape == base[k].shape for k in base)
    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(mine[query], base[query])
    assert all(torch.equal(mine[k], again[k]) for k in mine)  # a seed gives one model
    assert not torch.equal(mine[query], other[query])
    # transformers' initialisation: normal(0, initializer_range), LayerNorm 1 / 0
    assert mine[query].std().item() == pytest.approx(twin.model.config.initializer_range, rel=0.2)
    assert torch.equal(
        mine["embeddings.LayerNorm.weight"], torch.ones_like(mine["embeddings.LayerNorm.weight"])
    )
    words = [["the", "quick", "fox"]]
    assert (
        twin.tokenizer(words, is_split_into_words=True)["input_ids"]
        == pretrained.tokenizer(words, is_split_into_words=True)["input_ids"]
    )
    assert twin.info["random_init_seed"] == 1 and pretrained.info["random_init_seed"] is None
    with pytest.raises(LexpModelError, match="model.init_seed"):
        load_encoder({**cfg, "random_init": True, "init_seed": None})


def test_materialised_twin_is_a_model_folder_loaded_as_it_is(tiny: Path, tmp_path: Path) -> None:
    cfg = {"name": "tiny", "name_or_path": str(tiny), "random_init": True, "init_seed": 3}
    folder = materialize_random_init(cfg, tmp_path)
    assert folder.parent == tmp_path / "random_init" / "tiny" and (folder / RANDOM_MARKER).is_file()
    assert model_digest(folder) != model_digest(tiny)
    in_memory = _weights(load_encoder(cfg))
    for random_init in (True, False):  # the folder's weights, not drawn again
        loaded = _weights(load_encoder({**cfg, "name_or_path": str(folder), "random_init": random_init}))
        assert all(torch.equal(loaded[k], in_memory[k]) for k in in_memory)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize_random_init(cfg, tmp_path) == folder  # reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert materialize_random_init({**cfg, "init_seed": 4}, tmp_path) != folder


def test_store_fingerprint_settings() -> None:
    plain = {"name": "m", "name_or_path": "m", "dtype": "float32"}
    # pretrained: the keys are left out, so stores built before they existed are still reused
    assert store_model_settings({**plain, "random_init": False, "init_seed": 42}) == plain
    assert store_model_settings({**plain, "random_init": True, "init_seed": 5}) == {
        **plain,
        "random_init": True,
        "init_seed": 5,
    }


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_runs_of_the_twin_have_their_own_stores_and_compare_with_the_model(
    tiny: Path, tmp_path: Path, data_root: Path
) -> None:
    common = [
        f"data_root={data_root}",
        f"cache_dir={tmp_path / 'cache'}",
        "model.name=tiny",
        f"model.name_or_path={tiny}",
        "device=cpu",
        "limit.train=30",
        "limit.dev=10",
        "extract.splits=[train,dev]",
        "probe.epochs=1",
        "progress=false",
        "logger=none",
    ]
    base = run(_cfg(common), tmp_path / "base")
    twin = run(_cfg([*common, "model.random_init=true", "model.init_seed=5"]), tmp_path / "twin")
    assert twin["stores"]["train"] != base["stores"]["train"]
    assert Path(twin["model_dir"]).parent == tmp_path / "cache" / "random_init" / "tiny"
    a, b = open_store(base["stores"]["train"]), open_store(twin["stores"]["train"])
    assert a.n_rows == b.n_rows and np.array_equal(a.labels, b.labels)
    assert not np.allclose(
        np.asarray(a.activations[:20], np.float32), np.asarray(b.activations[:20], np.float32)
    )
    # the default init seed is the run seed: another run seed is another random model
    seeded = run(_cfg([*common, "model.random_init=true", "seed=5"]), tmp_path / "seeded")
    assert seeded["config"]["model"]["init_seed"] == 5 and seeded["stores"] == twin["stores"]
    # analysis=compare: model B = the twin (analysis.other.random_init), the same store as the twin's run
    out = run(
        _cfg([*common, "analysis=compare", "analysis.other.random_init=true", "analysis.other.init_seed=5"]),
        tmp_path / "compare",
    )
    block = out["compare"]
    assert block["model_b"]["store"] == twin["stores"]["train"] and block["model_b"]["store_reused"]
    assert block["model_a"]["store"] == base["stores"]["train"]
    assert block["models"][1].endswith("random_init=true]")
    assert max(block["diagonal"]) < 0.999  # the twin is another model


def test_a_sentence_task_fine_tunes_the_twin(tiny: Path, tmp_path: Path, data_root: Path) -> None:
    """random_init on a sentence task: fine-tuning starts from the random weights (the twin's folder)."""
    out = run(
        _cfg(
            [
                f"data_root={data_root}",
                f"cache_dir={tmp_path / 'cache'}",
                "task=sst2",
                "model.name=tiny",
                f"model.name_or_path={tiny}",
                "model.random_init=true",
                "model.init_seed=5",
                "device=cpu",
                "limit.train=32",
                "limit.dev=16",
                "extract.splits=[train,dev]",
                "finetune.epochs=1",
                "probe.epochs=1",
                "progress=false",
                "logger=none",
            ]
        ),
        tmp_path / "run",
    )
    source = Path(out["finetune"]["settings"]["model"]["name_or_path"])
    assert source.parent == tmp_path / "cache" / "random_init" / "tiny" and source.name.endswith("-seed5")
    assert Path(out["model_dir"]).parent == tmp_path / "cache" / "finetuned" / "tiny"
