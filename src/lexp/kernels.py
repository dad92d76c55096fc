"""Compiled kernels for the probes' training step: ``kernels.c``, built on first use, loaded with ctypes.

Why: in the layer step (13 probes, 640K weights) a training step is two matrix products per block
plus about a dozen memory-bound passes — softmax, the cross-entropy gradient, the ElasticNet
subgradient, Adam and the next step's penalty. ``kernels.c`` does them in two passes.
:class:`lexp.probes.FusedHeads` and :class:`lexp.probes.ElasticNetAdam` call these functions when the
library is available. Otherwise they use torch operations for the same maths: slower, and equal up
to float rounding (the tests check both paths against each other).

The library is compiled once per machine with the C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``; ``-O3 -march=native -fopenmp``, with fallbacks when a flag is refused) into
``$LEXP_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/lexp/kernels`` or ``~/.cache/lexp/kernels``). Its
key is a hash of the source, the compiler and the CPU's feature flags, so it is never stale and
never built for another CPU. ``LEXP_KERNELS=0`` switches it off. It shares torch's OpenMP runtime,
so ``torch.set_num_threads`` applies to it, and its results do not depend on the number of threads.

Loading a shared library runs its code, so nothing is loaded that another user could have
written (issue 12, case 6). The directory is created 0700; before anything in it is loaded it must
be owned by this user and not writable by group or others; every parent must be owned by this user
or root and not world-writable unless sticky (like /tmp). Otherwise the library is built into a private
``tempfile.mkdtemp`` directory for this process, with one warning saying how to fix the
directory. Each build writes ``lexp_kernels-<key>.json`` beside the library, recording the
library's file name (``lexp_kernels-<key>-<sha256[:16]>.so``) and its sha256; before loading, the
record and the library must be regular files (not symlinks) with the same owner and mode rules,
and the library's bytes must hash to the recorded sha256. A library that fails these checks is
refused; one that fails to load (``dlopen`` error, a missing symbol) is passed over. Either way
the probes fall back to the torch operations with one warning, never a traceback.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Chunks",
    "HeadSlots",
    "adam_elasticnet",
    "available",
    "cache_dir",
    "chunks",
    "head_slots",
    "library",
    "threads",
    "unavailable_reason",
    "xent_heads",
]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.c")
#: compiler flag sets, tried in order: the first that builds and loads wins
_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_reason: dict[str, str] = {}
#: what the last _load() worked around (an unsafe directory), told in library()'s one warning
_notes: list[str] = []

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def cache_dir() -> Path:
    """Where built libraries go: ``$LEXP_KERNEL_DIR``, else ``$XDG_CACHE_HOME/lexp/kernels``."""
    env = os.environ.get("LEXP_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lexp" / "kernels"


def _cpu_tag() -> str:
    """The CPU features ``-march=native`` compiles for (part of the library's name)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()[-800:]}")


class _Refused(Exception):
    """A library that must not be loaded: foreign owner, writable by others, a symlink, changed bytes."""


def _uid() -> int:
    """The user that must own the kernel directory and library (a hook for tests, which run as root)."""
    return os.geteuid()


def _unsafe(st: os.stat_result, path: Path | str) -> str | None:
    """Why a file or directory with this ``stat`` could hold code from someone else, else ``None``."""
    if st.st_uid != _uid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {_uid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_dir(directory: Path) -> str | None:
    """Create ``directory`` (0700) if missing; ``None`` when code in it is safe to load, else why not.

    The directory must be this user's and not writable by group or others. Every parent must be
    owned by this user or root and, when world-writable, sticky (like /tmp): otherwise another user
    could rename the directory away and put their own in its place. Group-writable parents are
    accepted (with a umask of 002, ``~/.cache`` is group-writable for the user's own group).
    Parents this function creates are made 0700 as well. Both the path as given and its
    symlink-resolved form are checked.
    """
    try:
        if not directory.exists():
            missing = [p for p in (directory, *directory.parents) if not p.exists()]
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for made in missing:
                os.chmod(made, 0o700)  # whatever the umask
        real = directory.resolve(strict=True)
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            return f"{directory} is not a directory"
        why = _unsafe(st, directory)
        if why:
            return why
        for parent in dict.fromkeys([*directory.absolute().parents, *real.parents]):
            pst = os.stat(parent)
            if pst.st_uid not in (0, _uid()):
                return f"its parent {parent} is owned by uid {pst.st_uid}, not by this user or root"
            if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
                return f"its parent {parent} is writable by everyone and not sticky"
    except OSError as err:
        return f"cannot create or inspect {directory}: {err}"
    return None


def _record_path(directory: Path, key: str) -> Path:
    return directory / f"lexp_kernels-{key}.json"


def _open_checked(path: Path) -> int:
    """An fd of ``path`` opened without following a symlink, after the owner and mode checks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _Refused(f"{path} is a symbolic link") from err
        raise
    st = os.fstat(fd)
    why = None if stat.S_ISREG(st.st_mode) else f"{path} is not a regular file"
    why = why or _unsafe(st, path)
    if why:
        os.close(fd)
        raise _Refused(why)
    return fd


def _read_record(directory: Path, key: str) -> dict | None:
    """The build record of ``key`` (``None``: not built here yet), checked like the library."""
    path = _record_path(directory, key)
    try:
        fd = _open_checked(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as fh:
        try:
            record = json.load(fh)
        except ValueError as err:
            raise _Refused(f"{path} is not a valid build record ({err})") from err
    name = record.get("library") if isinstance(record, dict) else None
    digest = record.get("sha256") if isinstance(record, dict) else None
    if not (
        isinstance(name, str)
        and re.fullmatch(rf"lexp_kernels-{key}-[0-9a-f]{{16}}\.so", name)
        and isinstance(digest, str)
        and re.fullmatch(r"[0-9a-f]{64}", digest)
        and name.endswith(f"-{digest[:16]}.so")
    ):
        raise _Refused(f"{path} is not a valid build record (library name or sha256 malformed)")
    return record


def _verified(directory: Path, record: dict) -> Path | None:
    """The library of ``record`` after its checks and a sha256 of its bytes; ``None`` if it is gone."""
    path = directory / record["library"]
    try:
        fd = _open_checked(path)
    except FileNotFoundError:
        return None
    try:
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
        checked = os.fstat(fd)
    finally:
        os.close(fd)
    if h.hexdigest() != record["sha256"]:
        raise _Refused(
            f"{path} changed after it was built (sha256 {h.hexdigest()[:16]}…, recorded "
            f"{record['sha256'][:16]}…)"
        )
    now = os.lstat(path)  # the name still points at the file that was hashed
    if stat.S_ISLNK(now.st_mode) or (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
        raise _Refused(f"{path} was replaced while it was being checked")
    return path


def _build(cc: str, flags: tuple[str, ...], directory: Path, key: str) -> dict:
    """Compile the two halves (the softmax one with -ffast-math, for vectorised expf), link, and
    move the library and then its build record into place (each rename is atomic, and the
    library's name holds its own hash, so concurrent builders never see half a file or a record
    of another builder's bytes)."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        common = [cc, "-O3", "-fPIC", "-fno-math-errno", *flags, "-c", str(_SOURCE)]
        _run([*common, "-o", f"{tmp}/adam.o"])
        _run([*common, "-ffast-math", "-DLEXP_FAST_MATH", "-o", f"{tmp}/xent.o"])
        link = [f for f in flags if f == "-fopenmp"]
        _run([cc, "-shared", *link, f"{tmp}/adam.o", f"{tmp}/xent.o", "-o", f"{tmp}/lib.so", "-lm"])
        os.chmod(f"{tmp}/lib.so", 0o700)  # never group/world-writable, whatever the umask
        digest = hashlib.sha256(Path(f"{tmp}/lib.so").read_bytes()).hexdigest()
        record = {
            "library": f"lexp_kernels-{key}-{digest[:16]}.so",
            "sha256": digest,
            "flags": list(flags),
            "compiler": cc,
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(f"{tmp}/record.json", "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(f"{tmp}/record.json", 0o600)
        os.replace(f"{tmp}/lib.so", directory / record["library"])
        os.replace(f"{tmp}/record.json", _record_path(directory, key))
    return record


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.lexp_kernel_threads.restype = ctypes.c_int
    lib.lexp_kernel_threads.argtypes = []
    lib.lexp_adam_elasticnet.restype = None
    lib.lexp_adam_elasticnet.argtypes = [_P, _P, _P, _P, _I, _P, _P, _P, _I, _P, *[_F] * 7, _P, _P, _P, _P]
    lib.lexp_xent_heads.restype = None
    lib.lexp_xent_heads.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _P]
    return lib


def _identity(cc: str) -> str:
    """What a library depends on besides its flags: source, compiler version, CPU, torch."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    return "\0".join([_SOURCE.read_text(), version, _cpu_tag(), torch.__version__])


def _key(identity: str, flags: tuple[str, ...]) -> str:
    """The 16-hex key in the names of a library and its build record."""
    return hashlib.sha256(f"{identity}\0{' '.join(flags)}".encode()).hexdigest()[:16]


def _private_dir() -> Path:
    """A fresh 0700 directory for this process only (removed at exit; a loaded library stays mapped)."""
    path = Path(tempfile.mkdtemp(prefix="lexp-kernels-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _load() -> ctypes.CDLL | None:
    """Build or find, check and load the library; ``None`` with ``_reason`` (and ``_notes``) set."""
    _reason.pop("why", None)
    _notes.clear()
    if os.environ.get("LEXP_KERNELS", "1").strip().lower() in {"0", "false", "off", "no"}:
        _reason["why"] = "switched off by LEXP_KERNELS=0"
        return None
    cc = _compiler()
    if cc is None:
        _reason["why"] = "no C compiler found (set CC, or install gcc or clang)"
        return None
    try:
        identity = _identity(cc)
    except OSError as err:
        _reason["why"] = f"{cc} --version failed: {err}"
        return None
    directory = cache_dir()
    why = _check_dir(directory)
    if why is not None:
        private = _private_dir()
        _notes.append(
            f"the kernel directory {directory} is not safe to load compiled code from ({why}), so the "
            f"library is built into the private directory {private} for this run; fix: `chmod 700` the "
            "directory if it is yours, or set LEXP_KERNEL_DIR to a directory only you own"
        )
        directory = private
    errors = []
    for flags in _VARIANTS:
        key = _key(identity, flags)
        try:
            record = _read_record(directory, key)
            path = _verified(directory, record) if record is not None else None
            if path is None:
                path = _verified(directory, _build(cc, flags, directory, key))
            if path is None:
                raise RuntimeError(f"the library built in {directory} disappeared before it was loaded")
            return _declare(ctypes.CDLL(str(path)))
        except _Refused as err:
            _reason["why"] = f"refused to load the compiled library: {err}; delete it to rebuild"
            return None
        except (OSError, RuntimeError, AttributeError, ValueError) as err:  # not built / not loadable
            errors.append(f"{type(err).__name__}: {err}")
    _reason["why"] = "could not build or load kernels.c: " + " | ".join(errors)[-2000:]
    return None


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; ``None`` when unavailable (the reason is logged once)."""
    with _lock:
        if "lib" not in _loaded:
            try:
                _loaded["lib"] = _load()
            except Exception as err:  # never a traceback: the torch path computes the same maths
                _loaded["lib"] = None
                _reason["why"] = f"unexpected error while loading: {type(err).__name__}: {err}"
            notes = "".join(f"{note}; " for note in _notes)
            if _loaded["lib"] is None:
                log.warning(
                    "lexp.kernels: %s%s; probes use torch operations (slower, same maths)",
                    notes,
                    _reason["why"],
                )
            elif notes:
                log.warning("lexp.kernels: %s", notes.removesuffix("; "))
        return _loaded["lib"]


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (after it did), else ``None``."""
    return _reason.get("why")


def threads() -> int:
    """The number of OpenMP threads the kernels use (torch's when the runtime is shared)."""
    lib = library()
    return int(lib.lexp_kernel_threads()) if lib is not None else 0


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(
            f"lexp.kernels: the library is unavailable ({_reason.get('why')}); check available() first"
        )
    return lib


def _check(t: Tensor, dtype: torch.dtype, name: str) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(
            f"lexp.kernels: {name} must be a contiguous CPU {dtype} tensor, got {t.dtype} {t.device}"
        )
    return t.data_ptr()


class Chunks(NamedTuple):
    """Chunks of a flat weight of ``size`` elements: ``start``, ``length``, ``head`` (int64), made by
    :func:`chunks` — checked once, so the per-step call need not check them."""

    start: Tensor
    length: Tensor
    head: Tensor
    size: int
    n_heads: int


def chunks(segments: Sequence[tuple[int, int, int]], size: int, chunk: int = 4096) -> Chunks:
    """Split ``(start, length, head)`` segments of a flat weight of ``size`` elements into chunks of
    at most ``chunk`` elements that never straddle two segments (the work items of
    :func:`adam_elasticnet`)."""
    if not segments:
        raise ValueError("lexp.kernels.chunks: no segments; a weight needs at least one")
    start, length, head = [], [], []
    for a, n, h in segments:
        if a < 0 or n < 1 or a + n > size or h < 0:
            raise ValueError(f"lexp.kernels.chunks: segment ({a}, {n}, head {h}) outside a weight of {size}")
        for offset in range(0, n, chunk):
            start.append(a + offset)
            length.append(min(chunk, n - offset))
            head.append(h)
    tables = [torch.tensor(v, dtype=torch.int64) for v in (start, length, head)]
    return Chunks(*tables, size=int(size), n_heads=max(head) + 1)


def adam_elasticnet(
    w: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    table: Chunks,
    head_norm: Tensor,
    *,
    l1: float,
    l2: float,
    step_size: float,
    beta1: float,
    beta2: float,
    bc2_sqrt: float,
    eps: float,
    w_low: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Adam step of the flat weight ``w`` on ``grad`` + the ElasticNet subgradient
    ``l1·sign(w) + l2·w/head_norm[h]``, in place (see ``kernels.c``). Returns the new weights'
    ``Σ|W_h|`` and ``‖W_h‖₂`` per head (float32). ``w_low``: a bfloat16 copy of ``w`` to refresh
    in the same pass."""
    lib = _required()
    if not isinstance(table, Chunks):
        raise TypeError("lexp.kernels.adam_elasticnet: make the chunk table with lexp.kernels.chunks()")
    if not (w.numel() == grad.numel() == exp_avg.numel() == exp_avg_sq.numel() == table.size):
        raise ValueError(
            "lexp.kernels.adam_elasticnet: weight, grad, Adam states and chunk table differ in size"
        )
    if head_norm.numel() != table.n_heads:
        raise ValueError(f"lexp.kernels.adam_elasticnet: {head_norm.numel()} norms for {table.n_heads} heads")
    if w_low is not None and w_low.numel() != table.size:
        raise ValueError("lexp.kernels.adam_elasticnet: w_low differs in size from the weight")
    n = table.start.numel()
    out_abs, out_norm = torch.empty(table.n_heads), torch.empty(table.n_heads)
    scratch = torch.empty(2 * (n + table.n_heads), dtype=torch.float64)
    lib.lexp_adam_elasticnet(
        _check(w, torch.float32, "w"),
        _check(grad, torch.float32, "grad"),
        _check(exp_avg, torch.float32, "exp_avg"),
        _check(exp_avg_sq, torch.float32, "exp_avg_sq"),
        n,
        table.start.data_ptr(),
        table.length.data_ptr(),
        table.head.data_ptr(),
        table.n_heads,
        _check(head_norm, torch.float32, "head_norm"),
        l1,
        l2,
        step_size,
        beta1,
        beta2,
        bc2_sqrt,
        eps,
        scratch.data_ptr(),
        out_abs.data_ptr(),
        out_norm.data_ptr(),
        None if w_low is None else _check(w_low, torch.bfloat16, "w_low"),
    )
    return out_abs, out_norm


class HeadSlots(NamedTuple):
    """Which K-row slots of the stacked products every head reads (``head_ptr``, ``slot_row``), made
    by :func:`head_slots` — checked once."""

    head_ptr: Tensor
    slot_row: Tensor
    n_rows: int
    n_outputs: int


def head_slots(slots: Sequence[Sequence[int]], n_rows: int, n_outputs: int) -> HeadSlots:
    """Per head, the first stacked row of each slot it reads (a slot is ``n_outputs`` rows)."""
    for rows in slots:
        if not rows or any(r < 0 or r + n_outputs > n_rows for r in rows):
            raise ValueError(f"lexp.kernels.head_slots: slots {list(rows)} outside {n_rows} rows")
    head_ptr = torch.tensor(np.cumsum([0] + [len(r) for r in slots]), dtype=torch.int64)
    slot_row = torch.tensor([r for rows in slots for r in rows], dtype=torch.int64)
    return HeadSlots(head_ptr, slot_row, int(n_rows), int(n_outputs))


def xent_heads(products: Tensor, bias: Tensor, y: Tensor, slots: HeadSlots) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of every classification head and its gradients (see ``kernels.c``).

    ``products`` (R, n) stacked block products; ``bias`` (H, K); ``y`` (n,) class ids, which must be
    in [0, K) (checked by the caller: the kernel indexes with them). Returns the loss gradient
    w.r.t. the products (R, n; the 1/n of the mean included), the loss (H,) and the bias
    gradient (H, K).
    """
    lib = _required()
    if not isinstance(slots, HeadSlots):
        raise TypeError("lexp.kernels.xent_heads: make the slot table with lexp.kernels.head_slots()")
    n_heads, k = bias.shape
    n = y.numel()
    if products.dim() != 2 or products.shape != (slots.n_rows, n):
        raise ValueError(
            f"lexp.kernels.xent_heads: products must be ({slots.n_rows}, {n}), got {tuple(products.shape)}"
        )
    if slots.head_ptr.numel() != n_heads + 1 or k != slots.n_outputs:
        raise ValueError("lexp.kernels.xent_heads: the slot table does not match the bias (H, K)")
    out_grad = torch.empty_like(products)
    loss, bias_grad = torch.empty(n_heads), torch.empty(n_heads, k)
    scratch = torch.empty(n_heads * ((n + 31) // 32) * (k + 1))
    lib.lexp_xent_heads(
        _check(products, torch.float32, "products"),
        _check(bias, torch.float32, "bias"),
        _check(y, torch.int64, "y"),
        n_heads,
        k,
        n,
        slots.head_ptr.data_ptr(),
        slots.slot_row.data_ptr(),
        out_grad.data_ptr(),
        loss.data_ptr(),
        bias_grad.data_ptr(),
        scratch.data_ptr(),
    )
    return out_grad, loss, bias_grad
