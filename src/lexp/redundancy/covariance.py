"""One streaming pass over an activation matrix → mean and co-moment of every neuron pair.

General redundancy (paper Section 5) needs two things from the T × N activations: the Pearson
correlation of every neuron pair (correlation clustering) and the centred cross-products of every
pair of layers (linear CKA). Both are functions of the same N × N co-moment matrix
``C = Σ_t (x_t − x̄)(x_t − x̄)ᵀ``, so a single chunked pass over the rows serves both.

Numerics. Each chunk is centred on its own (float32) mean before the product, so the GEMM only
sees deviations — an activation with mean 1e4 and std 1 loses nothing — and the chunks are
merged exactly by the law of total covariance (Chan et al.): with chunk counts ``n_c``, means
``m_c``, the shift ``a_c`` actually subtracted and ``v_c = m_c − a_c``::

    C = Σ_c G_c + Σ_c n_c (m_c − m)(m_c − m)ᵀ − Σ_c n_c v_c v_cᵀ,    G_c = Σ_{t∈c} (x_t − a_c)(x_t − a_c)ᵀ

The two low-rank sums are applied once at the end (one k × N GEMM, k = number of chunks). ``G_c``
is computed in float32 (OpenBLAS ``ssyrk``) or bfloat16 (torch GEMMs over the upper block
triangle) and accumulated into a float64 ``C`` (bfloat16: the products, already rounded to
bfloat16, are summed in float32 and added to ``C`` once), whose upper triangle is mirrored at the end.
Memory: the float64 ``C`` (N² × 8 bytes, 0.8 GB at BERT-base size, N = 9,984), one reused float32
chunk buffer (0.65 GB at 16,384 rows) and the product (float32: an N × N float32 buffer, 0.4 GB;
bfloat16: the N × N float32 sum, 0.4 GB, a reused bfloat16 chunk and one block row) — never a
float64 copy of the activations. Pages of a memory-mapped file are dropped
from the resident set as soon as their chunk is copied.

``compute="bfloat16"`` rounds the centred chunk to bfloat16 and runs the product on the CPU's
BF16 units (measured ≈ 2× the CPU throughput of float32 ``ssyrk`` on this AVX-512-BF16 host,
even though it computes ~54% of the full product rather than one exact triangle). The product
block comes back rounded to bfloat16 (relative error ≤ 2⁻⁹ per chunk, averaging out over
chunks); correlations then differ from float32 by ~1e-4–2e-3, which moves only merges whose
height lies that close to ct. Measured: identical flat clusters at every ct in 0.1–0.9 on the
data of tests/test_covariance.py (max |Δcorr| 2.4e-3); adjusted Rand 0.9999 against float32 at
150,000 × 9,984 and ct = 0.3 (benchmarks/bench_clustering.py).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.linalg import blas

from lexp.device import exact_float32_matmul
from lexp.errors import LexpInputError

__all__ = [
    "Moments",
    "constant_columns",
    "correlation",
    "covariance",
    "load_moments",
    "save_moments",
    "streaming_moments",
]

Compute = Literal["float32", "bfloat16"]

#: Rows of the float64 result processed at a time by the blockwise N × N passes (80 MB at N=10⁴).
_ROW_BLOCK = 1024
#: Columns per block of the blocked XᵀX: more blocks skip more of the lower triangle ((nb + 1) / 2nb
#: of the full product is computed), fewer blocks make larger GEMMs. At N = 9,984 and 16,384-row
#: chunks, 384 was ~2% faster than 768 for bfloat16 (51.9% vs 53.8% of the product).
_GEMM_BLOCK = 384
#: A column is constant when its standard deviation is below this fraction of |mean| — far below
#: float32 resolution (1.2e-7), far above float64 rounding of the mean (1e-16).
_CONSTANT_RTOL = 1e3 * np.finfo(np.float64).eps

_COMPUTE = ("float32", "bfloat16")


@runtime_checkable
class ChunkSource(Protocol):
    """Anything that streams float32 row blocks, e.g. :class:`lexp.store.Store`."""

    def iter_chunks(self, chunk_rows: int, columns: np.ndarray | None) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True)
class Moments:
    """First and second central moments of N neurons over ``n`` rows (float64).

    ``comoment`` is the un-normalised centred cross-product ``Σ (x − mean)(x − mean)ᵀ``; divide by
    ``n − ddof`` for the covariance (:func:`covariance`), or normalise for :func:`correlation`.
    """

    n: int
    mean: np.ndarray
    comoment: np.ndarray
    #: Widths of the consecutive column groups (layers) of :attr:`row_norm_products`, or None.
    layer_sizes: tuple[int, ...] | None = None
    #: (G, G) float64 ``Q[A, B] = Σ_t ‖x̄_t^A‖² ‖x̄_t^B‖²`` over the rows, x̄ centred on ``mean``
    #: and cut into ``layer_sizes`` groups: the extra term of the debiased CKA
    #: (:mod:`lexp.redundancy.cka`). Present when the pass was given ``layer_sizes``.
    row_norm_products: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_feat = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.mean.ndim != 1 or self.comoment.shape != (n_feat, n_feat):
            raise LexpInputError(
                f"Moments: mean must be (N,) and comoment (N, N), got {self.mean.shape} and "
                f"{self.comoment.shape}; build moments with streaming_moments() or load_moments()"
            )
        if (self.layer_sizes is None) != (self.row_norm_products is None):
            raise LexpInputError(
                "Moments: layer_sizes and row_norm_products go together; give both or neither"
            )
        if self.layer_sizes is not None:
            g = len(self.layer_sizes)
            if sum(self.layer_sizes) != n_feat or np.shape(self.row_norm_products) != (g, g):
                raise LexpInputError(
                    f"Moments: layer_sizes {list(self.layer_sizes)} must sum to the {n_feat} neurons and "
                    f"row_norm_products be ({g}, {g}), got {np.shape(self.row_norm_products)}; recompute "
                    "the moments with streaming_moments(..., layer_sizes=...)"
                )

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])


# --------------------------------------------------------------------------------------------
# The streaming pass
# --------------------------------------------------------------------------------------------


def _source_name(source: object) -> str:
    """A human-readable name for error messages: the file behind a memmap or a store."""
    for attr in ("filename", "path"):
        name = getattr(source, attr, None)
        if name:
            return str(name)
    return f"<{type(source).__name__}>"


def _check_columns(columns: Sequence[int] | np.ndarray | None, n_cols: int, name: str) -> np.ndarray | None:
    if columns is None:
        return None
    cols = np.asarray(columns)
    if cols.ndim != 1 or cols.size == 0 or not np.issubdtype(cols.dtype, np.integer):
        raise LexpInputError(
            f"{name}: columns must be a non-empty 1-D array of integer neuron indices, got "
            f"shape {cols.shape} dtype {cols.dtype}; pass e.g. store.layer_columns([0, 1])"
        )
    if cols.min() < 0 or cols.max() >= n_cols:
        raise LexpInputError(
            f"{name}: columns must lie in [0, {n_cols}), got min {cols.min()} max {cols.max()}; "
            "pass indices of existing neurons"
        )
    return cols.astype(np.int64, copy=False)


def _release_rows(x: np.ndarray, start: int, stop: int) -> None:
    """Drop the pages of rows [start, stop) of a memmap from this process's resident set.

    MADV_DONTNEED on a read-only file mapping leaves the data in the page cache and unchanged; it
    only keeps a streaming pass from showing the whole file in the RSS (as lexp.store does).
    """
    mm = getattr(x, "_mmap", None)
    flag = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or flag is None or mm.closed or stop <= start:
        return
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    first = x.ctypes.data - base + start * x.strides[0]
    last = x.ctypes.data - base + stop * x.strides[0]
    lo = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE  # keep pages shared with neighbouring rows
    hi = last // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(flag, lo, hi - lo)


def _array_chunks(x: np.ndarray, chunk_rows: int, cols: np.ndarray | None) -> Iterator[np.ndarray]:
    """float32 copies of the row blocks of a 2-D array or memmap, for the consumer to modify.

    Every block is written into the SAME buffer, so the consumer must be done with a block before
    it asks for the next one (streaming_moments centres it in place and has converted or used it
    by then). Reusing one buffer matters: a fresh 0.3 GB block per chunk costs ~10× the copy in
    page faults on a virtual machine (measured here: 0.4–0.7 s vs 0.03–0.04 s per 8,192 × 9,984
    chunk). A contiguous column range is read as a slice; the file pages of a memmap are released
    from the resident set once copied.
    """
    sel: slice | np.ndarray | None = cols
    if cols is not None and np.array_equal(cols, np.arange(cols[0], cols[0] + cols.size)):
        sel = slice(int(cols[0]), int(cols[0]) + cols.size)
    n_cols = x.shape[1] if cols is None else cols.size
    buffer = np.empty((min(chunk_rows, x.shape[0]), n_cols), dtype=np.float32)
    file_pos = _file_position(x) if sel is None and x.dtype == np.float32 else None
    with open(x.filename, "rb", buffering=0) if file_pos is not None else contextlib.nullcontext() as raw:
        for start in range(0, x.shape[0], chunk_rows):
            stop = min(start + chunk_rows, x.shape[0])
            out = buffer[: stop - start]
            if raw is not None:
                _read_exactly(raw, file_pos + start * x.strides[0], out, x.filename)
            else:
                np.copyto(out, x[start:stop] if sel is None else x[start:stop, sel], casting="same_kind")
                _release_rows(x, start, stop)
            yield out


def _file_position(x: np.ndarray) -> int | None:
    """Byte offset in its file of row 0 of a C-contiguous np.memmap (a view of one too), else None.

    Such rows are read with ``read()`` straight into the chunk buffer: no page faults on the
    mapping (measured: 0.8 s instead of 3.9 s for 6 GB in the page cache).
    """
    mm = getattr(x, "_mmap", None)
    filename = getattr(x, "filename", None)
    if mm is None or mm.closed or not filename or not x.flags.c_contiguous:
        return None
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    mapped_from = int(x.offset) - int(x.offset) % mmap.ALLOCATIONGRANULARITY  # where the mapping starts
    return mapped_from + (x.ctypes.data - base)


def _read_exactly(raw: Any, position: int, out: np.ndarray, filename: str) -> None:
    raw.seek(position)
    view = out.reshape(-1).view(np.uint8)
    done = 0
    while done < view.size:
        n = raw.readinto(view[done:])
        if not n:
            raise LexpInputError(
                f"{filename}: the file ended {view.size - done} bytes early while reading rows at byte "
                f"{position}; it was truncated after it was opened — recreate it"
            )
        done += n


def _iter_source(
    source: np.ndarray | ChunkSource, chunk_rows: int, columns: Sequence[int] | np.ndarray | None
) -> tuple[Iterator[np.ndarray], int | None, str, bool]:
    """(chunk iterator, number of rows if known, name, whether the chunks are ours to modify)."""
    name = _source_name(source)
    if isinstance(source, ChunkSource):
        n_cols = getattr(source, "n_neurons", None)
        cols = (
            _check_columns(columns, int(n_cols), name)
            if n_cols is not None
            else (None if columns is None else np.asarray(columns))
        )
        return source.iter_chunks(chunk_rows, cols), getattr(source, "n_rows", None), name, False
    if not isinstance(source, np.ndarray) or source.ndim != 2:
        raise LexpInputError(
            f"{name}: streaming_moments needs a 2-D array (rows × neurons), an np.memmap or an object "
            f"with iter_chunks(); got {type(source).__name__} with shape {getattr(source, 'shape', None)}"
        )
    if not np.issubdtype(source.dtype, np.floating):
        raise LexpInputError(
            f"{name}: activations must be floating point (float16/float32), got {source.dtype}"
        )
    cols = _check_columns(columns, source.shape[1], name)
    return _array_chunks(source, chunk_rows, cols), source.shape[0], name, True


def _raise_not_finite(chunk: np.ndarray, row0: int, name: str) -> None:
    bad = ~np.isfinite(chunk)
    r, c = np.argwhere(bad)[0]
    raise LexpInputError(
        f"{name}: row {row0 + int(r) + 1} (1-based), column {int(c)} is {chunk[r, c]} "
        f"({int(bad.sum())} non-finite values in rows {row0 + 1}–{row0 + chunk.shape[0]}); "
        "activations must be finite — re-extract the store (float16 overflows above 65504: "
        "use extract.dtype=float32)"
    )


def _gram_upper_into(acc: torch.Tensor, x: torch.Tensor, syrk_out: np.ndarray | None = None) -> None:
    """acc[i-block, i-block:] += x[:, i-block]ᵀ x[:, i-block:] for every column block i.

    bfloat16: the blocked upper triangle of xᵀx with torch GEMMs (torch has no syrk); a result
    block is at most ``_GEMM_BLOCK × N``. float32 (``syrk_out`` given, a Fortran-ordered N × N
    float32 buffer): OpenBLAS ``ssyrk``, measured ≈ 20% faster here than torch's float32 GEMMs.
    """
    n = x.shape[1]
    if syrk_out is not None:
        # x is C-contiguous, so x.T is Fortran-contiguous (no copy); the lower triangle of the
        # Fortran-ordered product is the upper triangle of its C-ordered transpose.
        prod = blas.ssyrk(1.0, x.numpy().T, beta=0.0, c=syrk_out, trans=0, lower=1, overwrite_c=1)
        prod_t = torch.from_numpy(prod.T)
        for i0 in range(0, n, _GEMM_BLOCK):
            acc[i0 : i0 + _GEMM_BLOCK, i0:].add_(prod_t[i0 : i0 + _GEMM_BLOCK, i0:])
        return
    for i0 in range(0, n, _GEMM_BLOCK):
        i1 = min(i0 + _GEMM_BLOCK, n)
        acc[i0:i1, i0:].add_(x[:, i0:i1].T @ x[:, i0:])


def _check_layer_sizes(layer_sizes: Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if layer_sizes is None:
        return None
    sizes = tuple(int(s) for s in layer_sizes)
    if not sizes or min(sizes) < 1:
        raise LexpInputError(
            f"{name}: layer_sizes must be a non-empty list of column counts ≥ 1 (one per layer), got "
            f"{list(layer_sizes)}; e.g. [store.hidden] * store.n_layers"
        )
    return sizes


class _RowNorms:
    """Sums of per-row squared layer norms, accumulated beside the co-moment (debiased CKA).

    The debiased CKA (:mod:`lexp.redundancy.cka`) needs, per pair of layers A, B,
    ``Q_AB = Σ_t q_t^A q_t^B`` with ``q_t^A = ‖x_t^A − m^A‖²`` (``m``: the mean over all rows).
    ``m`` is unknown until the pass ends, so the rows are measured from a fixed shift ``a`` (the
    centre subtracted from the first chunk): ``u_t = x_t − a``, ``μ = m − a`` (small: ``a`` is
    already a mean). Per layer, ``q_t = r_t − 2 p_t + s`` with ``r_t = ‖u_t‖²``,
    ``p_t = u_tᵀμ`` and ``s = ‖μ‖²``. Expanding the product and summing over the n rows::

        Q_AB = Σ r^A r^B − 2 Σ r^A p^B − 2 Σ p^A r^B + 4 Σ p^A p^B
               + s^B Σ r^A + s^A Σ r^B − 2 s^B Σ p^A − 2 s^A Σ p^B + n s^A s^B

    and every sum is a small accumulator or a function of the co-moment ``C``:

    - ``Σ r^A r^B = (RᵀR)_AB`` with ``R`` the n × G matrix of the ``r_t`` (G = number of layers);
    - ``Σ r^A p^B = (RᵀU)_{A,B} μ^B``: the A row of ``RᵀU`` (G × N) over B's columns, dotted with μ^B;
    - ``Σ u uᵀ = C + n μμᵀ``, so ``Σ p^A p^B = μ^Aᵀ C_AB μ^B + n s^A s^B``;
    - ``Σ u = n μ``, so ``Σ p^A = n s^A``; ``Σ r^A = (Rᵀ1)_A``.

    Collected: ``Q = RᵀR − 2(P + Pᵀ) + 4 MᵀCM + (Rᵀ1)sᵀ + s(Rᵀ1)ᵀ + n s sᵀ`` with
    ``P_AB = Σ r^A p^B`` and ``M`` the N × G block matrix holding μ^A in layer A's rows.

    Each chunk arrives centred on its own centre ``c``, as the co-moment product sees it; with
    ``δ = c − a``, ``u = x + δ`` (float32, one reused buffer). Per chunk: one elementwise pass for
    ``u`` and ``r``, a float64 (n_c × G)ᵀ(n_c × G) product and a float32 (G × n_c)(n_c × N) GEMM —
    G/N of the co-moment product's FLOPs. Works on any torch device (both passes use it).
    """

    def __init__(self, sizes: tuple[int, ...], n_feat: int, device: torch.device, name: str) -> None:
        if sum(sizes) != n_feat:
            raise LexpInputError(
                f"{name}: layer_sizes {list(sizes)} sum to {sum(sizes)}, but the rows have {n_feat} "
                "columns; give one width per layer of the selected columns"
            )
        self.sizes = sizes
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.uniform = len(set(sizes)) == 1
        g = len(sizes)
        self.shift: torch.Tensor | None = None
        self.rr = torch.zeros((g, g), dtype=torch.float64, device=device)
        self.ru = torch.zeros((g, n_feat), dtype=torch.float64, device=device)
        self.r1 = torch.zeros(g, dtype=torch.float64, device=device)
        self.u: torch.Tensor | None = None  # reused float32 buffer for u = x + δ

    def _norms(self, u: torch.Tensor) -> torch.Tensor:
        """(n_c, G) float32: squared norm of each row's layer blocks."""
        if self.uniform:
            return torch.linalg.vector_norm(u.view(u.shape[0], len(self.sizes), -1), dim=2).square_()
        return torch.stack(
            [
                torch.linalg.vector_norm(u[:, lo:hi], dim=1)
                for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True)
            ],
            dim=1,
        ).square_()

    def add(self, x: torch.Tensor, centre: torch.Tensor) -> None:
        """One chunk: ``x`` float32 rows minus ``centre`` (float64, the values subtracted)."""
        if self.shift is None:
            self.shift = centre.clone()
        n_c = x.shape[0]
        if self.u is None or self.u.shape[0] < n_c:
            self.u = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        u = torch.add(x, (centre - self.shift).to(torch.float32), out=self.u[:n_c])
        r = self._norms(u)
        r64 = r.to(torch.float64)
        self.rr.addmm_(r64.T, r64)
        self.ru.add_(r.T.contiguous() @ u)  # (G × n_c)(n_c × N): memory-bound, ~1 read of u
        self.r1.add_(r64.sum(dim=0))

    def finish(self, comoment: torch.Tensor, mean: torch.Tensor, n: int) -> np.ndarray:
        """``Q`` (G × G, float64) from the sums, the final co-moment and its centre ``mean``."""
        assert self.shift is not None
        g = len(self.sizes)
        mu = mean - self.shift
        m = torch.zeros((mu.shape[0], g), dtype=torch.float64, device=mu.device)
        for k, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            m[lo:hi, k] = mu[lo:hi]
        s = (m * m).sum(dim=0)
        p = self.ru @ m  # P_AB = Σ r^A p^B
        q = self.rr - 2.0 * (p + p.T) + 4.0 * (m.T @ (comoment @ m))
        q += torch.outer(self.r1, s) + torch.outer(s, self.r1) + n * torch.outer(s, s)
        q = (q + q.T) / 2
        return q.cpu().numpy()


def _mirror_upper(c: np.ndarray) -> None:
    """Copy the block upper triangle onto the lower one so ``c`` is exactly symmetric."""
    n = c.shape[0]
    for i0 in range(0, n, _GEMM_BLOCK):
        i1 = min(i0 + _GEMM_BLOCK, n)
        diag = c[i0:i1, i0:i1]
        diag[np.tril_indices(i1 - i0, -1)] = diag.T[np.tril_indices(i1 - i0, -1)]
        c[i1:, i0:i1] = c[i0:i1, i1:].T


def streaming_moments(
    source: np.ndarray | ChunkSource,
    *,
    chunk_rows: int = 8192,
    columns: Sequence[int] | np.ndarray | None = None,
    compute: Compute = "float32",
    progress: bool = False,
    device: torch.device | str | None = None,
    layer_sizes: Sequence[int] | None = None,
) -> Moments:
    """Mean and co-moment of the selected neurons in ONE pass over the rows of ``source``.

    ``source``: a 2-D float16/float32 array or ``np.load(path, mmap_mode="r")``, or any object with
    ``iter_chunks(chunk_rows, columns)`` yielding float32 row blocks (:class:`lexp.store.Store`).
    ``columns``: neuron indices to keep (default all). ``compute``: dtype of the products —
    ``"float32"`` (exact to float32 rounding) or ``"bfloat16"`` (≈ 2× faster on BF16 CPUs; see
    the module docstring for its accuracy). Means, the chunk merge and ``C`` are float64; the
    bfloat16 products are summed in float32 first (their own rounding is 10⁴× larger).
    ``device``: where the products run — None or the CPU: the path above (OpenBLAS ``ssyrk``);
    a CUDA device: :func:`_moments_on_device` (chunks copied to the GPU, float32 products with
    TF32 off, merged in float64 on the GPU). The result is host float64 either way.
    ``layer_sizes``: widths of the consecutive layers of the (selected) columns, e.g.
    ``[hidden] * n_layers``; when given, the pass also accumulates the per-row layer norms the
    debiased CKA needs (:class:`_RowNorms`) and returns them as ``Moments.row_norm_products``.
    """
    if compute not in _COMPUTE:
        raise LexpInputError(f"streaming_moments: compute must be 'float32' or 'bfloat16', got {compute!r}")
    if chunk_rows < 1:
        raise LexpInputError(f"streaming_moments: chunk_rows must be ≥ 1, got {chunk_rows}")
    chunks, n_rows, name, owned = _iter_source(source, chunk_rows, columns)
    sizes = _check_layer_sizes(layer_sizes, name)
    bar = None
    if progress:  # a manual bar: wrapping the iterator would keep the previous chunk alive
        from tqdm.auto import tqdm

        total = None if n_rows is None else math.ceil(n_rows / chunk_rows)
        bar = tqdm(total=total, desc="covariance", unit="chunk")
    if device is not None and torch.device(device).type != "cpu":
        try:
            return _moments_on_device(chunks, torch.device(device), compute, name, bar, layer_sizes=sizes)
        finally:
            if bar is not None:
                bar.close()

    acc_np: np.ndarray | None = None
    acc: torch.Tensor | None = None
    syrk_out: np.ndarray | None = None  # float32 product buffer, reused across chunks
    bf16_buffer: torch.Tensor | None = None  # the bfloat16 chunk, reused across chunks
    centre_buffer: np.ndarray | None = None  # the centred chunk of a source we may not modify
    stage: torch.Tensor | None = None  # bfloat16: float32 sum of the chunk products (see below)
    norms: _RowNorms | None = None  # debiased CKA sums (layer_sizes given)
    counts: list[int] = []
    means: list[np.ndarray] = []  # a_c + v_c: the centre of the deviations the product saw
    exact_means: list[np.ndarray] = []  # the float64 mean of the input rows (reported)
    offsets: list[np.ndarray] = []  # v_c = m_c − a_c, float64
    row0 = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[0] == 0:
            raise LexpInputError(f"{name}: expected 2-D row blocks, got a chunk of shape {chunk.shape}")
        if acc_np is None:
            acc_np = np.zeros((chunk.shape[1], chunk.shape[1]), dtype=np.float64)
            acc = torch.from_numpy(acc_np)
            if sizes is not None:
                norms = _RowNorms(sizes, chunk.shape[1], torch.device("cpu"), name)
        elif chunk.shape[1] != acc_np.shape[0]:
            raise LexpInputError(
                f"{name}: chunk at row {row0 + 1} has {chunk.shape[1]} columns, earlier ones "
                f"{acc_np.shape[0]}; a source must keep its width"
            )
        shift = chunk.mean(axis=0, dtype=np.float64)
        if not np.isfinite(shift).all():
            _raise_not_finite(chunk, row0, name)
        n_c = chunk.shape[0]
        if owned:  # our own float32 copy: centre in place, then drop the name
            centred = np.subtract(chunk, shift.astype(np.float32), out=chunk)
        else:  # e.g. a store's chunk: centre into one reused buffer (see _array_chunks for why)
            if centre_buffer is None or centre_buffer.shape[0] < n_c:
                centre_buffer = np.empty(chunk.shape, dtype=np.float32)
            centred = np.subtract(chunk, shift.astype(np.float32), out=centre_buffer[:n_c], dtype=np.float32)
        del chunk
        # v_c: the mean of the float32 deviations the product sees (float64 sum, no copy). Under
        # bfloat16 the product sees them rounded; the resulting mismatch in C is second order
        # (n_c·δ², δ ≈ 2⁻⁹·std/√n_c: ~1e-10 relative) and is ignored.
        v = centred.sum(axis=0, dtype=np.float64) / n_c
        x = torch.from_numpy(centred)
        del centred
        if norms is not None:
            norms.add(x, torch.from_numpy(shift.astype(np.float32).astype(np.float64)))
        if compute == "bfloat16":
            # into one reused buffer: a fresh bfloat16 block per chunk costs ~0.25 s of page faults
            if bf16_buffer is None or bf16_buffer.shape[0] < n_c:
                bf16_buffer = torch.empty(x.shape, dtype=torch.bfloat16)
            x = bf16_buffer[:n_c].copy_(x)
        counts.append(n_c)
        offsets.append(v)
        means.append(shift.astype(np.float32).astype(np.float64) + v)
        exact_means.append(shift)
        if compute == "float32" and syrk_out is None:
            syrk_out = np.zeros(acc_np.shape, dtype=np.float32, order="F")
        if compute == "bfloat16" and stage is None:
            stage = torch.zeros(acc.shape, dtype=torch.float32)
        _gram_upper_into(acc if stage is None else stage, x, syrk_out)
        del x
        row0 += n_c
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if acc_np is None or row0 == 0:
        raise LexpInputError(f"{name}: no rows to compute moments over; the source is empty")
    if stage is not None:
        # bfloat16 products come back rounded to bfloat16 (2⁻⁹ relative); summing them in float32
        # adds ~2⁻²⁴ per chunk — 10⁴× less — and saves a float64 pass over N² per chunk.
        for i0 in range(0, acc_np.shape[0], _GEMM_BLOCK):
            acc[i0 : i0 + _GEMM_BLOCK, i0:].copy_(stage[i0 : i0 + _GEMM_BLOCK, i0:])
        del stage
    n = row0
    cnt = np.asarray(counts, dtype=np.float64)[:, None]
    w = np.sqrt(cnt)
    m_c = np.stack(means)
    mean = (m_c * cnt).sum(axis=0) / n  # centre of the co-moment (consistent with rounding)
    between = torch.from_numpy(w * (m_c - mean))  # k × N: Σ_c n_c (m_c − m)(m_c − m)ᵀ
    within = torch.from_numpy(w * np.stack(offsets))  # k × N: Σ_c n_c v_c v_cᵀ
    n_feat = acc_np.shape[0]
    for i0 in range(0, n_feat, _GEMM_BLOCK):
        i1 = min(i0 + _GEMM_BLOCK, n_feat)
        blk = acc[i0:i1, i0:]
        blk.addmm_(between[:, i0:i1].T, between[:, i0:])
        blk.addmm_(within[:, i0:i1].T, within[:, i0:], alpha=-1.0)
    _mirror_upper(acc_np)
    exact_mean = (np.stack(exact_means) * cnt).sum(axis=0) / n
    if norms is None:
        return Moments(n=n, mean=exact_mean, comoment=acc_np)
    q = norms.finish(acc, torch.from_numpy(mean), n)
    return Moments(n=n, mean=exact_mean, comoment=acc_np, layer_sizes=sizes, row_norm_products=q)


def _moments_on_device(
    chunks: Iterator[np.ndarray],
    device: torch.device,
    compute: Compute,
    name: str,
    bar: Any = None,
    *,
    layer_sizes: tuple[int, ...] | None = None,
) -> Moments:
    """The streaming pass with torch on ``device`` (a GPU; it runs on the CPU too, which the tests use).

    Same algebra as the CPU path (module docstring): each chunk is centred on its own mean, its
    product ``xᵀx`` (float32 with TF32 off, or bfloat16 with float32 accumulation) is added to a
    float64 ``C`` on the device, and the two low-rank merge terms are applied once at the end in
    float64. Host memory: one chunk (its copy to the device goes through a pinned buffer on CUDA);
    device memory: ``C`` (N² float64) + one float32 product + one chunk. ``layer_sizes``: the
    debiased CKA sums as on the CPU (:class:`_RowNorms`, on the device; one more chunk buffer).
    """
    acc: torch.Tensor | None = None
    prod: torch.Tensor | None = None
    pinned: torch.Tensor | None = None
    norms: _RowNorms | None = None
    counts: list[int] = []
    shifts: list[torch.Tensor] = []  # float64 chunk means (reported mean)
    means: list[torch.Tensor] = []  # a_c + v_c: the centre of the deviations the product saw
    offsets: list[torch.Tensor] = []  # v_c = m_c − a_c
    low = torch.bfloat16 if compute == "bfloat16" else None
    row0 = 0
    # TF32 off: 10-bit mantissas would move the correlations by ~1e-3
    with exact_float32_matmul(), torch.inference_mode():
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[0] == 0:
                raise LexpInputError(f"{name}: expected 2-D row blocks, got a chunk of shape {chunk.shape}")
            n_c, n_feat = chunk.shape
            if acc is None:
                acc = torch.zeros((n_feat, n_feat), dtype=torch.float64, device=device)
                prod = torch.empty((n_feat, n_feat), dtype=torch.float32, device=device)
                if layer_sizes is not None:
                    norms = _RowNorms(layer_sizes, n_feat, device, name)
            elif n_feat != acc.shape[0]:
                raise LexpInputError(
                    f"{name}: chunk at row {row0 + 1} has {n_feat} columns, earlier ones "
                    f"{acc.shape[0]}; a source must keep its width"
                )
            host = torch.from_numpy(chunk)
            if device.type == "cuda":  # through a reused pinned buffer: an asynchronous copy
                if pinned is None or pinned.shape[0] < n_c:
                    pinned = torch.empty(chunk.shape, dtype=torch.float32, pin_memory=True)
                host = pinned[:n_c].copy_(host)
            x = host.to(device, non_blocking=True)
            shift = x.sum(dim=0, dtype=torch.float64) / n_c
            if not bool(torch.isfinite(shift).all()):
                _raise_not_finite(chunk, row0, name)
            x.sub_(shift.to(torch.float32))
            v = x.sum(dim=0, dtype=torch.float64) / n_c
            if norms is not None:
                norms.add(x, shift.to(torch.float32).to(torch.float64))
            if low is not None:
                x = x.to(low)
            torch.mm(x.T, x, out=prod) if low is None else prod.copy_(x.T @ x)
            acc.add_(prod)
            counts.append(n_c)
            offsets.append(v)
            means.append(shift.to(torch.float32).to(torch.float64) + v)
            shifts.append(shift)
            del x
            row0 += n_c
            if bar is not None:
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the pinned buffer is reused next
        if acc is None or row0 == 0:
            raise LexpInputError(f"{name}: no rows to compute moments over; the source is empty")
        del prod
        cnt = torch.tensor(counts, dtype=torch.float64, device=device)[:, None]
        w = cnt.sqrt()
        m_c = torch.stack(means)
        mean = (m_c * cnt).sum(dim=0) / row0
        between = w * (m_c - mean)
        within = w * torch.stack(offsets)
        acc.addmm_(between.T, between).addmm_(within.T, within, alpha=-1.0)
        # a GEMM's xᵀx is symmetric only up to rounding: keep the upper triangle, as the CPU path
        upper = torch.triu(acc)
        acc = upper + torch.triu(upper, diagonal=1).T
        exact_mean = (torch.stack(shifts) * cnt).sum(dim=0) / row0
        if norms is None:
            return Moments(n=row0, mean=exact_mean.cpu().numpy(), comoment=acc.cpu().numpy())
        q = norms.finish(acc, mean, row0)
        return Moments(
            n=row0,
            mean=exact_mean.cpu().numpy(),
            comoment=acc.cpu().numpy(),
            layer_sizes=layer_sizes,
            row_norm_products=q,
        )


# --------------------------------------------------------------------------------------------
# Covariance and correlation
# --------------------------------------------------------------------------------------------


def constant_columns(m: Moments) -> np.ndarray:
    """Boolean (N,): neurons whose variance is zero up to rounding (correlation undefined)."""
    var = np.diagonal(m.comoment) / max(m.n, 1)
    return var <= (_CONSTANT_RTOL * np.abs(m.mean)) ** 2


def covariance(m: Moments, ddof: int = 1) -> np.ndarray:
    """Covariance matrix (float64 N × N) = comoment / (n − ddof), like ``np.cov(X, rowvar=False)``."""
    if m.n - ddof <= 0:
        raise LexpInputError(f"covariance: need more than ddof={ddof} rows, got n={m.n}")
    return m.comoment / (m.n - ddof)


def correlation(m: Moments, *, out: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation (float64 N × N, exactly symmetric, clipped to [−1, 1], never NaN).

    A constant neuron has no defined correlation: it gets 0 with every other neuron and 1 with
    itself (so it ends up a singleton cluster), and a warning reports how many there are.
    ``out=m.comoment`` computes in place, saving an N × N float64 matrix (the moments are then
    overwritten). Entries are ``c_ij / sqrt(c_ii c_jj)``: symmetric bit for bit, and exact
    duplicates (or sign flips) get |corr| = 1 exactly, so they merge even at ct = 0.
    """
    c = m.comoment
    if out is None:
        out = np.empty_like(c)
    elif out.shape != c.shape or out.dtype != np.float64:
        raise LexpInputError(f"correlation: out must be float64 {c.shape}, got {out.dtype} {out.shape}")
    const = constant_columns(m)
    var = np.diagonal(c).copy()
    var[const] = 1.0
    n_feat = c.shape[0]
    for i0 in range(0, n_feat, _ROW_BLOCK):
        i1 = min(i0 + _ROW_BLOCK, n_feat)
        denom = np.sqrt(var[i0:i1, None] * var[None, :])
        np.divide(c[i0:i1], denom, out=out[i0:i1])
    np.clip(out, -1.0, 1.0, out=out)
    if const.any():
        out[const, :] = 0.0
        out[:, const] = 0.0
        warnings.warn(
            f"correlation: {int(const.sum())} of {n_feat} neurons are constant over {m.n} rows; "
            "their correlation is set to 0 (they stay singleton clusters)",
            RuntimeWarning,
            stacklevel=2,
        )
    np.fill_diagonal(out, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Save / load (.npy, no pickle)
# --------------------------------------------------------------------------------------------

_FILES = {"n": "moments_n.npy", "mean": "moments_mean.npy", "comoment": "moments_comoment.npy"}
#: Optional files (the debiased CKA sums), written only when the moments have them.
_OPTIONAL_FILES = {"layer_sizes": "moments_layer_sizes.npy", "row_norm_products": "moments_row_norms.npy"}


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


def save_moments(m: Moments, directory: Path | str) -> list[Path]:
    """Write ``moments_{n,mean,comoment}.npy`` into ``directory`` (each written atomically), and
    ``moments_{layer_sizes,row_norms}.npy`` when the moments hold the debiased CKA sums (stale
    ones from an earlier save are removed otherwise)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    items = [("comoment", m.comoment), ("mean", m.mean)]
    if m.layer_sizes is not None:
        items += [
            ("layer_sizes", np.asarray(m.layer_sizes, dtype=np.int64)),
            ("row_norm_products", np.asarray(m.row_norm_products, dtype=np.float64)),
        ]
    else:
        for fname in _OPTIONAL_FILES.values():
            (directory / fname).unlink(missing_ok=True)
    items.append(("n", np.asarray(m.n, dtype=np.int64)))
    for key, value in items:
        path = directory / (_FILES.get(key) or _OPTIONAL_FILES[key])
        _save_npy_atomic(path, value)
        paths.append(path)
    return paths


def load_moments(directory: Path | str, *, mmap: bool = False) -> Moments:
    """Read moments written by :func:`save_moments`; ``mmap=True`` maps the N × N matrix read-only."""
    directory = Path(directory)
    arrays = {}
    for key, fname in _FILES.items():
        path = directory / fname
        if not path.is_file():
            raise LexpInputError(f"{path}: missing; recompute the moments with streaming_moments()")
        try:
            arrays[key] = np.load(
                path, mmap_mode="r" if mmap and key == "comoment" else None, allow_pickle=False
            )
        except ValueError as exc:
            raise LexpInputError(
                f"{path}: not a readable .npy file ({exc}); delete it and recompute"
            ) from exc
    n, mean, com = arrays["n"], arrays["mean"], arrays["comoment"]
    if n.shape != () or mean.ndim != 1 or com.shape != (mean.shape[0], mean.shape[0]):
        raise LexpInputError(
            f"{directory}: inconsistent moments (n {n.shape}, mean {mean.shape}, comoment {com.shape}); "
            "delete the moments_*.npy files and recompute"
        )
    if mean.dtype != np.float64 or com.dtype != np.float64:
        raise LexpInputError(f"{directory}: moments must be float64, got {mean.dtype}/{com.dtype}; recompute")
    present = {k: directory / f for k, f in _OPTIONAL_FILES.items() if (directory / f).is_file()}
    if not present:
        return Moments(n=int(n), mean=mean, comoment=com)
    if len(present) != len(_OPTIONAL_FILES):
        missing = sorted(set(_OPTIONAL_FILES.values()) - {p.name for p in present.values()})
        raise LexpInputError(
            f"{directory}: {', '.join(missing)} missing beside {', '.join(p.name for p in present.values())}; "
            "delete the moments_*.npy files and recompute"
        )
    try:
        sizes = np.load(present["layer_sizes"], allow_pickle=False)
        q = np.load(present["row_norm_products"], allow_pickle=False)
    except ValueError as exc:
        raise LexpInputError(
            f"{directory}: unreadable debiased-CKA sums ({exc}); delete them and recompute"
        ) from exc
    if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer) or q.dtype != np.float64:
        raise LexpInputError(
            f"{directory}: moments_layer_sizes.npy must be 1-D integers and moments_row_norms.npy "
            f"float64, got {sizes.dtype} {sizes.shape} / {q.dtype}; delete them and recompute"
        )
    return Moments(
        n=int(n), mean=mean, comoment=com, layer_sizes=tuple(int(v) for v in sizes), row_norm_products=q
    )
