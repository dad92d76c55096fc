"""Shared fixtures: real data root, offline environment, tiny models."""

from __future__ import annotations

import os
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
