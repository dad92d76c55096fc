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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lexp.errors import LexpInputError
from lexp.store import Store, open_store

__all__ = ["ActivationDataModule", "EpochBatchSampler", "StoreBatches", "epoch_order"]

SPLITS = ("train", "dev", "test")


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

    def __init__(self, store: Store, columns: np.ndarray | None, regression: bool) -> None:
        self.path = store.path
        self.columns = columns
        self.regression = regression
        self._store: Store | None = store
        labels = store.labels
        if regression:
            self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        else:
            if not np.issubdtype(labels.dtype, np.integer):
                raise LexpInputError(
                    f"{store.path}: labels are {labels.dtype}, not class ids; this is a regression store "
                    "(set regression=True)"
                )
            self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.path)
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
    ) -> None:
        super().__init__()
        stores = {"train": train, "dev": dev, "test": test}
        self.stores: dict[str, Store] = {
            name: s if isinstance(s, Store) else open_store(s) for name, s in stores.items() if s is not None
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
        self._datasets = {
            name: StoreBatches(store, self.columns, self.regression) for name, store in self.stores.items()
        }

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
        """A loader over one split; ``shuffle`` uses the seeded per-epoch order."""
        if split not in self._datasets:
            raise LexpInputError(
                f"no {split!r} store was given to ActivationDataModule (have {sorted(self._datasets)})"
            )
        dataset = self._datasets[split]
        sampler = EpochBatchSampler(
            self.stores[split].n_rows, batch_size or self.batch_size, shuffle=shuffle, seed=self.seed
        )
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=self.shuffle, batch_size=self.batch_size * self.read_steps)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """Store-order batches of a split (evaluation, prediction, ranking)."""
        return self.loader(split, shuffle=False, batch_size=self.eval_batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Store-order dev batches; no dev store means no validation (an empty list for Lightning)."""
        return self.ordered_dataloader("dev") if "dev" in self._datasets else []

    def test_dataloader(self) -> DataLoader:
        return self.ordered_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.ordered_dataloader(self.predict_split)
