"""Store integrity (issue 12, cases 1 and 2): space reserved before writing, a full disk is one clear
error that leaves nothing behind, content checksums recorded at write time and verified on demand
(``verify_store``, ``python -m lexp.verify``) and before reusing a store whose file changed."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import xxhash

from lexp import store as store_mod
from lexp import verify
from lexp.errors import LexpInputError
from lexp.store import StoreSpaceError, StoreWriter, ensure_store, open_store, store_nbytes, verify_store
from mounts import tmpfs

N_LAYERS, HIDDEN = 3, 64
N_NEURONS = N_LAYERS * HIDDEN


def _data(n_rows: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_rows, N_NEURONS)).astype(np.float32), rng.integers(0, 5, n_rows)


def _write(path: Path, acts: np.ndarray, labels: np.ndarray, dtype: str = "float16") -> Path:
    fp = {"fingerprint": "0123456789ab" + "0" * 52}  # the directory names below end in its first 12
    with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN, dtype=dtype, manifest=fp) as w:
        for start in range(0, len(acts), 1000):
            w.write_rows(start, acts[start : start + 1000])
        w.finish(labels)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def _corrupt(path: Path, n_bytes: int = 1 << 20) -> int:
    """Overwrite up to 1 MB of activations.npy's data with 0xFF, as case 2 did; return the bytes hit."""
    file = path / store_mod.ACTIVATIONS
    offset = int(open_store(path).activations.offset)
    n_bytes = min(n_bytes, file.stat().st_size - offset)
    with open(file, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * n_bytes)
    return n_bytes


# ------------------------------------------------------------------------------------ checksums
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_manifest_records_the_checksums_size_mtime_and_zero_non_finite(tmp_path: Path, dtype: str) -> None:
    acts, labels = _data()
    path = _write(tmp_path / "s", acts, labels, dtype)
    store = open_store(path)
    m = store.manifest
    for name in ("activations.npy", "sentence_offsets.npy"):
        assert m["checksums"][name] == "xxh3_128:" + xxhash.xxh3_128((path / name).read_bytes()).hexdigest()
    y_file = store.label_path / "labels.npy"  # the labels' own manifest records theirs
    want = "xxh3_128:" + xxhash.xxh3_128(y_file.read_bytes()).hexdigest()
    assert store.label_manifest["checksums"]["labels.npy"] == want
    st = (path / "activations.npy").stat()
    assert m["activations_bytes"] == st.st_size and m["activations_mtime_ns"] == st.st_mtime_ns
    assert m["non_finite"] == 0
    report = verify_store(path)
    assert report.ok and report.problems == () and report.non_finite == 0, report
    assert report.message().startswith("ok")


def test_scan_counts_every_nan_and_inf_and_nothing_else(tmp_path: Path) -> None:
    for dtype in (np.float16, np.float32):
        x = (np.arange(3 * 1024 * 1024) % 1000).astype(dtype)  # spans blocks of the scan
        x[[0, 7, 5000, len(x) - 1]] = [np.nan, np.inf, -np.inf, np.nan]
        x[[1, 2]] = [np.finfo(dtype).max, -np.finfo(dtype).max]  # largest finite: not counted
        np.save(tmp_path / "x.npy", x)
        arr = np.load(tmp_path / "x.npy", mmap_mode="r")
        digest, count = store_mod._scan(tmp_path / "x.npy", int(arr.offset), np.dtype(dtype))
        assert count == 4
        assert digest == "xxh3_128:" + xxhash.xxh3_128((tmp_path / "x.npy").read_bytes()).hexdigest()


def test_writer_still_refuses_non_finite_rows(tmp_path: Path) -> None:
    acts, labels = _data(10)
    acts[3, 5] = np.nan
    with pytest.raises(LexpInputError, match="NaN or inf"):
        _write(tmp_path / "s", acts, labels)
    assert _leftovers(tmp_path) == []


def test_case2_corruption_is_found_by_verify_and_refused_on_reuse(tmp_path: Path, caplog) -> None:
    acts, labels = _data()
    path = _write(tmp_path / "stores" / "m" / "pos" / "train-0123456789ab", acts, labels)
    hit = _corrupt(path)  # the whole data (1.15 MB) or 1 MB of it
    report = verify_store(path)
    assert not report.ok
    assert report.non_finite == hit // 2  # 0xFFFF is a float16 NaN: every overwritten value counts
    assert any("activations.npy does not match the checksum" in p for p in report.problems)
    assert str(path) in report.message() and "Delete this store" in report.message()

    def build(_: Path) -> None:
        raise AssertionError("a corrupt store must not be rebuilt behind the user's back")

    with caplog.at_level(logging.WARNING, logger="lexp.store"), pytest.raises(LexpInputError) as err:
        ensure_store(path, build)
    assert str(path) in str(err.value) and "non-finite" in str(err.value)
    assert "was modified after the store was written" in caplog.text

    # the command line: names the store, exit 1; an intact store beside it is reported ok
    _write(tmp_path / "stores" / "m" / "pos" / "dev-0123456789ab", *_data(50, seed=1))
    (tmp_path / "stores" / "m" / "pos" / "x.partial-999999").mkdir()  # an interrupted write: skipped
    proc = subprocess.run(
        [sys.executable, "-m", "lexp.verify", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1, proc
    assert f"FAILED  {path}:" in proc.stderr and "1 store(s) failed" in proc.stderr
    assert "ok      " + str(tmp_path / "stores" / "m" / "pos" / "dev-0123456789ab") in proc.stdout
    assert "partial" not in proc.stdout + proc.stderr


def test_verify_command_on_intact_and_missing_stores(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "s", *_data(20))
    assert verify.main([str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"ok      {path}")
    assert verify.main([str(tmp_path / "nothing")]) == 2
    assert "no activation store here" in capsys.readouterr().err
    next((tmp_path / "s").glob("labels/*/labels.npy")).write_bytes(b"garbage")  # reported, no traceback
    assert verify.main([str(tmp_path)]) == 1
    assert "labels.npy" in capsys.readouterr().err


def test_a_change_that_keeps_the_mtime_is_reused_but_verify_finds_it(tmp_path: Path) -> None:
    """The documented limit of the quick reuse check: it trusts size + mtime (not the bytes)."""
    acts, labels = _data()
    path = _write(tmp_path / "s", acts, labels)
    st = (path / "activations.npy").stat()
    _corrupt(path, 4096)
    os.utime(path / "activations.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    store, reused = ensure_store(path, lambda _: None)
    assert reused and store.n_rows == len(acts)
    assert not verify_store(path).ok


def test_a_copy_without_the_mtime_is_verified_once_per_reuse_and_used(tmp_path: Path, caplog) -> None:
    acts, labels = _data()
    path = _write(tmp_path / "a" / "s", acts, labels)
    copy = tmp_path / "b" / "s"
    shutil.copytree(path, copy, copy_function=shutil.copyfile)  # new mtimes, same bytes
    with caplog.at_level(logging.INFO, logger="lexp.store"):
        store, reused = ensure_store(copy, lambda _: None)
    assert reused and "content verified" in caplog.text
    np.testing.assert_array_equal(store.read_rows(slice(0, 5)), acts[:5].astype(np.float16))


def test_open_store_checks_the_integrity_keys_cheaply(tmp_path: Path) -> None:
    import json

    acts, labels = _data(30)
    path = _write(tmp_path / "s", acts, labels)
    manifest = json.loads((path / "manifest.json").read_text())
    with open(path / "activations.npy", "ab") as fh:  # extended: the memmap alone would not notice
        fh.write(b"\0" * 64)
    with pytest.raises(LexpInputError, match=r"activations\.npy.*the manifest recorded.*delete"):
        open_store(path)
    path = _write(tmp_path / "t", acts, labels)
    (path / "manifest.json").write_text(json.dumps({**manifest, "checksums": {}}))
    with pytest.raises(LexpInputError, match="lacks the xxh3_128 checksums"):
        open_store(path)
    with pytest.raises(LexpInputError, match="set by the writer"):
        StoreWriter(tmp_path / "u", n_rows=1, n_layers=1, hidden=1, manifest={"checksums": {}})


def test_rows_written_from_threads_at_once_make_the_same_store(tmp_path: Path) -> None:
    acts, labels = _data()
    with StoreWriter(tmp_path / "s", n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
        workers = [
            threading.Thread(
                target=lambda k=k: [w.write_rows(i, acts[i : i + 10]) for i in range(k, 3000, 40)]
            )
            for k in range(0, 40, 10)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        w.finish(labels)
    assert verify_store(tmp_path / "s").ok
    np.testing.assert_array_equal(open_store(tmp_path / "s").activations, acts.astype(np.float16))


# ----------------------------------------------------------------------------------- disk space
def test_simulated_enospc_from_fallocate_is_one_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch):
    acts, labels = _data()
    parent = tmp_path / "stores" / "m" / "pos"
    target = parent / "train-0123456789ab"

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    built = []

    def build(path: Path) -> None:
        fp = {"fingerprint": "0123456789ab" + "0" * 52}
        with StoreWriter(path, n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN, manifest=fp) as w:
            built.append("entered")  # extraction would start here
            w.write_rows(0, acts)
            w.finish(labels)

    with pytest.raises(StoreSpaceError) as err:
        ensure_store(target, build)
    message = str(err.value)
    assert str(target) in message and "No space left on device" in message
    assert f"needs {store_nbytes(len(acts), N_LAYERS, HIDDEN):,} bytes" in message and "are free" in message
    assert "LEXP_CACHE" in message
    assert isinstance(err.value, LexpInputError) and built == []  # before any row was extracted
    assert _leftovers(parent) == ["train-0123456789ab.lock"]  # no store, no partial directory
    monkeypatch.undo()
    store, reused = ensure_store(target, build)  # the rerun is clean
    assert not reused and store.n_rows == len(acts) and verify_store(target).ok


def test_too_little_free_space_fails_before_anything_is_created(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_free_bytes", lambda _: 12_345)
    with pytest.raises(StoreSpaceError, match=r"needs [\d,]+ bytes .*, 12,345 bytes \(0\.0 MB\) are free"):
        with StoreWriter(tmp_path / "s", n_rows=100, n_layers=N_LAYERS, hidden=HIDDEN):
            raise AssertionError("not reached")
    assert _leftovers(tmp_path) == []


def test_require_free_space_checks_several_stores_before_any_exists(tmp_path: Path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(store_mod, "_free_bytes", lambda d: seen.append(d) or 1_000_000)
    target = tmp_path / "cache" / "stores" / "m" / "pos" / "train-0123456789ab"  # nothing exists yet
    store_mod.require_free_space(target, 1_000_000)
    with pytest.raises(
        StoreSpaceError, match=r"needs 1,000,001 bytes .*1,000,000 bytes \(1\.0 MB\) are free"
    ):
        store_mod.require_free_space(target, 1_000_001)
    assert seen == [tmp_path, tmp_path] and not (tmp_path / "cache").exists()


def test_enospc_while_writing_labels_is_the_same_error(tmp_path: Path, monkeypatch) -> None:
    acts, labels = _data(100)
    real = store_mod._save_npy

    def save(path: Path, array: np.ndarray) -> None:
        if path.name == "labels.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, array)

    monkeypatch.setattr(store_mod, "_save_npy", save)
    with pytest.raises(StoreSpaceError, match="not enough disk space"):
        _write(tmp_path / "s", acts, labels)
    assert _leftovers(tmp_path) == []


def test_file_systems_without_fallocate_get_the_space_written(tmp_path: Path, monkeypatch) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    acts, labels = _data()
    with StoreWriter(tmp_path / "s", n_rows=len(acts), n_layers=N_LAYERS, hidden=HIDDEN) as w:
        st = (w.partial / "activations.npy").stat()
        assert st.st_blocks * 512 >= st.st_size  # every block allocated before the first row
        np.testing.assert_array_equal(np.load(w.partial / "activations.npy"), 0)  # header intact
        w.write_rows(0, acts)
        w.finish(labels)
    assert verify_store(tmp_path / "s").ok


def test_the_activation_file_is_allocated_before_the_first_row(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", n_rows=4000, n_layers=N_LAYERS, hidden=HIDDEN) as w:
        st = (w.partial / "activations.npy").stat()
        assert st.st_size == 128 + 4000 * N_NEURONS * 2
        assert st.st_blocks * 512 >= st.st_size  # not sparse: the memory map cannot SIGBUS
        w.write_rows(0, np.zeros((4000, N_NEURONS), np.float32))
        w.finish(np.zeros(4000, np.int64))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 2 MB tmpfs (needs root and mount rights; skipped with the reason elsewhere)."""
    with tmpfs(tmp_path / "tmpfs", "size=2m") as mount:
        yield mount


def test_a_real_full_disk_is_one_clear_error_and_a_clean_rerun(small_tmpfs: Path, monkeypatch) -> None:
    acts, labels = _data(6000)  # 6,000 × 192 × 2 B = 2.3 MB: more than the 2 MB disk
    target = small_tmpfs / "stores" / "m" / "pos" / "train-0123456789ab"
    with pytest.raises(StoreSpaceError, match=r"needs [\d,]+ bytes .* are free on the file system"):
        ensure_store(target, lambda p: _write(p, acts, labels))
    assert _leftovers(target.parent) == ["train-0123456789ab.lock"]

    # past the free-space check (as if another process filled the disk after it): the real
    # posix_fallocate on the tmpfs raises ENOSPC, still before any row is written
    monkeypatch.setattr(store_mod, "_free_bytes", lambda _: 1 << 40)
    with pytest.raises(StoreSpaceError, match="No space left on device"):
        ensure_store(target, lambda p: _write(p, acts, labels))
    assert _leftovers(target.parent) == ["train-0123456789ab.lock"]
    monkeypatch.undo()

    store, reused = ensure_store(target, lambda p: _write(p, acts[:2000], labels[:2000]))  # fits
    assert not reused and store.n_rows == 2000 and verify_store(target).ok
