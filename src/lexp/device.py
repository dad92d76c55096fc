"""One device per run: resolve the ``device`` setting once, and say which one every stage uses.

A run has exactly one compute device. ``device=auto`` (the default) takes the first CUDA GPU when
torch sees one and the CPU otherwise; ``cpu``, ``cuda`` and ``cuda:N`` name it; ``trainer=gpu``
(Lightning's ``accelerator: gpu``) is shorthand for ``device=cuda``. Asking for a GPU that is not
there is one :class:`~lexp.errors.LexpInputError`, never a silent CPU run.

Every stage receives the resolved :class:`torch.device` and creates its tensors on it (or on the
device of the weights or data they meet); :func:`log_stage_device` logs it once per stage, and
:func:`describe_device` is what ``results.json`` records. No Hydra, no Lightning: a notebook calls
:func:`resolve_device` like the run does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lexp.errors import LexpInputError

__all__ = [
    "DEVICE_CHOICES",
    "autocast_dtype",
    "describe_device",
    "exact_float32_matmul",
    "log_stage_device",
    "resolve_device",
    "resolve_run_device",
    "synchronize",
    "trainer_device_kwargs",
]

log = logging.getLogger("lexp")

#: What ``device=`` accepts (``cuda:N`` for any N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

_ACCELERATOR_TO_DEVICE = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


def _fix_hint() -> str:
    return (
        "Fix: run on a machine with a CUDA GPU and a CUDA build of torch, or use device=cpu "
        "(device=auto picks the GPU when there is one)."
    )


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` a setting names: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

    ``auto`` (or None) is ``cuda:0`` when torch sees a GPU, else the CPU. A CUDA device that is
    not there raises :class:`LexpInputError` naming what torch sees and the fix.
    """
    if isinstance(spec, torch.device):
        text = str(spec)
    else:
        text = "auto" if spec is None else str(spec).strip().lower()
    if text == "gpu":
        text = "cuda"
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise LexpInputError(
            f"device={spec!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LexpInputError(
            f"device={spec!r}: lexp runs on the CPU or on CUDA GPUs; use one of {', '.join(DEVICE_CHOICES)}"
        )
    if not torch.cuda.is_available():
        built = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise LexpInputError(f"device={spec!r} asks for a GPU, but {built}. {_fix_hint()}")
    index = 0 if device.index is None else int(device.index)
    count = torch.cuda.device_count()
    if index >= count:
        raise LexpInputError(
            f"device={spec!r}: torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}); "
            f"use device=cuda:0{'' if count == 1 else f'..cuda:{count - 1}'} or device=auto"
        )
    return torch.device("cuda", index)


def resolve_run_device(device: Any, trainer: Mapping[str, Any] | None = None) -> torch.device:
    """The run's device from ``device=`` and the trainer's ``accelerator`` (``trainer=gpu``).

    ``device=auto`` follows an explicit ``trainer.accelerator`` (``gpu``/``cuda`` → ``cuda``,
    ``cpu`` → ``cpu``); an explicit device that contradicts the accelerator is an error, so a
    command never runs somewhere else than it says.
    """
    accelerator = str((trainer or {}).get("accelerator", "auto") or "auto").strip().lower()
    if accelerator not in _ACCELERATOR_TO_DEVICE:
        raise LexpInputError(
            f"trainer.accelerator={accelerator!r}: lexp runs on cpu or gpu (cuda); set device=cpu|cuda|cuda:N "
            "instead (trainer.accelerator then follows it)"
        )
    wanted = "auto" if device is None else str(device).strip().lower()
    if wanted.startswith("cuda:") and _several(trainer):
        raise LexpInputError(
            f"device={device} names one GPU, but trainer.devices={(trainer or {}).get('devices')} asks Lightning "
            "for several (DDP fine-tuning), which would take GPUs 0..k-1 whatever device says; set device=cuda "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1,2)"
        )
    implied = _ACCELERATOR_TO_DEVICE[accelerator]
    if wanted == "auto":
        return resolve_device(implied)
    resolved = resolve_device(wanted)
    if implied != "auto" and resolved.type != implied:
        raise LexpInputError(
            f"device={device} contradicts trainer.accelerator={accelerator} (trainer="
            f"{'gpu' if implied == 'cuda' else 'cpu'}); set only one of them, e.g. device={resolved} alone"
        )
    return resolved


def _several(trainer: Mapping[str, Any] | None) -> bool:
    """Whether ``trainer.devices`` asks for more than one device (DDP fine-tuning)."""
    devices = (trainer or {}).get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices > 1 or devices == -1  # -1: every GPU
    return isinstance(devices, (list, tuple)) and len(devices) > 1


def trainer_device_kwargs(device: torch.device, trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Lightning ``accelerator``/``devices`` for the run's device.

    Several devices (``trainer.devices=2``, DDP fine-tuning) are kept as given on the device's
    accelerator; otherwise the Trainer gets exactly the run's device (``devices=[N]`` for ``cuda:N``).
    """
    devices = (trainer or {}).get("devices", 1)
    several = _several(trainer)
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": devices if several else [device.index or 0]}
    return {"accelerator": "cpu", "devices": devices if several else 1}


def describe_device(device: torch.device, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """What results.json records: the device, its name, and the compute dtype when given."""
    out: dict[str, Any] = {"device": str(device), "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["name"] = props.name
        out["memory_gib"] = round(props.total_memory / 2**30, 1)
        out["cuda"] = torch.version.cuda
        out["tf32_matmul"] = torch.backends.cuda.matmul.fp32_precision == "tf32"
    else:
        import platform

        out["name"] = platform.processor() or platform.machine()
        out["threads"] = torch.get_num_threads()
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


_LOGGED: set[tuple[str, str]] = set()


def log_stage_device(
    stage: str, device: torch.device, dtype: torch.dtype | str | None = None
) -> dict[str, Any]:
    """Log once per (stage, device) which device and dtype a stage runs on; returns the description."""
    info = describe_device(device, dtype)
    key = (stage, str(device))
    if key not in _LOGGED:
        _LOGGED.add(key)
        extra = f", {info['dtype']}" if "dtype" in info else ""
        log.info("%s on %s (%s%s)", stage, info["device"], info["name"], extra)
    return info


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype active for the device's type (Lightning's ``bf16-mixed``), else None."""
    kind = device.type if isinstance(device, torch.device) else str(device)
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): call before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_float32_matmul(enabled: bool = True) -> Iterator[None]:
    """TF32 off for CUDA float32 matrix products inside the block, the caller's setting restored after.

    Only torch's ``fp32_precision`` API is used: once anything (a notebook, transformers'
    ``enable_tf32``) set the new API, torch refuses to read the legacy flags (``allow_tf32``,
    ``torch.get_float32_matmul_precision()``) and raises. No effect on the CPU's float32 products.
    """
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before
