"""Shared fixtures: real data root, offline environment, tiny models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One torch thread: the suite's tensors are small, and on a shared 2-core machine a second
# thread spins more than it helps (measured: tiny fine-tuning 38.6 s with 2 threads, 2.6 s with 1).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("LEXP_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT saved to a folder (model.name_or_path=), one per test module: the
    tiny jobs of the local and the SLURM sweeps."""
    from tiny_models import save_model, tiny_bert

    tmp = tmp_path_factory.mktemp("tiny-bert")
    model, tokenizer = tiny_bert(tmp, layers=2)
    return save_model(model, tokenizer, tmp / "model")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"LEXP_DATA={root} does not exist; CI must run with ../shared/data beside the clone")
        pytest.skip(f"real data not found at {root} (set LEXP_DATA)")
    # Resolved, as task configs resolve their files: `source` fields ("path:line") then compare
    # equal even when ../shared is a symlink (as in a CI checkout).
    return root.resolve()


def _cuda() -> bool:
    return torch.cuda.is_available()


#: Device parametrisation: every device test runs on the CPU everywhere, and on CUDA where torch
#: sees a GPU. The CUDA half carries the ``gpu`` marker: ``pytest -m gpu`` on a GPU machine runs
#: exactly those (none may be skipped there); elsewhere they are skipped with the reason.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU on this machine")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a device-parametrised test runs on (cpu always, cuda where available)."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items) -> None:
    """A test marked ``gpu`` without the device fixture needs a GPU: skip it (with the reason) where
    there is none, so the CPU suite stays green and ``pytest -m gpu`` on a GPU runs it."""
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _rank_zero_is_not_leaked() -> Iterator[None]:
    """Lightning keeps the process rank in one global (``rank_zero_only.rank``); a test that sets it
    (``LightningEnvironment.set_global_rank``) and leaves it nonzero makes every later fine-tune in
    the pytest process skip its rank-0 save. Fail the leaking test itself, not a later victim."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    yield
    rank = getattr(rank_zero_only, "rank", 0)
    if rank != 0:
        rank_zero_only.rank = 0
        pytest.fail(f"this test left pytorch_lightning's rank_zero_only.rank = {rank}; restore it")
