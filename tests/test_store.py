"""Activation store: round trip, fingerprints, atomic writes, reuse, locking, clear errors, memory."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lexp.errors import LexpInputError
from lexp.store import (
    STORE_FORMAT_VERSION,
    StoreWriter,
    ensure_store,
    fingerprint,
    load_store,
    open_store,
    store_dir,
)

N_LAYERS, HIDDEN = 3, 4
N_NEURONS = N_LAYERS * HIDDEN


def make_data(n_sentences: int = 17, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations (rows × 12, float32), class ids and sentence offsets with uneven sentence lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, size=n_sentences)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_rows = int(offsets[-1])
    acts = rng.standard_normal((n_rows, N_NEURONS)).astype(np.float32) * 10
    labels = rng.integers(0, 5, size=n_rows)
    return acts, labels, offsets


def write_store(
    path: Path, acts: np.ndarray, labels, offsets, *, dtype: str = "float16", seed: int = 0, **manifest
):
    """Write sentence by sentence in a shuffled order, as the length-sorted extractor does."""
    manifest = {"label_vocab": list("abcde"), "task": "toy", **manifest}
    with StoreWriter(
        path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN, dtype=dtype, manifest=manifest
    ) as writer:
        for i in np.random.default_rng(seed).permutation(len(offsets) - 1):
            writer.write_rows(int(offsets[i]), acts[offsets[i] : offsets[i + 1]])
        writer.finish(labels, offsets, extra_manifest={"seconds": 1.5})
    return path


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_in_shuffled_write_order(tmp_path: Path, dtype: str) -> None:
    acts, labels, offsets = make_data()
    path = write_store(
        tmp_path / "train-0123456789ab", acts, labels, offsets, dtype=dtype, fingerprint="0123456789ab" * 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-0123456789ab"]  # no partial left
    # the labels are the label entry of task "toy", beside the activations
    (entry,) = (path / "labels").iterdir()
    assert entry.name.startswith("toy-") and not (path / "labels.npy").exists()

    store = open_store(path)
    expected = acts.astype(dtype)
    assert store.activations.dtype == np.dtype(dtype)
    assert isinstance(store.activations, np.memmap) and not store.activations.flags.writeable
    np.testing.assert_array_equal(store.activations, expected)
    np.testing.assert_array_equal(store.labels, labels)
    assert store.labels.dtype == np.int64
    np.testing.assert_array_equal(store.offsets, offsets)
    assert (store.n_rows, store.n_layers, store.hidden, store.n_neurons) == (len(acts), 3, 4, 12)
    assert store.n_sentences == len(offsets) - 1
    m = store.manifest
    assert m["complete"] is True and m["format_version"] == STORE_FORMAT_VERSION
    assert (m["rows"], m["n_layers"], m["hidden"], m["dtype"]) == (len(acts), 3, 4, dtype)
    assert "label_vocab" not in m and "task" not in m  # they belong to the labels, not the store
    assert store.label_vocab == list("abcde") and store.task == "toy" and store.label_path == entry
    assert store.label_manifest["store_fingerprint"] == m["fingerprint"]
    assert m["seconds"] == 1.5 and m["n_sentences"] == len(offsets) - 1

    # the notebook path and plain numpy see the same arrays
    X, y, meta = load_store(path)
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(y, labels)
    assert meta == {**m, "task": "toy", "label_vocab": list("abcde")}
    np.testing.assert_array_equal(np.load(path / "activations.npy", mmap_mode="r"), expected)


def test_regression_targets_and_default_offsets(tmp_path: Path) -> None:
    acts = np.arange(5 * N_NEURONS, dtype=np.float32).reshape(5, N_NEURONS)
    with StoreWriter(tmp_path / "s", n_rows=5, n_layers=N_LAYERS, hidden=HIDDEN, dtype="float32") as w:
        w.write_rows(0, acts[:2])
        w.write_rows(4, acts[4])  # a single [CLS] row as a 1-D array
        w.write_rows(2, acts[2:4])
        w.finish(np.array([0.5, 1.0, 2.5, 3.0, 4.75]))
    store = open_store(tmp_path / "s")
    np.testing.assert_array_equal(store.activations, acts)
    assert store.labels.dtype == np.float32
    np.testing.assert_array_equal(store.labels, [0.5, 1.0, 2.5, 3.0, 4.75])
    np.testing.assert_array_equal(store.offsets, np.arange(6))


def test_layer_columns_are_layer_major(tmp_path: Path) -> None:
    acts, labels, offsets = make_data()
    store = open_store(write_store(tmp_path / "s", acts, labels, offsets))
    np.testing.assert_array_equal(store.layer_columns([0]), [0, 1, 2, 3])
    np.testing.assert_array_equal(store.layer_columns([2, 1]), [8, 9, 10, 11, 4, 5, 6, 7])
    np.testing.assert_array_equal(store.layer_columns(range(3)), np.arange(12))
    with pytest.raises(LexpInputError, match="layers 0..2"):
        store.layer_columns([3])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_iter_chunks_and_read_rows(tmp_path: Path, dtype: str) -> None:
    acts, labels, offsets = make_data(n_sentences=40)
    store = open_store(write_store(tmp_path / "s", acts, labels, offsets, dtype=dtype))
    expected = acts.astype(dtype).astype(np.float32)

    chunks = list(store.iter_chunks(chunk_rows=7))
    assert [len(c) for c in chunks[:-1]] == [7] * (len(chunks) - 1) and 1 <= len(chunks[-1]) <= 7
    assert all(c.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
    cols = np.array([11, 0, 5])
    np.testing.assert_array_equal(np.concatenate(list(store.iter_chunks(9, columns=cols))), expected[:, cols])

    idx = np.array([30, 2, 2, len(acts) - 1, 0, 17])
    got = store.read_rows(idx, columns=cols)
    assert got.dtype == np.float32 and got.shape == (6, 3)
    np.testing.assert_array_equal(got, expected[idx][:, cols])
    np.testing.assert_array_equal(store.read_rows(idx), expected[idx])
    np.testing.assert_array_equal(store.read_rows(slice(3, 9), cols), expected[3:9][:, cols])
    assert store.read_rows(np.array([], dtype=np.int64)).shape == (0, N_NEURONS)
    with pytest.raises(LexpInputError, match="row indices"):
        store.read_rows([len(acts)])
    with pytest.raises(LexpInputError, match="column indices"):
        store.read_rows([0], columns=[12])


def test_store_dir_layout(tmp_path: Path) -> None:
    fp = "0123456789abcdef" * 4
    # no task in the path: tasks over the same sentences share the store
    assert store_dir(tmp_path, "minilm", "train", fp) == tmp_path / "stores/minilm/train-0123456789ab"
    assert store_dir(tmp_path, "org/model", "dev", fp).parent.name == "org--model"
    with pytest.raises(LexpInputError):
        store_dir(tmp_path, "minilm", "train", "not-a-digest")


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_tracks_settings_and_file_bytes(tmp_path: Path) -> None:
    data = tmp_path / "a" / "train.conllu"
    data.parent.mkdir()
    data.write_bytes(b"1\tThe\tDET\n2\tdog\tNOUN\n")
    other = tmp_path / "dev.conllu"
    other.write_bytes(b"1\tA\tDET\n")
    settings = {
        "model": {"name": "minilm", "layers": (0, 1)},
        "subword": "last",
        "seed": np.int64(3),
        "root": Path("/x/y"),
        "rate": np.float32(0.5),
    }
    fp = fingerprint(settings, [data, other])
    assert len(fp) == 64 and int(fp, 16) >= 0

    # stable: same inputs, other key order, equivalent value types
    reordered = {
        "rate": 0.5,
        "root": "/x/y",
        "seed": 3,
        "subword": "last",
        "model": {"layers": [0, 1], "name": "minilm"},
    }
    assert fingerprint(reordered, [data, other]) == fp
    # the directory of a file does not matter, its name and bytes do
    moved = tmp_path / "b" / "train.conllu"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())
    assert fingerprint(settings, [moved, other]) == fp

    assert fingerprint({**settings, "subword": "first"}, [data, other]) != fp
    assert fingerprint({**settings, "seed": 4}, [data, other]) != fp
    assert fingerprint(settings, [other, data]) != fp  # file order matters (train vs dev)
    assert fingerprint(settings, [data]) != fp
    renamed = tmp_path / "b" / "train2.conllu"
    renamed.write_bytes(data.read_bytes())
    assert fingerprint(settings, [renamed, other]) != fp
    flipped = bytearray(data.read_bytes())
    flipped[-2] ^= 1  # one byte of the data file
    data.write_bytes(bytes(flipped))
    assert fingerprint(settings, [data, other]) != fp


def test_fingerprint_of_large_file_streams_blocks(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    payload = np.random.default_rng(0).integers(0, 256, size=3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    big.write_bytes(payload)
    fp = fingerprint({}, [big])
    changed = bytearray(payload)
    changed[(1 << 20) + 5] ^= 0xFF  # a byte in the second 1 MiB block
    big.write_bytes(bytes(changed))
    assert fingerprint({}, [big]) != fp
    assert fingerprint({}, []) != fp


def test_fingerprint_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(LexpInputError, match="missing.txt"):
        fingerprint({}, [tmp_path / "missing.txt"])
    with pytest.raises(LexpInputError, match="JSON"):
        fingerprint({"f": object()}, [])
    with pytest.raises(LexpInputError, match="JSON"):
        fingerprint({"x": float("nan")}, [])


# ------------------------------------------------------------------------------ atomic writes
def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    acts, labels, offsets = make_data()
    path = tmp_path / "s"
    with pytest.raises(KeyError):
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:3])
            assert w.partial.is_dir() and w.partial.name == f"s.partial-{os.getpid()}"
            raise KeyError("extraction crashed")
    assert list(tmp_path.iterdir()) == []

    built = []
    store, reused = ensure_store(path, lambda p: built.append(write_store(p, acts, labels, offsets)))
    assert (reused, len(built)) == (False, 1)
    np.testing.assert_array_equal(store.labels, labels)


def test_writer_checks_every_row_written_once(tmp_path: Path) -> None:
    acts, labels, offsets = make_data()
    path = tmp_path / "s"
    with pytest.raises(LexpInputError, match=r"rows 3-4 were written twice"):
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:5])
            w.write_rows(3, acts[3:5])
    with pytest.raises(LexpInputError, match=r"2 of \d+ rows were never written \(rows 4-5\)"):
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:4])
            w.write_rows(6, acts[6:])
            w.finish(labels, offsets)
    with pytest.raises(LexpInputError, match="12 columns"):
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:2, :11])
    with pytest.raises(LexpInputError, match="outside"):
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(len(acts) - 1, acts[:2])
    with pytest.raises(LexpInputError, match="labels"):
        with StoreWriter(path, n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:2])
            w.finish([1, 2, 3])
    with pytest.raises(LexpInputError, match="offsets"):
        with StoreWriter(path, n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:2])
            w.finish([1, 2], [0, 3])
    with pytest.raises(RuntimeError, match="without finish"):
        with StoreWriter(path, n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN) as w:
            w.write_rows(0, acts[:2])
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    acts, labels, offsets = make_data()
    path = write_store(tmp_path / "s", acts, labels, offsets)
    with pytest.raises(LexpInputError, match="already exists"):
        with StoreWriter(path, n_rows=1, n_layers=N_LAYERS, hidden=HIDDEN):
            pass
    with pytest.raises(LexpInputError, match="set by the writer"):
        StoreWriter(tmp_path / "t", n_rows=1, n_layers=N_LAYERS, hidden=HIDDEN, manifest={"rows": 7})


def test_float16_overflow_raises_and_suggests_float32(tmp_path: Path) -> None:
    ok = np.zeros((2, N_NEURONS), dtype=np.float32)
    ok[0, 3] = 65504.0  # the largest float16
    ok[1, 5] = -65519.0  # still rounds to a finite -65504
    bad = ok.copy()
    bad[1, 7] = 70000.0
    with StoreWriter(tmp_path / "a", n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN, dtype="float16") as w:
        with pytest.raises(LexpInputError, match=r"float16 range.*store\.dtype=float32"):
            w.write_rows(0, bad)
        w.write_rows(0, ok)  # the rejected write left the rows unwritten
        w.finish([0, 1])
    assert np.isfinite(open_store(tmp_path / "a").activations).all()

    with StoreWriter(tmp_path / "b", n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN, dtype="float32") as w:
        w.write_rows(0, bad)
        w.finish([0, 1])
    assert open_store(tmp_path / "b").activations[1, 7] == 70000.0

    nan = ok.copy()
    nan[0, 0] = np.nan
    with pytest.raises(LexpInputError, match="NaN"):
        with StoreWriter(tmp_path / "c", n_rows=2, n_layers=N_LAYERS, hidden=HIDDEN, dtype="float32") as w:
            w.write_rows(0, nan)


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from lexp.store import StoreWriter
w = StoreWriter(sys.argv[1], n_rows=10, n_layers=3, hidden=4, manifest={"fingerprint": "0" * 64})
w.__enter__()
w.write_rows(0, np.ones((6, 12), dtype=np.float32))
print(w.partial, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leaves_only_a_partial_that_is_never_used(tmp_path: Path) -> None:
    path = tmp_path / "stores" / "m" / "toy" / "train-000000000000"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    partial = Path(proc.stdout.strip())
    assert partial.is_dir() and partial.name.startswith("train-000000000000.partial-")
    assert not path.exists()
    with pytest.raises(LexpInputError, match="partial"):
        open_store(partial)
    with pytest.raises(LexpInputError, match="no activation store"):
        open_store(path)

    # a writer that is still running (here: our parent process) must keep its partial directory
    live = path.with_name(f"{path.name}.partial-{os.getppid()}")
    live.mkdir()
    acts, labels, offsets = make_data()
    calls = []

    def build(p: Path) -> None:
        calls.append(p)
        write_store(p, acts, labels, offsets, fingerprint="0" * 64)

    store, reused = ensure_store(path, build)
    assert (reused, calls) == (False, [path])
    assert not partial.exists() and live.is_dir()
    np.testing.assert_array_equal(store.activations, acts.astype(np.float16))


# ------------------------------------------------------------------------------------ reuse
def test_ensure_store_reuses_without_calling_build(tmp_path: Path) -> None:
    acts, labels, offsets = make_data()
    fp = fingerprint({"x": 1}, [])
    path = store_dir(tmp_path, "m", "train", fp)
    store, reused = ensure_store(path, lambda p: write_store(p, acts, labels, offsets, fingerprint=fp))
    assert not reused

    def must_not_build(p: Path) -> None:
        raise AssertionError("build called for a complete store")

    again, reused = ensure_store(path, must_not_build)
    assert reused and again.path == path
    np.testing.assert_array_equal(again.activations, store.activations)

    # a store copied under another fingerprint's name is refused, not silently reused
    wrong = store_dir(tmp_path, "m", "train", fingerprint({"x": 2}, []))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, wrong)
    with pytest.raises(LexpInputError, match="does not match the directory name"):
        ensure_store(wrong, must_not_build)


def test_ensure_store_builds_once_under_concurrency(tmp_path: Path) -> None:
    """flock serialises builders: the second caller waits, then reuses the first one's store."""
    acts, labels, offsets = make_data()
    path = tmp_path / "train-abcdefabcdef"
    calls: list[float] = []

    def build(p: Path) -> None:
        calls.append(time.monotonic())
        time.sleep(0.3)
        write_store(p, acts, labels, offsets, fingerprint="abcdefabcdef" + "0" * 52)

    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_store(path, build)[1])) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1
    assert sorted(results) == [False, True]


def test_ensure_store_reports_a_build_that_wrote_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="without writing a store"):
        ensure_store(tmp_path / "s", lambda p: None)


# --------------------------------------------------------------------------------- clear errors
def test_open_store_on_garbage_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(LexpInputError, match="no activation store"):
        open_store(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LexpInputError, match=r"manifest\.json is missing.*delete"):
        open_store(empty)

    acts, labels, offsets = make_data()
    good = write_store(tmp_path / "good", acts, labels, offsets)
    manifest = json.loads((good / "manifest.json").read_text())

    def variant(name: str, edit) -> Path:
        target = tmp_path / name
        target.mkdir()
        shutil.copytree(good, target, dirs_exist_ok=True)
        edit(target)
        return target

    bad_json = variant("bad_json", lambda d: (d / "manifest.json").write_text("{not json"))
    with pytest.raises(LexpInputError, match="not valid JSON.*delete"):
        open_store(bad_json)
    incomplete = variant(
        "incomplete", lambda d: (d / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    )
    with pytest.raises(LexpInputError, match="complete: true"):
        open_store(incomplete)
    old = variant(
        "old", lambda d: (d / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    )
    with pytest.raises(LexpInputError, match="store format 0"):
        open_store(old)
    garbage = variant("garbage", lambda d: (d / "activations.npy").write_bytes(b"\x00garbage" * 100))
    with pytest.raises(LexpInputError, match=r"activations\.npy.*cannot be read.*delete"):
        open_store(garbage)
    short = variant("short", lambda d: np.save(next(d.glob("labels/*/labels.npy")), labels[:-1]))
    with pytest.raises(LexpInputError, match="labels.npy"):
        open_store(short)
    wrong_shape = variant(
        "shape", lambda d: (d / "manifest.json").write_text(json.dumps({**manifest, "hidden": 5}))
    )
    with pytest.raises(LexpInputError, match="does not match the manifest"):
        open_store(wrong_shape)


# ------------------------------------------------------------------------------------- memory
def _rss_mb(kind: str) -> float:
    import psutil

    info = psutil.Process().memory_info()
    # "anon": memory the process owns (rss minus file-backed shared pages, which the kernel may drop)
    return (info.rss - (info.shared if kind == "anon" else 0)) / 2**20


def write_pattern_store(path: Path, n_rows: int, n_layers: int, hidden: int) -> None:
    """A float16 store whose entry (r, c) is float16((r % 1000) + c / 1024), see pattern_value."""
    cols = np.arange(n_layers * hidden, dtype=np.float32) / 1024
    with StoreWriter(path, n_rows=n_rows, n_layers=n_layers, hidden=hidden, dtype="float16") as w:
        for start in range(0, n_rows, 8192):
            r = np.arange(start, min(start + 8192, n_rows))
            w.write_rows(start, ((r % 1000).astype(np.float32)[:, None] + cols).astype(np.float16))
        w.finish(np.arange(n_rows) % 7)


def pattern_value(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((np.asarray(r) % 1000).astype(np.float32) + np.asarray(c, dtype=np.float32) / 1024).astype(
        np.float16
    )


@pytest.fixture(scope="module")
def store_200mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "store"
    write_pattern_store(path, n_rows=100_000, n_layers=4, hidden=256)  # 100,000 × 1,024 × 2 B = 205 MB
    return path


def test_streaming_pass_keeps_resident_set_small(store_200mb: Path) -> None:
    """A full iter_chunks pass over a 205 MB store must not keep the file resident in the process."""
    store = open_store(store_200mb)
    gc.collect()
    base_total, peak_total = _rss_mb("total"), 0.0
    total = np.zeros(store.n_neurons, dtype=np.float64)
    for chunk in store.iter_chunks(chunk_rows=4096):
        total += chunk.sum(axis=0, dtype=np.float64)
        peak_total = max(peak_total, _rss_mb("total") - base_total)
    counts = np.bincount(np.arange(store.n_rows) % 1000, minlength=1000)
    table = pattern_value(np.arange(1000)[:, None], np.arange(store.n_neurons)[None, :]).astype(np.float64)
    expected = counts @ table
    np.testing.assert_allclose(total, expected, rtol=1e-9)  # the whole file was really read
    assert peak_total < 80, f"RSS grew by {peak_total:.0f} MB while streaming a 205 MB store"


def test_read_rows_copies_only_requested_rows(store_200mb: Path) -> None:
    """Random-row reads never copy the store into process memory.

    Anonymous memory is what a copy would cost; file-backed pages are not counted, because the
    kernel maps up to 64 KiB around every faulting page of a cached file ("fault-around") and can
    drop them again at any time.
    """
    store = open_store(store_200mb)
    gc.collect()
    base = _rss_mb("anon")
    idx = np.random.default_rng(0).choice(store.n_rows, size=2000, replace=False)
    got = store.read_rows(idx, columns=[0, 1023])
    grown = _rss_mb("anon") - base
    np.testing.assert_array_equal(got[:, 0], idx % 1000)
    np.testing.assert_array_equal(got[:, 1], pattern_value(idx, 1023))
    assert grown < 30, f"read_rows of 2,000 rows grew anonymous memory by {grown:.0f} MB"
