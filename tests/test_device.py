"""lexp.device's process-wide settings: the cuBLAS workspace that deterministic probes need, and
TF32 switched off through torch's new precision API only (the legacy getters raise once anything
used the new one). These run in subprocesses because the settings are global to the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lexp.device import describe_device, exact_float32_matmul

TESTS = Path(__file__).parent


def _python(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_importing_lexp_sets_the_cublas_workspace_before_any_product() -> None:
    """torch reads CUBLAS_WORKSPACE_CONFIG once, at the first cuBLAS product: Lightning setting it when
    the probes' deterministic Trainer is built is too late after extraction or fine-tuning."""
    code = "import os, lexp; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == ":4096:8", proc.stderr
    assert _python(code, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == ":16:8"  # the user's value wins


def test_exact_float32_turns_tf32_off_and_restores_the_callers_setting() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with exact_float32_matmul():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with pytest.raises(ValueError), exact_float32_matmul():
            raise ValueError("inside")
        assert matmul.fp32_precision == "tf32"
        with exact_float32_matmul(enabled=False):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_a_process_that_set_tf32_through_the_new_api_still_extracts() -> None:
    """After torch.backends.fp32_precision = "tf32" (what transformers' enable_tf32 does), torch raises
    on the legacy getters (allow_tf32, get_float32_matmul_precision): lexp must not call them."""
    code = """
import numpy as np, tempfile, torch
from pathlib import Path
torch.backends.fp32_precision = "tf32"
from lexp.device import describe_device
from lexp.encoders.extract import extract_words
from lexp.redundancy.covariance import _array_chunks, _moments_on_device
from tiny_models import tiny_bert
model, tokenizer = tiny_bert(Path(tempfile.mkdtemp()))
rows = dict(extract_words(model, tokenizer, [["a", "b"], ["c"]], progress=False))
moments = _moments_on_device(_array_chunks(np.ones((4, 3), np.float32), 2, None), torch.device("cpu"), "float32", "x")
print(sorted(rows), rows[0].shape[0], describe_device(torch.device("cpu"))["type"], moments.n)
"""
    assert _python(code) == "[0, 1] 2 cpu 4"


def test_describe_device_on_the_cpu() -> None:
    info = describe_device(torch.device("cpu"), torch.bfloat16)
    assert info["device"] == "cpu" and info["dtype"] == "bfloat16" and info["threads"] >= 1


def test_one_named_gpu_and_several_trainer_devices_is_an_error_before_any_work() -> None:
    """Lightning's devices=2 takes GPUs 0 and 1 whatever device=cuda:N says: refuse the mix (on any
    machine: the check needs no GPU) and name CUDA_VISIBLE_DEVICES."""
    from lexp.device import resolve_run_device, trainer_device_kwargs
    from lexp.errors import LexpInputError

    for devices in (2, [1, 2], -1):
        with pytest.raises(LexpInputError, match="CUDA_VISIBLE_DEVICES"):
            resolve_run_device("cuda:1", {"devices": devices})
    assert resolve_run_device("cpu", {"devices": 2}) == torch.device("cpu")
    assert trainer_device_kwargs(torch.device("cpu"), {"devices": 2}) == {"accelerator": "cpu", "devices": 2}
    assert trainer_device_kwargs(torch.device("cpu"), {"devices": 1}) == {"accelerator": "cpu", "devices": 1}
    assert trainer_device_kwargs(torch.device("cuda", 3)) == {"accelerator": "gpu", "devices": [3]}
