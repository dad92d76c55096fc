"""The on-disk activation store: one directory per (model, sentences, extraction settings, split).

Extraction is the expensive step (minutes to hours), every analysis after it reads the same
numbers many times. So activations are written once, as plain ``.npy`` files that any notebook can
memory-map, and every later run reuses them when the fingerprint of model + sentences + settings is
unchanged. The activations do not depend on the labels, so the fingerprint hashes the word
sequences themselves (:func:`sentences_digest`), not the data files or the task name: two tasks over
the same sentences (sem and ccg both label the PMB sentences) share one store and each adds its
labels beside the activations. Layout of ``<cache>/stores/<model>/<split>-<fp12>/``::

    activations.npy        rows × n_layers·hidden, float16 or float32, layer-major columns
                           (column = layer·hidden + unit, layer 0 = embeddings)
    sentence_offsets.npy   int64, n_sentences + 1; sentence i owns rows offsets[i]:offsets[i+1]
    manifest.json          fingerprint, settings (incl. the sentences' digest), model, split,
                           n_layers, hidden, dtype, rows, lexp_version, format_version, created,
                           complete: true, checksums, files, activations_bytes, non_finite, ...
    labels/<task>-<fp12>/  the labels of one task (one entry per task and label content):
        labels.npy         int64 class ids (float32 for regression), one per row
        manifest.json      task, split, label_vocab, rows, store_fingerprint, fingerprint (of the
                           task name, vocabulary and label values), checksums, files, ...

A label entry's fingerprint is taken over its content (task name, vocabulary, the label values), so
changed labels are a new entry, never a stale one; it is added under its own lock
(:func:`ensure_labels`, through :func:`lexp.locks.ensure_entry`), written into
``<entry>.partial-<pid>/`` and renamed into place, so two tasks of a sweep add their labels to one
store at the same time safely.

Integrity. The writer knows the store's size up front: it checks the free space and reserves the
whole ``activations.npy`` with ``posix_fallocate`` before the first row is written, so a full disk
is one :class:`StoreSpaceError` (path, bytes needed, bytes free) instead of a ``SIGBUS`` in the
middle of the memory-mapped writes. ``finish`` records an xxh3-128 checksum of every ``.npy``
file, the size and mtime of each, its count of non-finite values (always 0: ``write_rows`` refuses
NaN/inf rows) and a checksum of the manifest itself. One rule (:func:`check_integrity`) decides
whether a store may be used, for reuse and for ``python -m lexp.verify`` alike: the directory name
matches the manifest's fingerprint, the manifest matches its own checksum, every file has its
recorded size, and a file whose mtime changed (edited, or copied without ``cp -p``) is re-hashed.
The same rule covers the label entry a run uses (and, in ``lexp.verify``, every label entry).
Reuse re-hashes only such files (three ``stat`` calls on an unchanged store); ``lexp.verify``
re-hashes every file and counts its non-finite values.

Notebook use (no lexp config needed)::

    from lexp.store import load_store
    X, y, meta = load_store("~/.cache/lexp/stores/minilm/train-0123456789ab", task="pos")
    X.shape, X.dtype              # (150000, 2688) float16, memory-mapped (nothing loaded yet)
    layer3 = X[:, 3 * meta["hidden"] : 4 * meta["hidden"]]

or, with chunked float32 reads that never hold the whole matrix::

    store = open_store(path, task="pos")     # task: whose labels (store.labels, store.label_vocab)
    for chunk in store.iter_chunks(8192, columns=store.layer_columns([3, 4])):
        ...                       # float32 (≤ 8192, 768)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from lexp import __version__
from lexp.errors import LexpInputError
from lexp.locks import ensure_entry, remove_partials

__all__ = [
    "STORE_FORMAT_VERSION",
    "Store",
    "StoreSpaceError",
    "StoreVerification",
    "StoreWriter",
    "ensure_store",
    "fingerprint",
    "load_store",
    "open_store",
    "require_free_space",
    "store_dir",
    "store_nbytes",
    "verify_store",
    "check_integrity",
    "ensure_labels",
    "label_entries",
    "manifest_checksum",
    "sentences_digest",
]

log = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout changes; part of every fingerprint, so old stores are never
#: misread, they simply stop matching.
STORE_FORMAT_VERSION = 4  # 2: checksums, activations_bytes/_mtime_ns and non_finite in the manifest;
# 3: size and mtime of every .npy file ("files") and the manifest's own checksum ("manifest_checksum");
# 4: keyed by the sentences, not the task; labels per task in labels/<task>-<fp12>/ (format 3 stores,
# labels inside, are not read: a run builds format 4 stores in another directory)

ACTIVATIONS = "activations.npy"
LABELS = "labels.npy"
OFFSETS = "sentence_offsets.npy"
MANIFEST = "manifest.json"
_NPY_FILES = (ACTIVATIONS, OFFSETS)
LABELS_DIR = "labels"

_PARTIAL = ".partial-"
_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
#: float16 rounds every |x| < 65520 to a finite value (max 65504); from 65520 on it becomes inf.
_FLOAT16_LIMIT = 65520.0
_HASH_BLOCK = 1 << 20
#: Manifest keys that the writer owns; a caller's manifest may not contradict them.
_WRITER_KEYS = (
    "rows",
    "n_layers",
    "hidden",
    "dtype",
    "format_version",
    "lexp_version",
    "complete",
    "checksums",
    "activations_bytes",
    "activations_mtime_ns",
    "non_finite",
    "files",
    "manifest_checksum",
)
#: Content checksum of the store files: xxh3-128 runs at ~1.9 GB/s from the page cache here
#: (blake2b 0.16 GB/s, sha256 0.27 GB/s); it detects corruption, it is not a signature.
CHECKSUM_ALGORITHM = "xxh3_128"
#: Block size of the checksum / non-finite scan (fits the L2/L3 caches; measured best of 1-64 MiB).
_SCAN_BLOCK = 4 << 20
#: Room kept free beyond the .npy files' sizes (manifest, directory entries, labels' headers).
_SPACE_SLACK = 1 << 20


# ------------------------------------------------------------------------------------- fingerprint
def _json_default(obj: Any) -> Any:
    """Make settings JSON-able in one canonical way (paths, numpy scalars/arrays, configs, sets)."""
    if isinstance(obj, os.PathLike):
        return Path(obj).as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):  # e.g. an OmegaConf DictConfig
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):  # e.g. ListConfig
        return list(obj)
    raise TypeError(type(obj).__name__)


def _canonical_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(
            obj,
            sort_keys=True,
            separators=(",", ":"),
            default=_json_default,
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise LexpInputError(
            f"{what} cannot be written as JSON ({exc}); use only str, int, float (finite), bool, None, "
            "paths, lists and dicts with string keys"
        ) from exc


def fingerprint(settings: Mapping[str, Any], files: Sequence[Path | str]) -> str:
    """sha256 (hex) over the settings, the bytes and names of ``files``, the lexp and store versions.

    Settings are serialised as canonical JSON (sorted keys), so dict order never matters; files are
    hashed in the order given (train before dev is a different fingerprint from dev before train).
    Only a file's *name* enters the hash, not its directory: moving the data keeps the cache valid,
    changing one byte does not.
    """
    h = hashlib.sha256()
    header = {"store_format": STORE_FORMAT_VERSION, "lexp": __version__, "settings": settings}
    h.update(_canonical_json(header, "fingerprint settings").encode("utf-8"))
    for f in files:
        p = Path(f)
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                h.update(f"\0file\0{p.name}\0{size}\0".encode())
                while block := fh.read(_HASH_BLOCK):
                    h.update(block)
        except OSError as exc:
            raise LexpInputError(
                f"{p}: cannot read this input file to fingerprint it ({exc.strerror}); check the path in "
                "the task config"
            ) from exc
    return h.hexdigest()


def sentences_digest(sentences: Iterable[Sequence[str | None]]) -> str:
    """sha256 (hex) of a split's inputs in order: the word sequence of each sentence (word tasks), or
    its (text_a, text_b) pair (sentence tasks). The store fingerprint takes this digest instead of
    the data files, so tasks that label the same sentences share one store."""
    h = hashlib.sha256()
    n = 0
    for sentence in sentences:
        h.update(_canonical_json(list(sentence), "sentence").encode("utf-8"))
        h.update(b"\n")
        n += 1
    h.update(f"\0{n}".encode())
    return h.hexdigest()


def _slug(what: str, value: Any) -> str:
    slug = str(value).replace("/", "--").replace(os.sep, "--")
    if slug in ("", ".", "..") or _PARTIAL in slug or slug.endswith(".lock"):
        raise LexpInputError(f"store_dir: {what} name {value!r} cannot be used as a directory name")
    return slug


def store_dir(cache_root: Path | str, model_slug: str, split: str, fp: str) -> Path:
    """``<cache_root>/stores/<model_slug>/<split>-<fp[:12]>`` (no task: tasks over the same
    sentences share the store; their labels live in its ``labels/`` folder).

    Path separators in the names are replaced by ``--`` (as the Hugging Face cache does), so a
    model called ``org/name`` gets one directory level, not two.
    """
    model, split = _slug("model", model_slug), _slug("split", split)
    if not re.fullmatch(r"[0-9a-f]{12,}", fp):
        raise LexpInputError(f"store_dir: fingerprint {fp!r} is not a hex digest from lexp.store.fingerprint")
    return Path(cache_root).expanduser() / "stores" / model / f"{split}-{fp[:12]}"


# -------------------------------------------------------------------------------------- the store
#: torch runs a copy on one thread below this many elements (at::internal::GRAIN_SIZE).
_SERIAL_ELEMENTS = 32768


def _as_float(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to ``dtype``; float16 → float32 goes through torch's vectorised copy.

    numpy's float16 cast is scalar here (~2 ns/element, over 1 s per probe epoch); torch's is
    ~0.2 ns/element. The copy is cut into pieces below torch's parallel grain size, because an
    OpenMP fork/join per batch costs more than the copy itself and stalls badly when other
    processes share the cores (measured: 0.3 s vs 4–7 s per epoch on this 2-core machine).
    """
    if x.dtype == dtype:
        return x
    if x.dtype == np.float16 and dtype == np.float32 and x.size:
        import torch  # deferred: opening a store in a notebook should not pay torch's import

        with warnings.catch_warnings():  # a read-only memmap view is fine: the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.ascontiguousarray(x))
        # numpy allocates the result: torch's large CPU allocations (2 MiB-aligned) fragment the
        # glibc heap, which kept ~10 freed chunks resident in a streaming pass.
        out = np.empty(x.shape, dtype=np.float32)
        flat_src, flat_out = src.reshape(-1), torch.from_numpy(out).reshape(-1)
        if torch.get_num_threads() == 1:  # serial anyway: one copy (pieces cost ~2x more)
            flat_out.copy_(flat_src)
            return out
        for piece_out, piece_src in zip(
            flat_out.split(_SERIAL_ELEMENTS), flat_src.split(_SERIAL_ELEMENTS), strict=True
        ):
            piece_out.copy_(piece_src)
        return out
    return x.astype(dtype)


@dataclass(frozen=True, eq=False)
class Store:
    """A complete, read-only activation store (see the module docstring for the layout)."""

    path: Path
    activations: np.ndarray = field(repr=False)  # np.memmap, read-only
    #: the labels of one task (``None``: opened without a task while the store holds several)
    labels: np.ndarray | None = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)
    #: the label entry's manifest (task, label_vocab, fingerprint, ...) and directory, or None
    label_manifest: dict[str, Any] | None = field(default=None, repr=False)
    label_path: Path | None = None

    @property
    def task(self) -> str | None:
        """The task whose labels this Store carries (None: opened without labels)."""
        return None if self.label_manifest is None else str(self.label_manifest.get("task"))

    @property
    def label_sets(self) -> list[str]:
        """Names (``<task>-<fp12>``) of every label entry of this store."""
        return [p.name for p in label_entries(self.path)]

    def require_labels(self) -> np.ndarray:
        """The labels, or one error naming the tasks whose labels the store holds."""
        if self.labels is None:
            raise LexpInputError(
                f"{self.path}: this store was opened without labels; it holds the labels of "
                f"{self.label_sets or 'no task'}. Open it with open_store(path, task=<task>)"
            )
        return self.labels

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def hidden(self) -> int:
        return int(self.manifest["hidden"])

    @property
    def n_rows(self) -> int:
        return int(self.activations.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.activations.shape[1])

    @property
    def n_sentences(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def dtype(self) -> np.dtype:
        return self.activations.dtype

    @property
    def label_vocab(self) -> list[str]:
        """Train label vocabulary of the task's labels (class id = index); ``[]`` for regression
        or when the store was opened without labels."""
        if self.label_manifest is None:
            return []
        return list(self.label_manifest.get("label_vocab", []))

    @property
    def layer_ids(self) -> list[int]:
        """The model's layer number of each column block (``model.layers``; all: 0..n_layers-1)."""
        ids = self.manifest.get("layer_ids")
        return list(range(self.n_layers)) if ids is None else [int(x) for x in ids]

    def layer_columns(self, layers: Iterable[int]) -> np.ndarray:
        """Column indices of the given model layers, in the order given (the layer stored in block j
        → j·hidden … (j+1)·hidden−1; block j = layer j unless the store keeps a subset)."""
        layers = [int(layer) for layer in layers]
        ids = self.layer_ids
        block = {layer: j for j, layer in enumerate(ids)}
        bad = [layer for layer in layers if layer not in block]
        if bad:
            held = f"0..{ids[-1]}" if ids == list(range(len(ids))) else str(ids)
            raise LexpInputError(
                f"{self.path}: layers {bad} are not in this store; it holds layers {held} (0 = embeddings)"
            )
        h = self.hidden
        if not layers:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.arange(block[layer] * h, (block[layer] + 1) * h, dtype=np.int64) for layer in layers]
        )

    def column_index(self, columns: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
        """Validated int64 neuron indices (``None`` = all columns); LexpInputError if out of range."""
        if columns is None:
            return None
        cols = np.asarray(columns)
        if cols.ndim != 1 or (cols.size and not np.issubdtype(cols.dtype, np.integer)):
            raise LexpInputError(f"{self.path}: columns must be a 1-D array of integer neuron indices")
        cols = cols.astype(np.int64, copy=False)
        if cols.size and (cols.min() < 0 or cols.max() >= self.n_neurons):
            raise LexpInputError(
                f"{self.path}: column indices must lie in [0, {self.n_neurons}); got min {cols.min()}, "
                f"max {cols.max()}"
            )
        return cols

    def iter_chunks(
        self,
        chunk_rows: int = 8192,
        columns: np.ndarray | Sequence[int] | None = None,
        dtype: npt.DTypeLike = np.float32,
    ) -> Iterator[np.ndarray]:
        """Yield consecutive row blocks ``(≤ chunk_rows, n_cols)`` as ``dtype`` (a streaming pass).

        Pages of a block are released from this process's mapping once the next block is
        requested, so a pass over a store larger than RAM keeps a resident set of about one chunk.
        A yielded array may be a read-only view when no cast or column selection was needed.
        """
        if chunk_rows < 1:
            raise LexpInputError(f"iter_chunks: chunk_rows must be ≥ 1, got {chunk_rows}")
        cols = self.column_index(columns)
        dtype = np.dtype(dtype)
        acts = self.activations
        for start in range(0, self.n_rows, chunk_rows):
            stop = min(start + chunk_rows, self.n_rows)
            block = acts[start:stop]
            if cols is not None:
                block = np.take(block, cols, axis=1)
            yield _as_float(np.asarray(block), dtype)
            _release_pages(acts, start, stop)

    def read_rows(
        self, idx: np.ndarray | Sequence[int] | slice, columns: np.ndarray | Sequence[int] | None = None
    ) -> np.ndarray:
        """A new float32 array ``(len(idx), n_cols)`` of the rows ``idx``, in the order of ``idx``.

        Rows are fetched in sorted order (memmap locality, one pass over the file) and put back in
        the requested order; only the requested rows are copied. A ``slice`` reads a contiguous
        block.
        """
        cols = self.column_index(columns)
        if isinstance(idx, slice):
            block = self.activations[idx]
            block = np.take(block, cols, axis=1) if cols is not None else np.asarray(block)
            out = _as_float(block, np.dtype(np.float32))
            return out if out.flags.writeable else out.copy()
        rows = np.asarray(idx)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise LexpInputError(
                f"{self.path}: read_rows needs a 1-D array of integer row indices or a slice"
            )
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise LexpInputError(
                f"{self.path}: row indices must lie in [0, {self.n_rows}); got min {rows.min()}, max {rows.max()}"
            )
        return _as_float(_gather(self.activations, rows, cols), np.dtype(np.float32))


def _gather(acts: np.ndarray, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """``acts[rows][:, cols]`` in the store dtype, reading rows in sorted order."""
    if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        block = np.take(acts, rows[order], axis=0)
        out = np.empty_like(block)
        out[order] = block
    else:
        out = np.take(acts, rows, axis=0)
    if cols is not None:
        out = np.take(out, cols, axis=1)
    return out


def _release_pages(arr: np.ndarray, start_row: int, stop_row: int) -> None:
    """Unmap the pages holding rows [start_row, stop_row) of a memmapped 2-D array (best effort).

    MADV_DONTNEED on a read-only shared file mapping only drops pages from this process's resident
    set: they stay in the page cache and are faulted back on access, so the data never changes.
    Without it a streaming pass would show the whole file in the process's RSS.
    """
    mm = getattr(arr, "_mmap", None)
    flag = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or flag is None or stop_row <= start_row or mm.closed:
        return
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    first = arr.ctypes.data - base + start_row * arr.strides[0]
    last = arr.ctypes.data - base + stop_row * arr.strides[0]
    page = mmap.PAGESIZE
    lo = -(-first // page) * page  # keep pages shared with neighbouring rows
    hi = last // page * page
    if hi > lo:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(flag, lo, hi - lo)


def _not_a_store(path: Path, what: str) -> LexpInputError:
    return LexpInputError(
        f"{path}: {what}. This is not a complete activation store; delete the directory and rerun "
        "(the store will be rebuilt from the data)."
    )


def _read_manifest(manifest_path: Path, what: str) -> dict[str, Any]:
    if not manifest_path.is_file():
        raise _not_a_store(manifest_path.parent, f"{MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _not_a_store(manifest_path, f"{what} manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise _not_a_store(manifest_path, f"{what} manifest does not say complete: true")
    if manifest.get("format_version") != STORE_FORMAT_VERSION:
        old = manifest.get("format_version")
        hint = (
            " (an older store with the labels inside; stores are now shared by the tasks over the same "
            "sentences and a run builds the new one in another directory, so this one is no longer used)"
            if isinstance(old, int) and old < STORE_FORMAT_VERSION
            else ""
        )
        raise _not_a_store(
            manifest_path,
            f"store format {old!r} is not the format {STORE_FORMAT_VERSION} this lexp {__version__} "
            f"reads{hint}",
        )
    return manifest


def _load_npy(file: Path, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _not_a_store(file, f"cannot be read as a .npy array ({exc})") from exc


def label_entries(path: Path | str) -> list[Path]:
    """The complete label entries (``labels/<task>-<fp12>/``) of a store, sorted by name."""
    folder = Path(path).expanduser() / LABELS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PARTIAL not in p.name)


def _label_entry_for(path: Path, task: str) -> Path:
    """The label entry of ``task`` (a task name, or an entry name ``<task>-<fp12>``)."""
    entries = label_entries(path)
    exact = [p for p in entries if p.name == task]
    if exact:
        return exact[0]
    slug = _slug("task", task)
    matches = [p for p in entries if p.name.rsplit("-", 1)[0] == slug]
    if len(matches) == 1:
        return matches[0]
    names = [p.name for p in entries]
    if not matches:
        raise LexpInputError(
            f"{path}: this store holds no labels of task {task!r} (it has {names or 'none'}); a run of "
            "that task adds them"
        )
    raise LexpInputError(
        f"{path}: this store holds {len(matches)} label sets of task {task!r} ({[p.name for p in matches]}); "
        "pass the one you mean as task=<name> (results.json's store_labels names a run's)"
    )


def _open_label_entry(entry: Path, rows: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``(labels, manifest)`` of one label entry, checked for shape and recorded keys."""
    manifest = _read_manifest(entry / MANIFEST, "label")
    labels = _load_npy(entry / LABELS)
    if labels.shape != (rows,) or manifest.get("rows") != rows:
        raise _not_a_store(
            entry / LABELS,
            f"shape {labels.shape} (manifest: {manifest.get('rows')!r} rows) does not match "
            f"the store's {rows} rows",
        )
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or not str(sums.get(LABELS, "")).startswith(f"{CHECKSUM_ALGORITHM}:"):
        raise _not_a_store(
            entry / MANIFEST, f"label manifest lacks the {CHECKSUM_ALGORITHM} checksum of {LABELS}"
        )
    return labels, manifest


def _with_labels(store: Store, entry: Path) -> Store:
    labels, manifest = _open_label_entry(entry, store.n_rows)
    return dataclasses.replace(store, labels=labels, label_manifest=manifest, label_path=entry)


def open_store(path: Path | str, task: str | None = None, *, labels: bool = True) -> Store:
    """Open a complete store read-only; raise LexpInputError saying what to do if it is not one.

    ``task``: whose labels ``.labels`` / ``.label_vocab`` hold (a task name, or a label entry name
    ``<task>-<fp12>`` as results.json's ``store_labels`` records it). Without ``task``, a store with
    one label entry opens with it, a store with several (or none) opens without labels.
    ``labels=False``: activations and offsets only.
    """
    path = Path(path).expanduser()
    if _PARTIAL in path.name:
        raise LexpInputError(
            f"{path}: this is an interrupted (partial) store write, never a complete store; delete it and "
            "rerun to rebuild"
        )
    if not path.is_dir():
        raise LexpInputError(
            f"{path}: no activation store here (not a directory); rerun the extraction or check the path"
        )
    manifest_path = path / MANIFEST
    manifest = _read_manifest(manifest_path, "store")
    missing = [k for k in ("rows", "n_layers", "hidden", "dtype") if k not in manifest]
    if missing:
        raise _not_a_store(manifest_path, f"manifest lacks {missing}")
    rows, n_layers, hidden = int(manifest["rows"]), int(manifest["n_layers"]), int(manifest["hidden"])

    acts = _load_npy(path / ACTIVATIONS, "r")
    if acts.shape != (rows, n_layers * hidden) or acts.dtype != _DTYPES.get(manifest["dtype"]):
        raise _not_a_store(
            path / ACTIVATIONS,
            f"shape {acts.shape} {acts.dtype} does not match the manifest's {rows} × {n_layers}·{hidden} "
            f"{manifest['dtype']}",
        )
    offsets = _load_npy(path / OFFSETS)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != rows:
        raise _not_a_store(path / OFFSETS, f"offsets must run from 0 to {rows}")
    _check_integrity_keys(path, manifest)
    store = Store(path=path, activations=acts, labels=None, offsets=offsets, manifest=manifest)
    if not labels:
        return store
    if task is not None:
        return _with_labels(store, _label_entry_for(path, str(task)))
    entries = label_entries(path)
    return _with_labels(store, entries[0]) if len(entries) == 1 else store


def _check_integrity_keys(path: Path, manifest: Mapping[str, Any]) -> None:
    """The cheap half of the integrity check (no file is read): checksums recorded, size unchanged."""
    manifest_path = path / MANIFEST
    sums = manifest.get("checksums")
    prefix = f"{CHECKSUM_ALGORITHM}:"
    if not isinstance(sums, dict) or not all(
        isinstance(sums.get(name), str) and sums[name].startswith(prefix) for name in _NPY_FILES
    ):
        raise _not_a_store(
            manifest_path, f"manifest lacks the {CHECKSUM_ALGORITHM} checksums of {list(_NPY_FILES)}"
        )
    recorded = manifest.get("activations_bytes")
    size = (path / ACTIVATIONS).stat().st_size
    if not isinstance(recorded, int) or recorded != size:
        raise _not_a_store(
            path / ACTIVATIONS,
            f"the file is {size:,} bytes, the manifest recorded {recorded!r} when the store was written "
            "(truncated, extended or replaced since)",
        )
    non_finite = manifest.get("non_finite")
    if not isinstance(non_finite, int) or non_finite != 0:
        raise _not_a_store(
            manifest_path,
            f"the manifest records {non_finite!r} non-finite activations (expected 0: NaN/inf are never stored)",
        )


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """xxh3-128 of the manifest's canonical JSON without its own ``manifest_checksum`` key: any edit
    of a recorded fact (``n_layers``, ``hidden``, ``fingerprint``, ``label_vocab`` ...) changes it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    text = _canonical_json(body, "store manifest")
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128_hexdigest(text.encode('utf-8'))}"


def _file_stat(file: Path) -> dict[str, int]:
    st = file.stat()
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def load_store(
    path: Path | str, task: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Notebook shortcut: ``(activations memmap, labels of task, manifest)`` of a complete store
    (the manifest with the label entry's keys ``task`` and ``label_vocab`` merged in)."""
    store = open_store(path, task)
    meta = dict(store.manifest)
    if store.label_manifest is not None:
        meta.update(task=store.task, label_vocab=store.label_vocab)
    return store.activations, store.labels, meta


# ---------------------------------------------------------------------------------------- integrity
#: float dtype → (same-size unsigned int, exponent mask): a value is NaN or inf iff all its exponent
#: bits are set. Counting on the bits is ~6x faster than np.isfinite on float16 (scalar in numpy).
_EXPONENT_BITS = {
    np.dtype(np.float16): (np.dtype(np.uint16), 0x7C00),
    np.dtype(np.float32): (np.dtype(np.uint32), 0x7F800000),
}


def _scan(file: Path, data_offset: int = 0, dtype: np.dtype | None = None) -> tuple[str, int]:
    """``("xxh3_128:<hex>", non-finite count)`` of ``file`` in one streaming pass over a read-only map.

    The checksum covers every byte (the .npy header included). Values are counted only when
    ``dtype`` is given, from ``data_offset`` on. Pages are dropped from this process's mapping block
    by block (see ``_release_pages``), so a 6 GB store keeps a resident set of one block.
    Measured on 150,000 × 2,688 float16 (806 MB, 2-core VM): 0.23-0.45 s from the page cache (as
    in ``finish``, right after the rows were written), 0.66 s after dropping the file's cache;
    extracting those rows takes minutes.
    """
    h = xxhash.xxh3_128()
    non_finite = 0
    uint, mask = _EXPONENT_BITS[np.dtype(dtype)] if dtype is not None else (None, 0)
    with open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}", 0
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            flag = getattr(mmap, "MADV_DONTNEED", None)
            scratch = None
            for start in range(0, size, _SCAN_BLOCK):
                stop = min(start + _SCAN_BLOCK, size)
                with memoryview(mm)[start:stop] as block:
                    h.update(block)
                    lo = max(start, data_offset)
                    if uint is not None and stop > lo:
                        n = (stop - lo) // uint.itemsize
                        bits = np.frombuffer(block, dtype=uint, count=n, offset=lo - start)
                        if scratch is None:
                            scratch = np.empty(_SCAN_BLOCK // uint.itemsize, dtype=uint)
                        exp = np.bitwise_and(bits, mask, out=scratch[:n])
                        non_finite += int(np.count_nonzero(exp == mask))
                        del bits, exp
                if flag is not None:
                    with contextlib.suppress(OSError, ValueError):
                        mm.madvise(flag, start, stop - start)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}", non_finite


@dataclass(frozen=True)
class StoreVerification:
    """What :func:`verify_store` found: ``ok`` is True only when every checksum matches and the
    activations hold no NaN/inf. ``problems`` says what is wrong, one sentence each."""

    path: Path
    ok: bool
    problems: tuple[str, ...]
    non_finite: int | None  # None: the store could not be opened, nothing was counted
    nbytes: int
    seconds: float
    rehashed: tuple[str, ...] = ()  # the files whose content was re-hashed

    def message(self) -> str:
        """One line for a person: ``ok <path> …`` or ``FAILED <path>: <problems>; <fix>``."""
        if self.ok:
            return f"ok      {self.path} ({self.nbytes / 1e6:,.1f} MB checked in {self.seconds:.2f} s)"
        return (
            f"FAILED  {self.path}: {' '.join(self.problems)} Delete this store directory and rerun; "
            "lexp rebuilds it from the data."
        )


def verify_store(path: Path | str, *, full: bool = True) -> StoreVerification:
    """Check a store by the one integrity rule that reuse applies too (:func:`check_integrity`).

    ``full=True`` (``python -m lexp.verify``) re-hashes every ``.npy`` file and counts the NaN/inf
    values in the activations (one streaming pass, 0.3-0.8 s per GB measured here); ``full=False``
    (what a run does before reusing a store) re-hashes only files whose size or mtime changed.
    Never raises for a bad store: the reason is in ``problems``.
    """
    path = Path(path).expanduser()
    began = time.perf_counter()
    try:
        store = open_store(path, labels=False)
    except LexpInputError as exc:
        return StoreVerification(path, False, (str(exc),), None, 0, time.perf_counter() - began)
    return check_integrity(store, full=full, all_labels=True, began=began)


def check_integrity(
    store: Store, *, full: bool, all_labels: bool | None = None, began: float | None = None
) -> StoreVerification:
    """The integrity rule of an opened store, shared by reuse and ``lexp.verify``:

    - its directory name ends in the manifest's fingerprint (a renamed or copied-in store is refused);
    - the manifest's own checksum matches (an edited ``n_layers``, ``hidden`` or ``fingerprint``);
    - every ``.npy`` file has the size recorded when it was written, and the mtime; a file whose
      mtime differs (edited in place, or copied without ``cp -p``) is re-hashed against its recorded
      checksum (``full``: every file is, and the activations are scanned for NaN/inf);
    - the same for the label entry the store was opened with (``all_labels``, default ``full``: for
      every label entry), whose manifest must also name this store's fingerprint.

    On an unchanged store this costs a ``stat`` per file and one hash of each manifest's text.
    """
    began = time.perf_counter() if began is None else began
    path, manifest = store.path, store.manifest
    problems: list[str] = []
    try:
        _check_fingerprint(store)
    except LexpInputError as exc:
        problems.append(str(exc).removeprefix(f"{path}: "))
    recorded_sum = manifest.get("manifest_checksum")
    if recorded_sum != manifest_checksum(manifest):
        problems.append(
            f"{MANIFEST} does not match its own checksum (recorded {recorded_sum!r}): the manifest was "
            "edited after the store was written, so its facts (layers, width, fingerprint) cannot "
            "be trusted."
        )
    rehashed: list[str] = []
    nbytes, non_finite = _check_files(store, path, manifest, _NPY_FILES, full, problems, rehashed, "")
    if full if all_labels is None else all_labels:
        entries = label_entries(path)
    else:
        entries = [store.label_path] if store.label_path is not None else []
    for entry in entries:
        nbytes += _check_label_entry(store, entry, full, problems, rehashed)
    if non_finite:
        problems.append(
            f"{ACTIVATIONS} holds {non_finite:,} non-finite values (NaN/inf) that were not there when it "
            "was written."
        )
    seconds = time.perf_counter() - began
    return StoreVerification(
        path, not problems, tuple(problems), non_finite, nbytes, seconds, tuple(rehashed)
    )


def _check_label_entry(
    store: Store, entry: Path, full: bool, problems: list[str], rehashed: list[str]
) -> int:
    """The integrity rule for one label entry (see check_integrity); returns the bytes it holds."""
    prefix = f"{LABELS_DIR}/{entry.name}/"
    try:
        _, manifest = _open_label_entry(entry, store.n_rows)
    except LexpInputError as exc:
        problems.append(f"{prefix}: {str(exc).removeprefix(f'{entry}: ')}")
        return 0
    fp = str(manifest.get("fingerprint", ""))
    match = re.search(r"-([0-9a-f]{12})$", entry.name)
    if match is None or not fp.startswith(match.group(1)):
        problems.append(
            f"{prefix}: the label manifest's fingerprint {fp[:12] or '(none)'} does not match the directory "
            "name; the label entry was renamed or copied."
        )
    recorded_sum = manifest.get("manifest_checksum")
    if recorded_sum != manifest_checksum(manifest):
        problems.append(
            f"{prefix}{MANIFEST} does not match its own checksum (recorded {recorded_sum!r}): the label "
            "manifest was edited after it was written (task, label vocabulary or fingerprint)."
        )
    if manifest.get("store_fingerprint") != store.manifest.get("fingerprint"):
        problems.append(
            f"{prefix}: these labels were written for the store {str(manifest.get('store_fingerprint'))[:12]!r}, "
            f"not this one ({str(store.manifest.get('fingerprint'))[:12]!r}); they were copied in by hand."
        )
    nbytes, _ = _check_files(store, entry, manifest, (LABELS,), full, problems, rehashed, prefix)
    return nbytes


def _check_files(
    store: Store,
    folder: Path,
    manifest: Mapping[str, Any],
    names: Sequence[str],
    full: bool,
    problems: list[str],
    rehashed: list[str],
    prefix: str,
) -> tuple[int, int | None]:
    """Size, mtime and (when changed, or ``full``) checksum of ``names`` in ``folder`` against
    ``manifest``; appends to ``problems``/``rehashed``; returns (bytes, non-finite activations)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        files = {}
    sums = manifest.get("checksums")
    if not isinstance(sums, dict):
        sums = {}
    nbytes, non_finite = 0, 0
    for name in names:
        file = folder / name
        shown = f"{prefix}{name}"
        st = file.stat()
        nbytes += st.st_size
        rec = files.get(name)
        if not isinstance(rec, dict) or rec.get("bytes") != st.st_size:
            problems.append(
                f"{shown} is {st.st_size:,} bytes, the manifest recorded "
                f"{rec.get('bytes') if isinstance(rec, dict) else None!r} when the store was written "
                "(replaced, truncated or extended since)."
            )
            continue
        if not full and rec.get("mtime_ns") == st.st_mtime_ns:
            continue
        if not full:
            log.warning(
                "%s: %s was modified after the store was written (its mtime changed); verifying its "
                "content before reuse (copy stores with `cp -p` to keep the mtime and skip this)",
                store.path,
                shown,
            )
        rehashed.append(shown)
        if name == ACTIVATIONS:
            actual, non_finite = _scan(file, int(store.activations.offset), store.dtype)
        else:
            actual, _ = _scan(file)
        expected = sums.get(name)
        if actual != expected:
            problems.append(
                f"{shown} does not match the checksum recorded when the store was written "
                f"(recorded {expected}, now {actual}): the file changed on disk since."
            )
    return nbytes, non_finite


class StoreSpaceError(LexpInputError):
    """The disk cannot hold a store: raised before extraction starts (or when a write hits ENOSPC)."""


def store_nbytes(n_rows: int, n_layers: int, hidden: int, dtype: str = "float16") -> int:
    """Disk space a store of this shape needs (a slight upper bound: .npy headers and manifest)."""
    n_rows, n_neurons = int(n_rows), int(n_layers) * int(hidden)
    item = _DTYPES[str(dtype)].itemsize
    header = 4096  # a .npy header is 128 bytes here; a page covers any shape
    return n_rows * n_neurons * item + 2 * ((n_rows + 1) * 8) + 3 * header + _SPACE_SLACK


def _free_bytes(directory: Path) -> int:
    """Bytes this process may still allocate on ``directory``'s file system (root may use the reserve)."""
    st = os.statvfs(directory)
    return int(st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail))


def _space_error(
    path: Path, needed: int, free: int | None = None, exc: OSError | None = None
) -> StoreSpaceError:
    """One clear message: where, how much is needed, how much is free, what to do."""
    where = path.parent
    if free is None:
        with contextlib.suppress(OSError):
            free = _free_bytes(where)
    free_text = (
        f"{free:,} bytes ({free / 1e6:,.1f} MB) are free" if free is not None else "free space unknown"
    )
    cause = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return StoreSpaceError(
        f"{path}: not enough disk space for this activation store{cause}: it needs {needed:,} bytes "
        f"({needed / 1e6:,.1f} MB), {free_text} on the file system of {where}. Nothing was written. "
        "Free space there, or point the cache at a larger disk (LEXP_CACHE=<dir> or cache_dir=<dir>), "
        "then rerun."
    )


def require_free_space(path: Path | str, nbytes: int) -> None:
    """Raise :class:`StoreSpaceError` unless ``path``'s file system has ``nbytes`` free.

    For a run that will build several stores: call it once with the sum of their
    :func:`store_nbytes` (``path`` = the first store's directory, which need not exist yet) to fail
    before the first extraction, not after the train split. ``StoreWriter`` still checks and
    reserves each store itself.
    """
    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = _free_bytes(existing)
    if free < nbytes:
        raise _space_error(path, int(nbytes), free)


def _is_space_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _reserve(file: Path, data_offset: int) -> None:
    """Allocate every block of ``file`` now, so writes through its memory map cannot hit a full disk.

    A memory-mapped write to a sparse file that finds no free block is a SIGBUS (a bare ``Bus
    error``), not an exception. ``posix_fallocate`` reserves the blocks without writing them (2 ms
    for 806 MB on ext4); where the file system refuses it, zeros are written instead (0.3-3 s for
    806 MB here). Copy-on-write file systems (btrfs, ZFS) and NFS may still fail later.
    """
    fd = os.open(file, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(fd, 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        zeros = bytes(8 << 20)
        offset = data_offset
        while offset < size:
            offset += os.pwrite(fd, zeros[: min(len(zeros), size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- the writer
def _remove_stale_partials(path: Path) -> None:
    """Delete ``<path>.partial-<pid>`` dirs left by processes that no longer run (or by this one)."""
    remove_partials(path, only_dead=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _row_ranges(mask: np.ndarray, limit: int = 5) -> str:
    """'3-7, 12, …' for the True entries of a boolean mask (for error messages)."""
    idx = np.flatnonzero(mask)
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], idx[-1:]])
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts[:limit], ends[:limit], strict=True)]
    return ", ".join(parts) + (", …" if len(starts) > limit else "")


def _peak(rows: np.ndarray) -> float:
    """max |x| (NaN if any value is NaN): torch's one-pass aminmax, ~3x faster than numpy's abs + max."""
    if rows.dtype not in (np.float32, np.float64):
        return float(np.max(np.abs(rows)))
    import torch

    low, high = torch.aminmax(torch.from_numpy(np.ascontiguousarray(rows)))
    return float(max(-float(low), float(high))) if not (low.isnan() or high.isnan()) else float("nan")


class StoreWriter:
    """Write a store into ``<path>.partial-<pid>/``; ``finish()`` renames it to ``path`` atomically.

    ``write_rows`` may come in any order (extraction yields length-sorted batches); every row must
    be written exactly once before ``finish``. If the ``with`` block raises, the partial directory
    is deleted and nothing appears at ``path``. ``write_rows`` and ``finish`` may be called from
    another thread than the one that entered the ``with`` block (calls are serialised by a lock).

    Entering the block checks the free space and reserves the activation file's blocks (see
    ``_reserve``): a disk that cannot hold the store raises :class:`StoreSpaceError` before the
    first row is extracted, leaving nothing behind. ``finish`` adds the keys ``checksums``,
    ``activations_bytes``, ``activations_mtime_ns`` and ``non_finite`` to the manifest.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        n_rows: int,
        n_layers: int,
        hidden: int,
        dtype: str = "float16",
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if str(dtype) not in _DTYPES:
            raise LexpInputError(f"store.dtype={dtype!r} is not supported; use float16 or float32")
        if n_rows < 0 or n_layers < 1 or hidden < 1:
            raise LexpInputError(
                f"StoreWriter: need n_rows ≥ 0, n_layers ≥ 1, hidden ≥ 1; got {n_rows}, {n_layers}, {hidden}"
            )
        self.path = Path(path).expanduser()
        self.n_rows, self.n_layers, self.hidden = int(n_rows), int(n_layers), int(hidden)
        self.n_neurons = self.n_layers * self.hidden
        self.dtype = _DTYPES[str(dtype)]
        self.manifest = dict(manifest or {})
        own = {
            "rows": self.n_rows,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "dtype": str(dtype),
            "format_version": STORE_FORMAT_VERSION,
            "lexp_version": __version__,
            "complete": True,
        }
        clash = [
            k for k in _WRITER_KEYS if k in self.manifest and (k not in own or self.manifest[k] != own[k])
        ]
        if clash:
            raise LexpInputError(
                f"StoreWriter: manifest keys {clash} are set by the writer; do not pass them"
            )
        ids = self.manifest.get("layer_ids")  # model.layers: the model's number of each block
        if ids is not None and (len(ids) != self.n_layers or sorted(set(ids)) != list(ids)):
            raise LexpInputError(
                f"StoreWriter: layer_ids={ids!r} must be {self.n_layers} increasing layer numbers"
            )
        self.manifest.update(own)
        self.partial = self.path.with_name(f"{self.path.name}{_PARTIAL}{os.getpid()}")
        #: disk space the store needs (checked and, for activations.npy, reserved on entering)
        self.nbytes = store_nbytes(self.n_rows, self.n_layers, self.hidden, str(dtype))
        self._acts: np.memmap | None = None  # header and offset only: rows go in with pwrite
        self._fd: int | None = None
        self._bit_buffers: tuple[np.ndarray, np.ndarray] | None = None  # see _float16_nonfinite
        self._written = np.zeros(self.n_rows, dtype=bool)
        self._finished = False
        self._lock = threading.Lock()

    def __enter__(self) -> StoreWriter:
        if self.path.exists():
            raise LexpInputError(
                f"{self.path}: a store already exists here; open it with open_store/ensure_store, or delete it "
                "to rebuild"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if _is_space_error(exc):
                raise self._space_error(exc) from exc
            raise
        _remove_stale_partials(self.path)
        free = _free_bytes(self.path.parent)
        if free < self.nbytes:  # fail before creating anything: nothing to clean up, rerun is clean
            raise self._space_error(None, free)
        self.partial.mkdir()
        try:
            self._acts = np.lib.format.open_memmap(
                self.partial / ACTIVATIONS, mode="w+", dtype=self.dtype, shape=(self.n_rows, self.n_neurons)
            )
            _reserve(self.partial / ACTIVATIONS, int(self._acts.offset))
            self._fd = os.open(self.partial / ACTIVATIONS, os.O_WRONLY)
        except BaseException as exc:
            self._close()
            shutil.rmtree(self.partial, ignore_errors=True)
            if _is_space_error(exc):
                raise self._space_error(exc) from exc
            raise
        return self

    def _space_error(self, exc: OSError | None, free: int | None = None) -> StoreSpaceError:
        return _space_error(self.path, self.nbytes, free, exc)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._finished:
            return
        with self._lock:  # a writer thread's current write_rows ends before the mapping goes
            self._close()
            shutil.rmtree(self.partial, ignore_errors=True)
        if exc_type is None:
            raise RuntimeError(
                f"StoreWriter({self.path}): the with block ended without finish(); nothing was stored"
            )

    def _close(self) -> None:
        """Drop the writable mapping (numpy closes it when the last reference goes) and the row fd."""
        self._acts = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write_rows(self, row_offset: int, array: np.ndarray) -> None:
        """Store ``array`` (rows × n_neurons, or one row) at rows ``row_offset …``, cast to the store dtype.

        Rows holding NaN or inf are refused (LexpInputError), so a finished store never holds one.
        """
        with self._lock:
            self._write_rows(row_offset, array)

    def _write_rows(self, row_offset: int, array: np.ndarray) -> None:
        if self._acts is None:
            raise RuntimeError("StoreWriter.write_rows outside the with block (or after finish)")
        rows = np.asarray(array)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != self.n_neurons:
            raise LexpInputError(
                f"{self.path}: rows have shape {np.shape(array)}, the store holds {self.n_layers} layers × "
                f"{self.hidden} = {self.n_neurons} columns"
            )
        start, stop = int(row_offset), int(row_offset) + rows.shape[0]
        if start < 0 or stop > self.n_rows:
            raise LexpInputError(
                f"{self.path}: rows {start}..{stop - 1} lie outside the store's {self.n_rows} rows"
            )
        if rows.size and rows.dtype == np.float16:
            # float16 rows (cast on the extraction device): an all-ones exponent is inf or NaN. Bit
            # tests on the raw uint16 are ~10x faster than numpy's emulated float16 arithmetic.
            if rows.flags.c_contiguous and self._float16_nonfinite(rows):
                raise LexpInputError(
                    f"{self.path}: activation rows {start}..{stop - 1} contain NaN or inf as float16 — either "
                    "the model produced non-finite values, or an activation beyond the float16 range "
                    "(±65504) was rounded to inf; rerun with store.dtype=float32, or check the model"
                )
        if rows.size and (rows.dtype != np.float16 or not rows.flags.c_contiguous):
            peak = _peak(rows)
            if not np.isfinite(peak):
                raise LexpInputError(
                    f"{self.path}: activation rows {start}..{stop - 1} contain NaN or inf; the model produced "
                    "non-finite values (check the model weights and dtype)"
                )
            if self.dtype == np.float16 and peak >= _FLOAT16_LIMIT:
                raise LexpInputError(
                    f"{self.path}: an activation of magnitude {peak:.6g} in rows {start}..{stop - 1} is beyond "
                    f"the float16 range (±65504) and would be stored as inf; rerun with store.dtype=float32"
                )
        if self._written[start:stop].any():
            again = np.zeros(self.n_rows, dtype=bool)
            again[start:stop] = self._written[start:stop]
            raise LexpInputError(
                f"{self.path}: rows {_row_ranges(again)} were written twice; each row must be written once "
                "(duplicate sentence index from the extractor?)"
            )
        self._pwrite(start, rows)
        self._written[start:stop] = True

    def _float16_nonfinite(self, rows: np.ndarray) -> bool:
        """Whether float16 ``rows`` hold inf or NaN (all-ones exponent), tested on the raw bits in
        blocks of 256 rows through two reused buffers: whole-batch temporaries (82 MB at BERT-base)
        cost 0.03-0.4 s of page faults each; the blocks stay in cache."""
        bits = rows.view(np.uint16).reshape(rows.shape[0], -1)
        block = 256
        if self._bit_buffers is None:
            self._bit_buffers = (
                np.empty((block, bits.shape[1]), dtype=np.uint16),
                np.empty((block, bits.shape[1]), dtype=bool),
            )
        masked, hit = self._bit_buffers
        for r0 in range(0, bits.shape[0], block):
            part = bits[r0 : r0 + block]
            m, h = masked[: len(part)], hit[: len(part)]
            np.bitwise_and(part, 0x7C00, out=m)
            if np.equal(m, 0x7C00, out=h).any():
                return True
        return False

    def _pwrite(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start…`` written with ``pwrite`` at their place in the .npy file, in the store dtype.

        Why not the memory map: assigning into fresh pages of a mapping page-faults once per 4 KiB,
        measured 0.13 s per 4,096 × 9,984 float16 rows here against 0.013 s for one ``pwrite`` of
        the same bytes; the cast float32 → float16 goes through torch (several times faster than
        numpy's, and the same IEEE round-to-nearest-even bits).
        """
        if rows.dtype != self.dtype:
            if rows.dtype == np.float32 and self.dtype == np.float16:
                import torch

                rows = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.float16).numpy()
            else:
                rows = rows.astype(self.dtype)
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        position = int(self._acts.offset) + start * self.n_neurons * self.dtype.itemsize
        try:
            while data:
                n = os.pwrite(self._fd, data, position)
                data, position = data[n:], position + n
        except OSError as exc:
            if _is_space_error(exc):
                raise self._space_error(exc) from exc
            raise

    def finish(
        self,
        labels: np.ndarray | Sequence[int] | Sequence[float] | None = None,
        offsets: np.ndarray | Sequence[int] | None = None,
        extra_manifest: Mapping[str, Any] | None = None,
        *,
        task: str | None = None,
        label_vocab: Sequence[str] | None = None,
    ) -> Path:
        """Check completeness, write offsets/manifest (and ``labels`` as the label entry of ``task``),
        fsync, rename into place; return ``path``.

        ``offsets`` defaults to one row per sentence (sentence classification: one [CLS] row each).
        ``task`` / ``label_vocab`` default to the ``task`` / ``label_vocab`` keys of the writer's
        manifest, which belong to the label entry and are moved there (``task`` default: "labels").
        ``labels=None`` writes no label entry (a run adds its task's with :func:`ensure_labels`).
        A full disk while writing the remaining files raises :class:`StoreSpaceError`.
        """
        with self._lock:
            return self._finish(labels, offsets, extra_manifest, task, label_vocab)

    def _finish(
        self,
        labels: Any,
        offsets: Any,
        extra_manifest: Mapping[str, Any] | None,
        task: str | None = None,
        label_vocab: Sequence[str] | None = None,
    ) -> Path:
        if self._acts is None:
            raise RuntimeError("StoreWriter.finish outside the with block (or called twice)")
        if not self._written.all():
            raise LexpInputError(
                f"{self.path}: {int((~self._written).sum())} of {self.n_rows} rows were never written "
                f"(rows {_row_ranges(~self._written)}); the extraction missed sentences"
            )
        if labels is not None:
            labels = _check_label_values(labels, self.n_rows, self.path)
        offsets = self._check_offsets(offsets)
        manifest = dict(self.manifest)
        task = str(task if task is not None else manifest.get("task", "labels"))
        label_vocab = list(label_vocab if label_vocab is not None else manifest.get("label_vocab", []))
        manifest.pop("task", None)
        manifest.pop("label_vocab", None)
        if extra_manifest:
            clash = [
                k
                for k in _WRITER_KEYS
                if k in extra_manifest and (k not in manifest or extra_manifest[k] != manifest[k])
            ]
            if clash:
                raise LexpInputError(f"StoreWriter.finish: manifest keys {clash} are set by the writer")
            manifest.update(extra_manifest)
        manifest["n_sentences"] = int(len(offsets) - 1)
        manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        _canonical_json(manifest, f"{self.path} manifest")  # fail on bad settings before the hashing

        data_offset = int(self._acts.offset)
        try:
            self._acts.flush()
            self._close()
            _fsync_path(self.partial / ACTIVATIONS)
            _save_npy(self.partial / OFFSETS, offsets)
            # The checksum is taken from the files as written (page cache), after the last write;
            # the non-finite count is measured by the same pass that verify_store runs, not assumed.
            checksums = {}
            for name in _NPY_FILES:
                file = self.partial / name
                if name == ACTIVATIONS:
                    checksums[name], manifest["non_finite"] = _scan(file, data_offset, self.dtype)
                else:
                    checksums[name], _ = _scan(file)
            if manifest["non_finite"]:
                raise LexpInputError(
                    f"{self.path}: {manifest['non_finite']:,} activations are NaN or inf although every row "
                    "was checked when written; the file was changed while the store was being written"
                )
            st = (self.partial / ACTIVATIONS).stat()
            manifest["checksums"] = checksums
            manifest["activations_bytes"] = int(st.st_size)
            manifest["activations_mtime_ns"] = int(st.st_mtime_ns)
            manifest["files"] = {name: _file_stat(self.partial / name) for name in _NPY_FILES}
            manifest["manifest_checksum"] = manifest_checksum(manifest)
            text = _canonical_json(manifest, f"{self.path} manifest")
            pretty = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
            with open(self.partial / MANIFEST, "w", encoding="utf-8") as fh:
                fh.write(pretty + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if labels is not None:
                folder = self.partial / LABELS_DIR
                folder.mkdir()
                fp = label_fingerprint(task, labels, label_vocab)
                entry = folder / f"{_slug('task', task)}-{fp[:12]}"
                entry.mkdir()
                _write_label_entry(
                    entry, task=task, labels=labels, label_vocab=label_vocab, fp=fp, store_manifest=manifest
                )
                _fsync_path(folder)
            _fsync_path(self.partial)
        except OSError as exc:
            if _is_space_error(exc):
                raise self._space_error(exc) from exc
            raise
        try:
            os.rename(self.partial, self.path)
        except OSError as exc:
            shutil.rmtree(self.partial, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise LexpInputError(
                    f"{self.path}: another process finished this store first; use ensure_store to share it"
                ) from exc
            raise
        _fsync_path(self.path.parent)
        self._finished = True
        return self.path

    def _check_offsets(self, offsets: Any) -> np.ndarray:
        if offsets is None:
            return np.arange(self.n_rows + 1, dtype=np.int64)
        off = np.asarray(offsets)
        if (
            off.ndim != 1
            or len(off) < 1
            or not np.issubdtype(off.dtype, np.integer)
            or off[0] != 0
            or off[-1] != self.n_rows
            or np.any(np.diff(off) < 0)
        ):
            raise LexpInputError(
                f"{self.path}: sentence offsets must be non-decreasing integers from 0 to {self.n_rows}"
            )
        return off.astype(np.int64)


# ------------------------------------------------------------------------------------------ reuse
def _check_fingerprint(store: Store) -> None:
    """A store's directory name ends in fp[:12]; a mismatch means it was renamed or copied by hand."""
    match = re.search(r"-([0-9a-f]{12})$", store.path.name)
    if match is None:
        return
    fp = str(store.manifest.get("fingerprint", ""))
    if not fp.startswith(match.group(1)):
        raise LexpInputError(
            f"{store.path}: the manifest's fingerprint {fp[:12] or '(none)'} does not match the directory name "
            f"({match.group(1)}); the directory was renamed or copied. Delete it and rerun."
        )


def _check_unchanged(store: Store) -> None:
    """Before reuse: :func:`check_integrity` without the full re-hash (``lexp.verify`` applies the
    same rule with every file re-hashed). A file whose mtime changed is re-hashed; a mismatch, a
    changed size or an edited manifest refuses the store with one error naming it."""
    report = check_integrity(store, full=False)
    if not report.ok:
        raise LexpInputError(report.message().removeprefix("FAILED").strip())
    if report.rehashed:
        log.info("%s: content verified against its checksums in %.1f s", store.path, report.seconds)


def ensure_store(
    path: Path | str, build: Callable[[Path], None], *, labels: bool = True
) -> tuple[Store, bool]:
    """Open the complete store at ``path`` (reused=True), or call ``build(path)`` first (reused=False).

    ``labels=False`` opens the activations only (a run then adds or opens its task's labels with
    :func:`ensure_labels`); otherwise a store with one label entry opens with it (see open_store).

    ``build`` writes the store with ``StoreWriter(path, ...)``. Jobs wanting the same store agree
    through :func:`lexp.locks.ensure_entry` (an ``flock`` on ``<path>.lock``): any number of
    concurrent jobs (a joblib or SLURM sweep) extract once, the others wait and reuse the store, and
    partial writes of killed builders are removed first. A reused store whose activation file
    changed since it was written is verified first (see ``_check_unchanged``).
    """
    path = Path(path).expanduser()
    built = False

    def make(target: Path) -> None:
        nonlocal built
        remove_partials(target, only_dead=True)  # partials of killed builders (a live pid keeps its own)
        build(target)
        if not target.exists():
            raise RuntimeError(f"ensure_store: build({target}) returned without writing a store there")
        built = True

    def load(target: Path) -> Store:
        store = open_store(target, labels=labels)
        if built:
            _check_fingerprint(store)
        else:
            _check_unchanged(store)  # includes the fingerprint
        return store

    if path.exists():  # complete by construction (rename is atomic) and never deleted by lexp
        return load(path), True
    return ensure_entry(path, ready=Path.exists, build=make, load=load)


# ------------------------------------------------------------------------------------------ labels
def _check_label_values(labels: Any, n_rows: int, where: Path) -> np.ndarray:
    """int64 class ids ≥ 0 or finite float32 targets, one per row; else one LexpInputError."""
    y = np.asarray(labels)
    if y.shape != (n_rows,):
        raise LexpInputError(f"{where}: {y.shape[0] if y.ndim else 0} labels for {n_rows} rows")
    if np.issubdtype(y.dtype, np.integer) or (y.dtype == bool):
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            raise LexpInputError(f"{where}: class ids must be ≥ 0, got {y.min()}")
        return y
    if np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float32)
        if not np.isfinite(y).all():
            raise LexpInputError(f"{where}: regression targets contain NaN or inf")
        return y
    raise LexpInputError(f"{where}: labels must be integer class ids or float targets, got {y.dtype}")


def label_fingerprint(task: str, labels: np.ndarray, label_vocab: Sequence[str]) -> str:
    """sha256 (hex) of a label entry's content: task name, vocabulary, dtype and label values. The
    entry is named by it, so labels that changed (an edited data file) get a new entry, never a
    stale one."""
    h = hashlib.sha256()
    header = {"labels_format": STORE_FORMAT_VERSION, "task": str(task), "label_vocab": list(label_vocab)}
    h.update(_canonical_json(header, "label settings").encode("utf-8"))
    y = np.ascontiguousarray(labels)
    h.update(f"\0{y.dtype.str}\0{y.shape[0]}\0".encode())
    h.update(memoryview(y).cast("B"))
    return h.hexdigest()


def _write_label_entry(
    entry: Path,
    *,
    task: str,
    labels: np.ndarray,
    label_vocab: Sequence[str],
    fp: str,
    store_manifest: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``labels.npy`` and its manifest (checksum, size, mtime, own checksum) into ``entry``."""
    _save_npy(entry / LABELS, labels)
    checksum, _ = _scan(entry / LABELS)
    manifest: dict[str, Any] = dict(extra or {})
    manifest.update(
        {
            "task": str(task),
            "split": store_manifest.get("split"),
            "label_vocab": list(label_vocab),
            "rows": int(labels.shape[0]),
            "dtype": str(labels.dtype),
            "fingerprint": fp,
            "store_fingerprint": store_manifest.get("fingerprint"),
            "format_version": STORE_FORMAT_VERSION,
            "lexp_version": __version__,
            "complete": True,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "checksums": {LABELS: checksum},
            "files": {LABELS: _file_stat(entry / LABELS)},
        }
    )
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    text = _canonical_json(manifest, f"{entry} manifest")
    with open(entry / MANIFEST, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(entry)


def ensure_labels(
    store: Store,
    task: str,
    labels: np.ndarray | Sequence[int] | Sequence[float],
    label_vocab: Sequence[str],
    extra_manifest: Mapping[str, Any] | None = None,
) -> tuple[Store, bool]:
    """``(store with the labels of task, reused)``: open the label entry ``labels/<task>-<fp12>/`` of
    these labels, or add it first (reused=False).

    The entry is named by its content (:func:`label_fingerprint`), so identical labels are reused
    and changed ones get a new entry. Concurrent runs (sem and ccg of one sweep adding their labels
    to one store, or two jobs of one task) agree through :func:`lexp.locks.ensure_entry`: each entry
    is written into ``<entry>.partial-<pid>/`` under its exclusive lock and renamed into place. A
    reused entry is checked by :func:`check_integrity` first (a tampered label file is refused).
    """
    y = _check_label_values(labels, store.n_rows, store.path)
    vocab = [str(v) for v in label_vocab]
    fp = label_fingerprint(task, y, vocab)
    entry = store.path / LABELS_DIR / f"{_slug('task', task)}-{fp[:12]}"

    def build(target: Path) -> None:
        remove_partials(target)  # under the exclusive lock every partial is stale
        partial = target.with_name(f"{target.name}{_PARTIAL}{os.getpid()}")
        partial.mkdir()
        try:
            _write_label_entry(
                partial,
                task=task,
                labels=y,
                label_vocab=vocab,
                fp=fp,
                store_manifest=store.manifest,
                extra=extra_manifest,
            )
            os.rename(partial, target)
            _fsync_path(target.parent)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if _is_space_error(exc):
                raise _space_error(target, int(y.nbytes) + _SPACE_SLACK, None, exc) from exc
            raise

    def load(target: Path) -> Store:
        opened = _with_labels(store, target)
        report = check_integrity(opened, full=False)
        if not report.ok:
            raise LexpInputError(report.message().removeprefix("FAILED").strip())
        return opened

    return ensure_entry(entry, ready=Path.exists, build=build, load=load)
