"""ActivationDataModule: every row once per epoch, seeded order, column subsets, Lightning, memory."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lexp.datamodules import ActivationDataModule, epoch_order
from lexp.errors import LexpInputError
from lexp.store import StoreWriter, open_store

N_LAYERS, HIDDEN = 3, 8
N_NEURONS = N_LAYERS * HIDDEN
VOCAB = ["A", "B", "C", "D"]


def row_values(n_rows: int) -> np.ndarray:
    """Entry (r, c) = r + c / 32: exact in float32, and x[:, 0] names the row."""
    return np.arange(n_rows, dtype=np.float32)[:, None] + np.arange(N_NEURONS, dtype=np.float32) / 32


def make_store(path: Path, n_rows: int, *, dtype: str = "float32", labels=None, vocab=VOCAB):
    acts = row_values(n_rows)
    with StoreWriter(
        path, n_rows=n_rows, n_layers=N_LAYERS, hidden=HIDDEN, dtype=dtype, manifest={"label_vocab": vocab}
    ) as w:
        w.write_rows(0, acts)
        w.finish(np.arange(n_rows) % len(VOCAB) if labels is None else labels)
    return open_store(path)


@pytest.fixture
def stores(tmp_path: Path) -> dict:
    return {
        "train": make_store(tmp_path / "train", 1000),
        "dev": make_store(tmp_path / "dev", 300),
        "test": make_store(tmp_path / "test", 250),
    }


def epoch_rows(loader, epoch: int) -> list[np.ndarray]:
    loader.sampler.set_epoch(epoch)
    return [x[:, 0].numpy().astype(np.int64) for x, _ in loader]


def test_every_row_exactly_once_per_epoch(stores: dict) -> None:
    dm = ActivationDataModule(stores["train"], batch_size=128, seed=3)
    loader = dm.train_dataloader()
    assert len(loader) == 8  # ceil(1000 / 128), the last batch short, nothing dropped
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert [len(x) for x, _ in batches] == [128] * 7 + [104]
        rows = np.concatenate([x[:, 0].numpy() for x, _ in batches]).astype(np.int64)
        assert sorted(rows.tolist()) == list(range(1000))
        np.testing.assert_array_equal(rows, epoch_order(1000, 3, epoch))
        for x, y in batches:  # x and y are the same rows
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            np.testing.assert_array_equal(y.numpy(), x[:, 0].numpy().astype(np.int64) % 4)
            np.testing.assert_array_equal(x.numpy(), row_values(1000)[x[:, 0].numpy().astype(np.int64)])


def test_order_depends_only_on_seed_and_epoch(stores: dict) -> None:
    a = ActivationDataModule(stores["train"], batch_size=100, seed=7).train_dataloader()
    b = ActivationDataModule(stores["train"], batch_size=100, seed=7).train_dataloader()
    other_seed = ActivationDataModule(stores["train"], batch_size=100, seed=8).train_dataloader()
    e0 = epoch_rows(a, 0)
    assert all(np.array_equal(p, q) for p, q in zip(e0, epoch_rows(b, 0), strict=True))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(epoch_rows(a, 1)))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(epoch_rows(other_seed, 0)))
    # going back to epoch 0 after epoch 1 replays epoch 0: no hidden state
    assert all(np.array_equal(p, q) for p, q in zip(e0, epoch_rows(a, 0), strict=True))
    # the batches a probe sees do not depend on which columns it reads (single vs multi-head)
    narrow = ActivationDataModule(stores["train"], batch_size=100, seed=7, columns=[5, 0]).train_dataloader()
    narrow.sampler.set_epoch(0)
    rows = [x[:, 1].numpy().astype(np.int64) for x, _ in narrow]
    assert all(np.array_equal(p, q) for p, q in zip(e0, rows, strict=True))


def test_read_steps_concatenates_consecutive_minibatches(stores: dict) -> None:
    """A read of 3 steps = 3 consecutive minibatches of the same epoch order (the last read short)."""
    dm = ActivationDataModule(stores["train"], batch_size=128, seed=3, read_steps=3)
    loader = dm.train_dataloader()
    assert len(loader) == 3  # ceil(1000 / 384)
    loader.sampler.set_epoch(2)
    reads = [x[:, 0].numpy().astype(np.int64) for x, _ in loader]
    assert [len(r) for r in reads] == [384, 384, 232]
    np.testing.assert_array_equal(np.concatenate(reads), epoch_order(1000, 3, 2))
    with pytest.raises(LexpInputError, match="read_steps"):
        ActivationDataModule(stores["train"], read_steps=0)


def test_no_shuffle_reads_in_store_order(stores: dict) -> None:
    dm = ActivationDataModule(stores["train"], batch_size=300, shuffle=False)
    rows = np.concatenate(epoch_rows(dm.train_dataloader(), 5))
    np.testing.assert_array_equal(rows, np.arange(1000))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_column_subsets(tmp_path: Path, dtype: str) -> None:
    store = make_store(tmp_path / "s", 500, dtype=dtype)
    cols = np.concatenate([store.layer_columns([2]), [3, 0]])
    dm = ActivationDataModule(store, store, columns=cols, batch_size=64, seed=1, eval_batch_size=128)
    assert dm.n_features == HIDDEN + 2 and dm.n_classes == 4
    expected = row_values(500).astype(dtype).astype(np.float32)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    order = epoch_order(500, 1, 0)
    seen = 0
    for x, y in loader:
        rows = order[seen : seen + len(x)]
        seen += len(x)
        assert x.shape == (len(rows), HIDDEN + 2) and x.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), expected[rows][:, cols])
        np.testing.assert_array_equal(y.numpy(), rows % 4)
    assert seen == 500
    val = list(dm.val_dataloader())
    assert [len(x) for x, _ in val] == [128, 128, 128, 116]
    np.testing.assert_array_equal(torch.cat([x for x, _ in val]).numpy(), expected[:, cols])


def test_eval_loaders_and_properties(stores: dict) -> None:
    dm = ActivationDataModule(stores["train"], stores["dev"].path, stores["test"], eval_batch_size=100)
    assert dm.n_features == N_NEURONS and dm.n_classes == 4
    for split, loader, n in (("dev", dm.val_dataloader(), 300), ("test", dm.test_dataloader(), 250)):
        x = torch.cat([x for x, _ in loader]).numpy()
        y = torch.cat([y for _, y in loader]).numpy()
        np.testing.assert_array_equal(x, row_values(n), err_msg=split)
        np.testing.assert_array_equal(y, np.arange(n) % 4)
    pred = torch.cat([x for x, _ in dm.predict_dataloader()])
    assert pred.shape == (250, N_NEURONS)
    dev_pred = ActivationDataModule(stores["train"], stores["dev"], predict_split="dev").predict_dataloader()
    assert sum(len(x) for x, _ in dev_pred) == 300
    assert ActivationDataModule(stores["train"]).val_dataloader() == []  # no dev: no validation
    with pytest.raises(LexpInputError, match="no 'test' store"):
        ActivationDataModule(stores["train"]).test_dataloader()


def test_regression_and_label_checks(tmp_path: Path) -> None:
    targets = np.linspace(0, 5, 50)
    reg = make_store(tmp_path / "reg", 50, labels=targets, vocab=[])
    dm = ActivationDataModule(reg, regression=True, batch_size=16)
    assert dm.n_classes == 1
    y = torch.cat([y for _, y in dm.ordered_dataloader("train")])
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), targets.astype(np.float32))
    with pytest.raises(LexpInputError, match="regression=True"):
        ActivationDataModule(reg)

    train = make_store(tmp_path / "train", 20)
    other = make_store(tmp_path / "dev", 20, vocab=["A", "B", "D", "C"])
    with pytest.raises(LexpInputError, match="label_vocab differs"):
        ActivationDataModule(train, other)
    with pytest.raises(LexpInputError, match="column indices"):
        ActivationDataModule(train, columns=[N_NEURONS])


class RecordingProbe(pl.LightningModule):
    """A linear probe that records the row ids of every training batch."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_classes)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.seen.append([])
        self.seen[-1].extend(x[:, 0].long().tolist())
        return torch.nn.functional.cross_entropy(self.linear(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.linear(x), y), batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_lightning_sets_a_new_epoch_order(stores: dict) -> None:
    """Lightning calls set_epoch on our sampler, so epoch e follows epoch_order(seed, e)."""
    dm = ActivationDataModule(stores["train"], stores["dev"], batch_size=128, seed=11)
    probe = RecordingProbe(dm.n_features, dm.n_classes)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 2
    for epoch, rows in enumerate(probe.seen):
        np.testing.assert_array_equal(rows, epoch_order(1000, 11, epoch))


def test_worker_processes_give_the_same_batches(stores: dict) -> None:
    dm = ActivationDataModule(stores["train"], batch_size=200, seed=2)
    expected = epoch_rows(dm.train_dataloader(), 1)
    with_worker = ActivationDataModule(
        stores["train"], batch_size=200, seed=2, num_workers=1
    ).train_dataloader()
    got = epoch_rows(with_worker, 1)
    assert all(np.array_equal(p, q) for p, q in zip(expected, got, strict=True))


def test_an_epoch_does_not_copy_the_store_into_memory(tmp_path: Path) -> None:
    """One shuffled epoch over a 205 MB float16 store adds far less than 205 MB of process memory.

    Measured as anonymous memory (RSS minus file-backed pages): the memmapped file pages an epoch
    touches belong to the kernel's page cache and are dropped under memory pressure.
    """
    import psutil

    n_rows, n_layers, hidden = 100_000, 4, 256  # 100,000 × 1,024 × 2 B = 205 MB
    path = tmp_path / "big"
    with StoreWriter(path, n_rows=n_rows, n_layers=n_layers, hidden=hidden, dtype="float16") as w:
        for start in range(0, n_rows, 10_000):
            block = np.zeros((10_000, n_layers * hidden), dtype=np.float16)
            block[:, 0] = np.arange(start, start + 10_000) % 2048
            w.write_rows(start, block)
        w.finish(np.arange(n_rows) % 3)
    dm = ActivationDataModule(path, batch_size=128, seed=0)

    def anon_mb() -> float:
        info = psutil.Process().memory_info()
        return (info.rss - info.shared) / 2**20

    gc.collect()
    base, peak, count, checksum, label_sum = anon_mb(), 0.0, 0, 0, 0
    for x, y in dm.train_dataloader():
        count += len(x)
        checksum += int(x[:, 0].sum())
        label_sum += int(y.sum())
        peak = max(peak, anon_mb() - base)
    assert count == n_rows
    assert checksum == int((np.arange(n_rows) % 2048).sum())
    assert label_sum == int((np.arange(n_rows) % 3).sum())
    assert peak < 60, f"anonymous memory grew by {peak:.0f} MB during one epoch over a 205 MB store"
