"""Stores keyed by the sentences, labels per task: tasks over the same sentences extract once.

sem and ccg label the same PMB sentences; their runs share one store per split, and each adds its
own label entry (``labels/<task>-<fp12>/``) beside the activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import lexp.experiment as experiment
from lexp import verify
from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.store import ensure_labels, label_entries, open_store, verify_store

SPLITS = ("train", "dev", "test")
CAPS = ["task.max_train_tokens=2000", "limit.dev=60", "limit.test=60", "probe.epochs=2", "progress=false"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _pmb_run(task: str, data_root: Path, cache: Path, run_dir: Path) -> dict:
    cfg = _cfg([f"task={task}", f"data_root={data_root}", f"cache_dir={cache}", "logger=none", *CAPS])
    return run(cfg, run_dir)


def _scores(oracle: dict) -> str:
    """The oracle's numbers without its wall times (canonical JSON, for exact comparison)."""

    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if "second" not in k and "time" not in k}
        return value

    return json.dumps(drop(oracle), sort_keys=True)


def _no_extraction(*args, **kwargs):
    raise AssertionError("the second task must reuse the stores, not load the encoder to extract")


def test_sem_then_ccg_extract_once_and_match_fresh_caches(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    sem = _pmb_run("sem", data_root, shared, tmp_path / "sem")
    assert sem["stores_reused"] == dict.fromkeys(SPLITS, False)
    assert sem["labels_reused"] == dict.fromkeys(SPLITS, False)

    with monkeypatch.context() as patch:  # any extraction would load the encoder first
        patch.setattr(experiment, "_load_encoder", _no_extraction)
        ccg = _pmb_run("ccg", data_root, shared, tmp_path / "ccg")
    assert ccg["stores"] == sem["stores"]  # one store per split for both tasks
    assert ccg["stores_reused"] == dict.fromkeys(SPLITS, True)
    assert ccg["labels_reused"] == dict.fromkeys(SPLITS, False)  # only its labels were built
    assert ccg["n_labels"] != sem["n_labels"]
    for split in SPLITS:
        path = Path(sem["stores"][split])
        names = [p.name for p in label_entries(path)]
        assert names == sorted([sem["store_labels"][split], ccg["store_labels"][split]])
        assert names[0].startswith("ccg-") and names[1].startswith("sem-")
        store = open_store(path, task="ccg")
        assert store.task == "ccg" and store.label_vocab == ccg["labels"]
        assert open_store(path).labels is None  # two tasks: a reader must say whose labels
    assert verify.main([str(shared)]) == 0  # both label entries of every store re-hashed: intact

    fresh = _pmb_run("ccg", data_root, tmp_path / "fresh", tmp_path / "ccg-fresh")
    assert fresh["stores_reused"] == dict.fromkeys(SPLITS, False)
    assert _scores(fresh["oracle"]) == _scores(ccg["oracle"]) and '"accuracy"' in _scores(ccg["oracle"])
    with monkeypatch.context() as patch:  # sem again after ccg: the same numbers as its fresh run
        patch.setattr(experiment, "_load_encoder", _no_extraction)
        sem_again = _pmb_run("sem", data_root, shared, tmp_path / "sem-again")
    assert sem_again["labels_reused"] == dict.fromkeys(SPLITS, True)
    assert _scores(sem_again["oracle"]) == _scores(sem["oracle"])


# --------------------------------------------------------------------------- tiny model, custom data
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_model, tiny_bert

    tmp = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_bert(tmp, layers=1, max_positions=16)
    return save_model(model, tokenizer, tmp / "model")


def _files(folder: Path, last_word: str = "fox", tag: str = "NN") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        sentence = "the\tDT\nquick\tJJ\nbrown\tJJ\n" + f"{last_word}\t{tag}\n"
        files[split] = folder / f"{split}.txt"
        files[split].write_text((sentence + "\n") * n, encoding="utf-8")
    return files


def _tiny(name: str, files: dict[str, Path], model: Path, cache: Path, run_dir: Path) -> dict:
    cfg = _cfg(
        [
            "task=custom_columns",
            f"task.name={name}",
            *(f"task.files.{s}={p}" for s, p in files.items()),
            f"model.name_or_path={model}",
            "model.name=tiny",
            f"cache_dir={cache}",
            "logger=none",
            "progress=false",
            "probe.epochs=1",
            "device=cpu",
        ]
    )
    return run(cfg, run_dir)


def test_tasks_with_different_sentences_never_share(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = _tiny("a", _files(tmp_path / "a"), tiny_model_dir, cache, tmp_path / "ra")
    # other files, same words, other labels: the same stores
    b = _tiny("b", _files(tmp_path / "b", tag="XX"), tiny_model_dir, cache, tmp_path / "rb")
    assert b["stores"] == a["stores"] and all(b["stores_reused"].values())
    # one word differs in every sentence: new stores, never a/b's
    c = _tiny("c", _files(tmp_path / "c", last_word="dog"), tiny_model_dir, cache, tmp_path / "rc")
    assert not any(c["stores_reused"].values())
    assert all(c["stores"][s] != a["stores"][s] for s in SPLITS)
    assert [p.name.split("-")[0] for p in label_entries(c["stores"]["train"])] == ["c"]
    # the same task name with changed labels: a new label entry beside the old one, never the stale one
    a2 = _tiny("a", _files(tmp_path / "a2", tag="VB"), tiny_model_dir, cache, tmp_path / "ra2")
    assert a2["stores"] == a["stores"] and not any(a2["labels_reused"].values())
    assert a2["store_labels"]["train"] != a["store_labels"]["train"] and a2["labels"] == ["DT", "JJ", "VB"]


def test_a_tampered_label_file_is_refused_by_reuse_and_verify(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    files = _files(tmp_path / "a")
    a = _tiny("a", files, tiny_model_dir, cache, tmp_path / "ra")
    _tiny("b", _files(tmp_path / "b", tag="XX"), tiny_model_dir, cache, tmp_path / "rb")
    store_path = Path(a["stores"]["train"])
    y_file = store_path / "labels" / a["store_labels"]["train"] / "labels.npy"
    y = np.load(y_file)
    np.save(y_file, np.zeros_like(y))  # same size, new content
    with pytest.raises(LexpInputError, match=r"labels\.npy does not match the checksum"):
        _tiny("a", files, tiny_model_dir, cache, tmp_path / "ra-again")
    report = verify_store(store_path)
    assert not report.ok and any(a["store_labels"]["train"] in p for p in report.problems), report.problems
    capsys.readouterr()
    assert verify.main([str(cache)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED  {store_path}" in err and "labels.npy does not match the checksum" in err
    # task b's labels of the same store are intact: b still runs on it
    b = _tiny("b", _files(tmp_path / "b", tag="XX"), tiny_model_dir, cache, tmp_path / "rb-again")
    assert all(b["stores_reused"].values()) and all(b["labels_reused"].values())


def test_an_edited_label_manifest_or_foreign_labels_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = _tiny("a", _files(tmp_path / "a"), tiny_model_dir, cache, tmp_path / "ra")
    train, dev = Path(a["stores"]["train"]), Path(a["stores"]["dev"])
    entry = train / "labels" / a["store_labels"]["train"]
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "label_vocab": ["X", "Y", "Z"]}))
    assert "does not match its own checksum" in " ".join(verify_store(train).problems)
    with pytest.raises(LexpInputError, match="does not match its own checksum"):
        _tiny("a", _files(tmp_path / "a"), tiny_model_dir, cache, tmp_path / "ra-again")
    (entry / "manifest.json").write_text(json.dumps(manifest))  # restored: usable again
    store = open_store(train, task="a")
    assert verify_store(train).ok
    # a dev label entry copied into the train store names another store: refused
    foreign = dev / "labels" / a["store_labels"]["dev"]
    (train / "labels" / foreign.name).mkdir()
    for f in foreign.iterdir():
        (train / "labels" / foreign.name / f.name).write_bytes(f.read_bytes())
    report = verify_store(train)
    assert not report.ok and any("copied in by hand" in p or "does not match" in p for p in report.problems)
    # adding labels whose count is not the store's rows is one clear error
    with pytest.raises(LexpInputError, match="labels for"):
        ensure_labels(store, "a", [0, 1], ["x", "y"])


# ------------------------------------------------------------------------------------------- units
def _bare_store(path: Path, rows: int = 40) -> Path:
    from lexp.store import StoreWriter

    with StoreWriter(path, n_rows=rows, n_layers=2, hidden=3, manifest={"fingerprint": "ab" * 32}) as w:
        w.write_rows(0, np.arange(rows * 6, dtype=np.float32).reshape(rows, 6))
        w.finish(None)  # activations only: the tasks add their labels
    return path


def test_concurrent_tasks_add_their_labels_to_one_store_once_each(tmp_path: Path) -> None:
    """Eight jobs of two tasks at once (flock is per open file, so threads contend as processes do)."""
    from concurrent.futures import ThreadPoolExecutor

    path = _bare_store(tmp_path / "train-abababababab")
    y = {"sem": np.arange(40) % 3, "ccg": np.arange(40) % 5}
    vocab = {"sem": ["A", "B", "C"], "ccg": list("vwxyz")}

    def job(task: str):
        store, reused = ensure_labels(open_store(path, labels=False), task, y[task], vocab[task])
        return task, reused, store.labels.copy(), store.label_vocab

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(job, ["sem", "ccg"] * 4))
    for task in ("sem", "ccg"):
        mine = [r for r in results if r[0] == task]
        assert [r[1] for r in mine].count(False) == 1  # built exactly once, reused by the others
        assert all(np.array_equal(r[2], y[task]) and r[3] == vocab[task] for r in mine)
    assert sorted(p.name.split("-")[0] for p in label_entries(path)) == ["ccg", "sem"]
    assert not [p for p in (path / "labels").iterdir() if ".partial-" in p.name]
    assert verify_store(path).ok


def test_verify_lists_old_format_stores_as_old(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    new = _bare_store(tmp_path / "cache" / "stores" / "m" / "train-abababababab")
    old = tmp_path / "cache" / "stores" / "m" / "pos" / "train-0123456789ab"
    old.mkdir(parents=True)
    (old / "activations.npy").write_bytes(b"")
    (old / "manifest.json").write_text(json.dumps({"format_version": 3, "complete": True}))
    with pytest.raises(LexpInputError, match="store format 3 .*no longer used"):
        open_store(old)
    assert verify.main([str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"old     {old}: store format 3" in out and f"ok      {new}" in out
