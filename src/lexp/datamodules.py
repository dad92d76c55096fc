"""LightningDataModule that streams probe batches straight from activation stores.

Probes see data only through this module. Rows are never all loaded: each batch is gathered from
the memory-mapped store (rows read in sorted order, then put back in batch order), narrowed to the
requested neuron columns and cast to float32. There is no per-row ``__getitem__`` and no collate:
the sampler yields whole index batches and the dataset answers one batch per call, which is what
makes an epoch over 150,000 × 2,688 rows cost well under a second of loading.

Batch order is a pure function of ``(seed, epoch, n_rows, batch_size)`` (see :func:`epoch_order`),
so two runs with the same seed see identical batches, and a probe trained alone sees the same
batches as the same probe trained as one head of a ``MultiHeadProbe``. Lightning calls
``set_epoch`` on the sampler at every epoch; a hand-written loop calls
``loader.sampler.set_epoch(epoch)`` itself.

**Resident splits** (``resident``, ``probe.resident``): on a GPU, per-step host work — reading,
casting, copying each minibatch, and Lightning's per-batch hooks — costs more than the step. When a
split (its selected columns, in the store's dtype) fits in half the device memory available, it is
copied onto the device once, in chunks streamed from the memory map (never a whole host copy),
checked for non-finite values on the way, and batches are cut from it there: the training loader
yields one :class:`ResidentBatch` per epoch (the epoch's :func:`epoch_order` on the device; the
probe cuts it into ``batch_size`` minibatches, so the Adam steps are exactly the streaming ones) and
the evaluation loaders yield large float32 slices. ``resident=true`` also works on the CPU (the
split is then a torch tensor in RAM), which is how the tests check it against the streaming path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lexp.errors import LexpInputError
from lexp.store import Store, open_store

__all__ = [
    "ActivationDataModule",
    "EpochBatchSampler",
    "RESIDENT_CHOICES",
    "ResidentBatch",
    "StoreBatches",
    "epoch_order",
    "parse_resident",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")

#: ``resident`` / ``probe.resident``: auto = on a GPU when the split fits in the budget; true = on the
#: run's device whatever the budget (the CPU too); false = always stream from the store.
RESIDENT_CHOICES = ("auto", True, False)
#: share of the device memory available (free + torch's reusable cache) a resident split may take
RESIDENT_FRACTION = 0.5
#: bytes per host→device copy while loading a resident split (a chunk of the memory map)
_LOAD_CHUNK_BYTES = 64 << 20
#: float32 bytes of one evaluation batch cut from a resident split on a GPU (large batches: few launches)
_EVAL_BATCH_BYTES = 256 << 20


def parse_resident(value: Any, what: str = "resident") -> str | bool:
    """``auto`` | ``True`` | ``False`` from a setting (YAML's ``auto``/``true``/``false``, a bool, or
    null for the default, auto)."""
    if isinstance(value, bool):
        return value
    if value is None:  # null: the default
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in {"true", "yes", "on", "1"}:
            return True
        if text in {"false", "no", "off", "0"}:
            return False
    raise LexpInputError(
        f"{what} = {value!r}: use auto (or null), true or false (auto: keep the splits in GPU memory "
        f"when they fit in {RESIDENT_FRACTION:.0%} of what is available; true: on the run's device "
        "whatever the size, the CPU too; false: always stream from the store)"
    )


def _row_list(rows: np.ndarray, limit: int = 6) -> str:
    """Sorted store rows as ``"3, 10-14, 99"`` (the first ``limit`` runs, then how many more)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [(int(r[0]), int(r[-1])) for r in np.split(rows, breaks)]
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", … ({rows.size} rows in all)"
    return text


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row permutation of one training epoch: depends only on (seed, epoch), never on history."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n_rows))


class EpochBatchSampler(Sampler):
    """Yields one index batch per step: a slice (ordered) or an int64 array (shuffled epoch).

    Ordered passes yield ``slice`` objects so the dataset can read a contiguous block of the
    memmap; shuffled passes cut :func:`epoch_order` into consecutive batches (the last one may be
    short; nothing is dropped).
    """

    def __init__(self, n_rows: int, batch_size: int, *, shuffle: bool, seed: int = 0) -> None:
        if batch_size < 1:
            raise LexpInputError(f"batch_size must be ≥ 1, got {batch_size}")
        self.n_rows, self.batch_size, self.shuffle, self.seed = (
            int(n_rows),
            int(batch_size),
            shuffle,
            int(seed),
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __iter__(self) -> Iterator[slice | np.ndarray]:
        bs = self.batch_size
        if not self.shuffle:
            for start in range(0, self.n_rows, bs):
                yield slice(start, min(start + bs, self.n_rows))
            return
        order = epoch_order(self.n_rows, self.seed, self.epoch)
        for start in range(0, self.n_rows, bs):
            yield order[start : start + bs]


class StoreBatches(Dataset):
    """Map-style dataset whose ``__getitem__`` takes a whole batch of row indices (or a slice).

    Holds the store's *path*, not its memmap, so it pickles cheaply into DataLoader workers, which
    reopen the store themselves.
    """

    def __init__(
        self, store: Store, columns: np.ndarray | None, regression: bool, extra: np.ndarray | None = None
    ) -> None:
        self.path = store.path
        self.columns = columns
        self.regression = regression
        self._store: Store | None = store
        labels = store.require_labels()
        if regression:
            self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        else:
            if not np.issubdtype(labels.dtype, np.integer):
                raise LexpInputError(
                    f"{store.path}: labels are {labels.dtype}, not class ids; this is a regression store "
                    "(set regression=True)"
                )
            if extra is not None:  # (rows, T): column 0 the store's labels, then the extra vectors
                labels = np.column_stack([labels, extra])
            self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.path, labels=False)  # the labels are held in self.labels
        return self._store

    def __len__(self) -> int:
        return self.store.n_rows

    def __getitem__(self, rows: slice | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.store.read_rows(rows, self.columns)
        y = self.labels[rows] if isinstance(rows, slice) else self.labels[torch.from_numpy(rows)]
        return torch.from_numpy(x), y


def _as_batch(item: Any) -> Any:
    """No collate: the dataset already returns a batch."""
    return item


# ------------------------------------------------------------------------------ resident splits
class ResidentBatch:
    """One training batch of a split held on the device: the split (``x`` in the store's dtype,
    ``y``) and the rows of this batch in epoch order (an index tensor on the device, or a slice
    when unshuffled). :meth:`minibatches` cuts them into ``batch_size`` rows, each gathered and cast
    to float32 on the device.

    Deliberately not a tensor collection (no ``to``, not a dataclass): Lightning passes it to
    ``training_step`` unchanged — the data already live on the device, nothing is moved or copied.
    """

    __slots__ = ("x", "y", "rows", "batch_size")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | slice, batch_size: int) -> None:
        self.x, self.y, self.rows, self.batch_size = x, y, rows, int(batch_size)

    def __len__(self) -> int:
        return self.rows.stop - self.rows.start if isinstance(self.rows, slice) else int(self.rows.numel())

    @property
    def n_steps(self) -> int:
        return -(-len(self) // self.batch_size)

    def minibatches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x float32 (≤ batch_size, C), y)`` per minibatch, on the device, in order. Every full
        minibatch has the same shape (only the last may be short), and nothing here waits for the
        device: the indices are views of one tensor made once per batch."""
        bs = self.batch_size
        if isinstance(self.rows, slice):
            for start in range(self.rows.start, self.rows.stop, bs):
                stop = min(start + bs, self.rows.stop)
                yield self.x[start:stop].float(), self.y[start:stop]
            return
        for idx in self.rows.split(bs):
            yield self.x.index_select(0, idx).float(), self.y.index_select(0, idx)


class _ResidentSplit(Dataset):
    """A split held on a device: ``x`` (rows × selected columns, store dtype) and ``y``. As a
    dataset it answers the samplers' index batches: a :class:`ResidentBatch` for training
    (``train=True``), else the float32 rows of a slice."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool) -> None:
        self.x, self.y, self.batch_size, self.train = x, y, int(batch_size), train

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, rows: slice | np.ndarray) -> Any:
        if self.train:
            if isinstance(rows, np.ndarray):  # the epoch order: one copy to the device per batch
                rows = torch.from_numpy(rows).to(self.x.device)
            return ResidentBatch(self.x, self.y, rows, self.batch_size)
        return self.x[rows].float(), self.y[rows]


def _available_bytes(device: torch.device) -> int:
    """Memory a resident split may come out of: on a GPU the free memory plus what torch's caching
    allocator holds unused (freed tensors it keeps for reuse); on the CPU the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class ActivationDataModule(pl.LightningDataModule):
    """Probe batches ``(x float32 (B, n_features), y)`` from the train/dev/test stores.

    ``columns`` (neuron indices, layer-major) selects the features; ``y`` is int64 class ids, or
    float32 targets when ``regression``. Training batches follow :func:`epoch_order` when
    ``shuffle``; evaluation loaders are always in store order, in batches of ``eval_batch_size``.

    ``read_steps`` > 1 makes each training batch ``read_steps`` consecutive minibatches of
    ``batch_size`` rows of the epoch order, read in one go; the probes split such a batch back into
    its minibatches (one optimiser step each; they read ``batch_size`` from here), so the steps
    are the same as with ``read_steps=1`` while the reading and Lightning's per-batch work are paid
    once per read.

    ``extra_labels`` (``{split: (rows,) or (rows, E) int array}``, every split given) adds label
    vectors for the same rows — the control task of ``task.control`` — and ``y`` becomes
    ``(B, 1 + E)``, column 0 the store's labels (``n_targets`` = 1 + E). Stores hold no words, so
    the caller derives them from the task in store order (sentence order, word by word).

    ``resident`` (``"auto"`` | ``True`` | ``False``, see the module docstring) holds the train, dev
    and test splits on the device — the Trainer's (``trainer.strategy.root_device``) once one is
    attached, else ``device`` (default: the CPU) — each loaded when its loader is first asked for
    and released at Lightning's ``teardown``. ``auto`` does so only on a GPU and only for a split
    that fits in ``resident_fraction`` of the memory available there; the training loader then
    yields one :class:`ResidentBatch` per epoch (``read_steps`` does not apply).
    """

    def __init__(
        self,
        train: Store | Path | str,
        dev: Store | Path | str | None = None,
        test: Store | Path | str | None = None,
        *,
        columns: np.ndarray | Sequence[int] | None = None,
        batch_size: int = 128,
        seed: int = 0,
        shuffle: bool = True,
        regression: bool = False,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        predict_split: str = "test",
        read_steps: int = 1,
        resident: bool | str = "auto",
        device: torch.device | str | None = None,
        resident_fraction: float = RESIDENT_FRACTION,
        extra_labels: Mapping[str, np.ndarray] | None = None,
        task: str | None = None,
    ) -> None:
        super().__init__()
        stores = {"train": train, "dev": dev, "test": test}
        self.stores: dict[str, Store] = {  # a path opens with the labels of `task` (see open_store)
            name: s if isinstance(s, Store) else open_store(s, task)
            for name, s in stores.items()
            if s is not None
        }
        first = self.stores["train"]
        for name, store in self.stores.items():
            if store.n_neurons != first.n_neurons:
                raise LexpInputError(
                    f"{store.path}: {name} store has {store.n_neurons} neurons, train has {first.n_neurons}; "
                    "all splits must come from the same model"
                )
            if not regression and store.label_vocab != first.label_vocab:
                raise LexpInputError(
                    f"{store.path}: {name} store's label_vocab differs from train's ({first.path}); class ids "
                    "would not mean the same labels. Rebuild the stores from one task config."
                )
        self.columns = first.column_index(columns)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.seed, self.shuffle, self.regression = int(seed), bool(shuffle), bool(regression)
        self.num_workers = int(num_workers)
        if isinstance(read_steps, bool) or int(read_steps) < 1:
            raise LexpInputError(
                f"read_steps = {read_steps!r} must be a positive integer (1: one minibatch per batch)"
            )
        self.read_steps = int(read_steps)
        if predict_split not in SPLITS:
            raise LexpInputError(f"predict_split must be one of {SPLITS}, got {predict_split!r}")
        self.predict_split = predict_split
        extra = self._extra_labels(extra_labels)
        #: label vectors per row: 1 (the store's labels) + the extra ones (e.g. the control task)
        self.n_targets = 1 + (0 if extra is None else next(iter(extra.values())).shape[1])
        self._datasets = {
            name: StoreBatches(store, self.columns, self.regression, None if extra is None else extra[name])
            for name, store in self.stores.items()
        }
        self.resident = parse_resident(resident)
        self.device = None if device is None else torch.device(device)
        if not 0 < float(resident_fraction) <= 1:
            raise LexpInputError(f"resident_fraction = {resident_fraction!r} must be in (0, 1]")
        self.resident_fraction = float(resident_fraction)
        #: splits held on a device (loaded on first use, dropped at teardown)
        self._resident: dict[str, _ResidentSplit] = {}
        #: per split, how the last loader made cuts it: (rows per batch, shuffled)
        self._layout: dict[str, tuple[int, bool]] = {}

    def _extra_labels(self, extra: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """Extra label vectors per split (``{split: (rows,) or (rows, E)}`` class ids), checked: one
        per store row of every split given, the same number E in each, train ids in the classes."""
        if extra is None:
            return None
        if self.regression:
            raise LexpInputError(
                "ActivationDataModule: extra_labels (e.g. the control task) are class ids; a regression "
                "task has none (task.control is for word-level tasks)"
            )
        out: dict[str, np.ndarray] = {}
        widths = set()
        for split, store in self.stores.items():
            if split not in extra:
                raise LexpInputError(
                    f"ActivationDataModule: extra_labels has no {split!r} entry ({store.path}); give one "
                    f"label vector per row of every split ({sorted(self.stores)})"
                )
            values = np.asarray(extra[split])
            values = values.reshape(-1, 1) if values.ndim == 1 else values
            if (
                values.ndim != 2
                or values.shape[0] != store.n_rows
                or not np.issubdtype(values.dtype, np.integer)
            ):
                raise LexpInputError(
                    f"{store.path}: extra_labels[{split!r}] has shape {values.shape} and dtype {values.dtype}; "
                    f"the {split} store has {store.n_rows} rows: give integer class ids, one per row "
                    "(in store order: the task's words sentence by sentence)"
                )
            if split == "train" and values.size and (values.min() < 0 or values.max() >= self.n_classes):
                raise LexpInputError(
                    f"{store.path}: extra train labels must be class ids in [0, {self.n_classes}), got "
                    f"{int(values.min())}..{int(values.max())}"
                )
            widths.add(values.shape[1])
            out[split] = values.astype(np.int64, copy=False)
        if len(widths) != 1:
            raise LexpInputError(
                f"ActivationDataModule: extra_labels differ in width across splits: {widths}"
            )
        return out

    @property
    def n_features(self) -> int:
        return self.stores["train"].n_neurons if self.columns is None else len(self.columns)

    @property
    def n_classes(self) -> int:
        """Size of the train label vocabulary (class id = index); 1 output for regression."""
        if self.regression:
            return 1
        n = len(self.stores["train"].label_vocab)
        if n == 0:
            raise LexpInputError(
                f"{self.stores['train'].path}: the manifest has no label_vocab; rebuild the store, or set "
                "regression=True for a regression task"
            )
        return n

    def loader(self, split: str, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A loader over one split, streamed from the store; ``shuffle`` uses the seeded per-epoch order."""
        if split not in self._datasets:
            raise LexpInputError(
                f"no {split!r} store was given to ActivationDataModule (have {sorted(self._datasets)})"
            )
        rows = batch_size or self.batch_size
        self._layout[split] = (rows, shuffle)
        sampler = EpochBatchSampler(self.stores[split].n_rows, rows, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            self._datasets[split],
            sampler=sampler,
            batch_size=None,
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _resident_loader(self, split: str, data: _ResidentSplit, rows: int, shuffle: bool) -> DataLoader:
        """A loader cutting batches out of a split on the device (no workers: nothing to read)."""
        self._layout[split] = (rows, shuffle)
        sampler = EpochBatchSampler(len(data), rows, shuffle=shuffle, seed=self.seed)
        return DataLoader(data, sampler=sampler, batch_size=None, collate_fn=_as_batch, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        data = self.resident_split("train")
        if data is not None:  # one batch per epoch: the probe loops over its minibatches
            return self._resident_loader("train", data, len(data), self.shuffle)
        return self.loader("train", shuffle=self.shuffle, batch_size=self.batch_size * self.read_steps)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """Store-order batches of a split (evaluation, prediction, ranking), streamed from the store."""
        return self.loader(split, shuffle=False, batch_size=self.eval_batch_size)

    def _eval_dataloader(self, split: str) -> DataLoader:
        data = self.resident_split(split)
        if data is None:
            return self.ordered_dataloader(split)
        rows = self.eval_batch_size
        if data.x.device.type == "cuda":  # large batches: few kernel launches per pass
            rows = max(rows, _EVAL_BATCH_BYTES // (4 * max(1, data.x.shape[1])))
        return self._resident_loader(split, data, rows, False)

    def val_dataloader(self) -> DataLoader | list:
        """Store-order dev batches; no dev store means no validation (an empty list for Lightning)."""
        return self._eval_dataloader("dev") if "dev" in self._datasets else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self._datasets:
            return self.ordered_dataloader("test")  # the error naming the missing store
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.ordered_dataloader(self.predict_split)

    # ---- resident splits
    def target_device(self) -> torch.device:
        """Where resident splits go: the attached Trainer's device, else ``device`` (default CPU)."""
        trainer = self.trainer
        if trainer is not None:
            root = torch.device(trainer.strategy.root_device)
            mine = self.device
            if mine is not None and (
                mine.type != root.type or (None not in (mine.index, root.index) and mine.index != root.index)
            ):
                raise LexpInputError(
                    f"ActivationDataModule(device={self.device}) but the Trainer runs on {root}; give both "
                    "the run's device (lexp.device.trainer_device_kwargs), or leave device unset"
                )
            return root
        return self.device or torch.device("cpu")

    def resident_split(self, split: str) -> _ResidentSplit | None:
        """The split held on :meth:`target_device` (loaded on first use), or None to stream it."""
        if split in self._resident:
            return self._resident[split]
        device = self.target_device()
        if self.resident is False or (self.resident == "auto" and device.type != "cuda"):
            return None
        store = self.stores[split]
        n_cols = self.n_features
        nbytes = store.n_rows * n_cols * store.dtype.itemsize + store.n_rows * 8
        available = _available_bytes(device)
        if self.resident == "auto" and nbytes > self.resident_fraction * available:
            log.info(
                "%s split streamed from %s: %s would take more than %.0f%% of the %s available on %s",
                split,
                store.path,
                _gib(nbytes),
                100 * self.resident_fraction,
                _gib(available),
                device,
            )
            return None
        if nbytes > available:
            raise LexpInputError(
                f"{store.path}: resident=true, but the {split} split ({store.n_rows} rows × {n_cols} "
                f"columns, {store.dtype}) needs {_gib(nbytes)} and {device} has {_gib(available)} available; set "
                "probe.resident=auto (held only when it fits) or false (streamed from the store)"
            )
        self._resident[split] = data = self._load(split, device)
        log.info(
            "%s split held on %s: %d rows × %d columns, %s (%s)",
            split,
            device,
            store.n_rows,
            n_cols,
            store.dtype,
            _gib(nbytes),
        )
        return data

    def _load(self, split: str, device: torch.device) -> _ResidentSplit:
        """Copy a split onto ``device`` chunk by chunk from the memory map, in the store's dtype,
        checking on the device that every value is finite (one host sync at the end)."""
        store = self.stores[split]
        n_rows, n_cols = store.n_rows, self.n_features
        x = torch.empty(
            (n_rows, n_cols), dtype=torch.from_numpy(np.empty(0, store.dtype)).dtype, device=device
        )
        chunk_rows = max(1, _LOAD_CHUNK_BYTES // max(1, n_cols * store.dtype.itemsize))
        finite = []
        with warnings.catch_warnings():  # a read-only memmap view: only read, by the copy
            warnings.filterwarnings("ignore", message=".*not writable.*")
            for start, chunk in zip(
                range(0, n_rows, chunk_rows),
                store.iter_chunks(chunk_rows, self.columns, dtype=store.dtype),
                strict=True,
            ):
                block = x[start : start + len(chunk)]
                block.copy_(torch.from_numpy(chunk))
                # a NaN/Inf anywhere makes the float32 sum non-finite (the exact check is below)
                finite.append(torch.isfinite(block.sum(dtype=torch.float32)))
        if finite and not bool(torch.stack(finite).all()):
            bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten().cpu().numpy()
            if bad.size:
                raise LexpInputError(
                    f"{store.path}: {bad.size} row(s) of the {split} split hold non-finite activations "
                    f"(NaN or Inf) in the probe's columns, store rows {_row_list(bad)}; the store's "
                    "activations.npy is damaged (lexp refuses non-finite values when writing a store): "
                    "delete the store directory so that lexp rebuilds it, and rerun"
                )
        labels = self._datasets[split].labels
        if split == "train":
            self._check_labels(store, labels)
        y = labels.to(device)
        return _ResidentSplit(x, y, self.batch_size, train=split == "train")

    def _check_labels(self, store: Store, labels: torch.Tensor) -> None:
        """Train labels of a resident split, checked once on the host (a CUDA kernel indexing with a
        bad id would be a device-side assert, not an error)."""
        if self.regression:
            bad = np.flatnonzero(~np.isfinite(labels.numpy()))
            what = "non-finite regression targets"
        else:
            n = self.n_classes
            ids = labels.numpy().reshape(len(labels), -1)  # (rows, label vectors)
            bad = np.flatnonzero(((ids < 0) | (ids >= n)).any(axis=1))
            what = f"label ids outside the {n} train classes"
        if bad.size:
            raise LexpInputError(
                f"{store.label_path or store.path}: {what} at rows {_row_list(bad)} of labels.npy; "
                "delete this label folder and rerun to rebuild it from the task"
            )

    def teardown(self, stage: str) -> None:
        """Lightning's end of fit/test: give the device memory of resident splits back."""
        self._resident.clear()

    def describe_rows(
        self, split: str, batch_idx: int | None, *, epoch: int = 0, positions: np.ndarray | None = None
    ) -> str:
        """``"<store path>: <split> rows …"`` for a batch of the last loader made for ``split``
        (``batch_idx`` None: the store alone). ``positions`` picks rows of the batch; without them
        the batch's rows are read again and those holding non-finite values are named."""
        store = self.stores[split]
        if batch_idx is None:
            return f"{store.path} ({split} split)"
        per, shuffled = self._layout.get(split, (self.batch_size, False))
        order = epoch_order(store.n_rows, self.seed, epoch) if shuffled else np.arange(store.n_rows)
        rows = order[batch_idx * per : (batch_idx + 1) * per]
        if positions is None:
            x = store.read_rows(rows, self.columns)
            positions = np.flatnonzero(~np.isfinite(x).all(axis=1))
            if positions.size == 0:
                return f"{store.path}: {split} rows {_row_list(rows)}"
        return f"{store.path}: {split} store rows {_row_list(rows[positions])}"
