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


# ------------------------------------------------------------------------------ resident splits
def _corrupt(store_path: Path, rows: list[int], dtype=np.float16) -> None:
    """Overwrite whole rows of activations.npy with 0xFF bytes in place (a NaN in float16 and in
    float32), as disk damage would: same size, so the store still opens."""
    acts = np.load(store_path / "activations.npy", mmap_mode="r")
    row_bytes = acts.shape[1] * acts.dtype.itemsize
    offset = acts.offset
    del acts
    with open(store_path / "activations.npy", "r+b") as f:
        for r in rows:
            f.seek(offset + r * row_bytes)
            f.write(b"\xff" * row_bytes)


def test_resident_auto_on_the_cpu_streams_as_before(stores: dict) -> None:
    dm = ActivationDataModule(stores["train"], stores["dev"], batch_size=128, seed=3)
    assert dm.resident == "auto" and dm.target_device() == torch.device("cpu")
    assert dm.resident_split("train") is None
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert all(isinstance(b, (tuple, list)) for b in batches) and len(batches) == 8
    np.testing.assert_array_equal(
        np.concatenate([x[:, 0].numpy() for x, _ in batches]).astype(np.int64), epoch_order(1000, 3, 1)
    )
    assert isinstance(next(iter(dm.val_dataloader())), (tuple, list))


@pytest.mark.parametrize("shuffle", [True, False])
def test_resident_split_gives_the_streaming_minibatches(tmp_path: Path, shuffle: bool) -> None:
    """resident=true (here: RAM) yields one ResidentBatch per epoch whose minibatches are exactly the
    streaming ones: same rows, same order, same float32 values (from a float16 store)."""
    from lexp.datamodules import ResidentBatch

    store = make_store(tmp_path / "s", 500, dtype="float16")
    cols = np.array([5, 0, 17, 3])
    stream = ActivationDataModule(store, store, columns=cols, batch_size=64, seed=1, shuffle=shuffle)
    held = ActivationDataModule(
        store, store, columns=cols, batch_size=64, seed=1, shuffle=shuffle, resident=True, eval_batch_size=128
    )
    data = held.resident_split("train")
    assert data.x.dtype == torch.float16 and data.x.shape == (500, 4)  # the store's dtype, selected columns
    s_loader, h_loader = stream.train_dataloader(), held.train_dataloader()
    for epoch in (0, 2):
        s_loader.sampler.set_epoch(epoch)
        h_loader.sampler.set_epoch(epoch)
        (batch,) = list(h_loader)  # the whole epoch is one batch
        assert isinstance(batch, ResidentBatch) and len(batch) == 500 and batch.n_steps == 8
        minibatches = list(batch.minibatches())
        for (xs, ys), (xh, yh) in zip(s_loader, minibatches, strict=True):
            assert xh.dtype == torch.float32 and yh.dtype == torch.int64
            assert torch.equal(xs, xh) and torch.equal(ys, yh)
    val = list(held.val_dataloader())
    assert [len(x) for x, _ in val] == [128, 128, 128, 116]
    np.testing.assert_array_equal(
        torch.cat([x for x, _ in val]).numpy(), row_values(500).astype(np.float16).astype(np.float32)[:, cols]
    )
    held.teardown("fit")  # Lightning's end of fit gives the memory back
    assert held._resident == {}


def test_resident_settings_are_checked(stores: dict, monkeypatch) -> None:
    import lexp.datamodules as dms

    with pytest.raises(LexpInputError, match="resident = 'sometimes'"):
        ActivationDataModule(stores["train"], resident="sometimes")
    assert ActivationDataModule(stores["train"], resident="false").resident is False
    assert ActivationDataModule(stores["train"], resident=None).resident == "auto"
    # resident=true that cannot fit: one clear error naming the store, the bytes and the fix
    monkeypatch.setattr(dms, "_available_bytes", lambda device: 1000)
    with pytest.raises(LexpInputError, match=r"resident=true.*needs .* GiB.*probe.resident=auto"):
        ActivationDataModule(stores["train"], resident=True).train_dataloader()
    # auto on a GPU with too little memory streams (decided before anything is copied)
    dm = ActivationDataModule(stores["train"], resident="auto", device="cuda")
    assert dm.resident_split("train") is None
    # a device that contradicts the Trainer's is an error, not data on the wrong device
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    dm.trainer = trainer
    with pytest.raises(LexpInputError, match=r"device=cuda\) but the Trainer runs on cpu"):
        dm.train_dataloader()
    same = ActivationDataModule(stores["train"], device="cpu")
    same.trainer = trainer
    assert same.target_device() == torch.device("cpu")


def test_resident_load_refuses_non_finite_activations(tmp_path: Path) -> None:
    store = make_store(tmp_path / "bad", 300, dtype="float16")
    _corrupt(store.path, [7, 8, 250])
    dm = ActivationDataModule(open_store(store.path), resident=True)
    with pytest.raises(
        LexpInputError, match=r"3 row\(s\) of the train split hold non-finite.*rows 7-8, 250"
    ) as err:
        dm.train_dataloader()
    assert str(store.path) in str(err.value) and "delete the store directory" in str(err.value)
    # train labels of a resident split are checked once, on the host, when it is loaded
    labels = np.arange(40) % 4
    labels[5] = 9
    bad_labels = make_store(tmp_path / "labels", 40, labels=labels)
    with pytest.raises(LexpInputError, match=r"label ids outside the 4 train classes at rows 5"):
        ActivationDataModule(bad_labels, resident=True).train_dataloader()
