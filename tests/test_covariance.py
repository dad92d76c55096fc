"""Streaming moments: equal to numpy's cov/corrcoef for every chunking, dtype and source kind."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from lexp.errors import LexpInputError
from lexp.redundancy.clustering import adjusted_rand, cut_many, neuron_linkage
from lexp.redundancy.covariance import (
    Moments,
    constant_columns,
    correlation,
    covariance,
    load_moments,
    save_moments,
    streaming_moments,
)

CTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _data(rows: int = 301, cols: int = 23, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols))
    return (rng.standard_normal((rows, cols)) @ mix + rng.normal(0, 3, cols)).astype(np.float32)


def _ref_cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x.astype(np.float64), rowvar=False)


def _ref_corr(x: np.ndarray) -> np.ndarray:
    return np.corrcoef(x.astype(np.float64), rowvar=False)


def _synthetic_activations(rows: int, n_layers: int, hidden: int, seed: int = 0) -> np.ndarray:
    """Neurons in groups (noisy, scaled, shifted, sign-flipped copies of one signal) spread over
    the same or nearby layers, plus weak shared factors: merges at every distance, like BERT."""
    rng = np.random.default_rng(seed)
    n = n_layers * hidden
    n_groups = n // 3
    signals = rng.standard_normal((rows, n_groups), dtype=np.float32)
    home = rng.integers(0, n_layers, n_groups)
    layer = np.repeat(np.arange(n_layers), hidden)
    group = np.empty(n, dtype=np.int64)
    for j in range(n):
        cand = np.flatnonzero(home == np.clip(layer[j] + rng.choice([0, 0, 0, 1, -1, 2]), 0, n_layers - 1))
        group[j] = rng.choice(cand) if cand.size else rng.integers(n_groups)
    noise = np.exp(rng.uniform(np.log(0.03), np.log(2.0), n)).astype(np.float32)
    factors = rng.standard_normal((rows, 16), dtype=np.float32)
    x = signals[:, group] + noise * rng.standard_normal((rows, n), dtype=np.float32)
    x += factors @ (0.08 * rng.standard_normal((16, n), dtype=np.float32))
    x *= rng.choice([-1.0, 1.0], n).astype(np.float32) * rng.lognormal(0, 0.5, n).astype(np.float32)
    x += rng.normal(0, 2, n).astype(np.float32)
    return x


@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 301, 5000])
def test_matches_numpy_for_any_chunking(chunk_rows: int) -> None:
    x = _data()
    m = streaming_moments(x, chunk_rows=chunk_rows)
    assert m.n == 301
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(covariance(m), _ref_cov(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        covariance(m, ddof=0), np.cov(x.astype(np.float64), rowvar=False, ddof=0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(correlation(m), _ref_corr(x), atol=2e-6)
    np.testing.assert_array_equal(m.comoment, m.comoment.T)


def test_float16_memmap_file(tmp_path) -> None:
    x = _data(rows=500, cols=31, seed=1).astype(np.float16)
    path = tmp_path / "activations.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    m = streaming_moments(mm, chunk_rows=64)
    np.testing.assert_allclose(correlation(m), _ref_corr(x), atol=2e-6)
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(0), rtol=1e-12)


def test_float32_memmap_rows_are_read_from_the_file(tmp_path) -> None:
    """float32 .npy rows are read() into one reused buffer (no page faults): views of the memmap,
    column subsets (memmap path) and a file truncated after opening all behave."""
    from lexp.redundancy.covariance import _array_chunks, _file_position

    x = _data(rows=300, cols=23, seed=4)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    for view, ref in ((mm, x), (mm[37:], x[37:]), (mm[5:250], x[5:250])):
        assert _file_position(view) is not None
        chunks = [c.copy() for c in _array_chunks(view, 64, None)]
        np.testing.assert_array_equal(np.concatenate(chunks), ref)
        m = streaming_moments(view, chunk_rows=64)
        np.testing.assert_allclose(correlation(m), _ref_corr(ref), atol=2e-6)
    assert _file_position(x) is None and _file_position(mm[:, 3:]) is None  # not a memmap / not rows
    cols = np.array([3, 0, 22])
    np.testing.assert_array_equal(np.concatenate([c.copy() for c in _array_chunks(mm, 64, cols)]), x[:, cols])
    with open(path, "r+b") as f:
        f.truncate(128 + 100 * 23 * 4)  # the header + 100 of 300 rows
    with pytest.raises(LexpInputError, match=r"acts\.npy: the file ended .* early"):
        list(_array_chunks(mm, 64, None))


def test_errors_name_the_file_and_row(tmp_path) -> None:
    x = _data(rows=50, cols=4)
    x[37, 2] = np.nan
    path = tmp_path / "acts.npy"
    np.save(path, x)
    with pytest.raises(LexpInputError, match=r"acts\.npy.*row 38 \(1-based\), column 2"):
        streaming_moments(np.load(path, mmap_mode="r"), chunk_rows=16)
    with pytest.raises(LexpInputError, match="empty"):
        streaming_moments(np.zeros((0, 3), np.float32))
    with pytest.raises(LexpInputError, match="2-D"):
        streaming_moments(np.zeros(5, np.float32))
    with pytest.raises(LexpInputError, match="columns"):
        streaming_moments(_data(), columns=[0, 99])
    with pytest.raises(LexpInputError, match="compute"):
        streaming_moments(_data(), compute="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize("columns", [[3, 0, 17, 5], list(range(4, 12))])
def test_columns_subset(columns: list[int]) -> None:
    x = _data()
    m = streaming_moments(x, chunk_rows=50, columns=columns)
    np.testing.assert_allclose(correlation(m), _ref_corr(x[:, columns]), atol=2e-6)


class _ChunkSource:
    """The iter_chunks protocol of lexp.store.Store, over an in-memory array."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.calls: list[tuple[int, object]] = []

    def iter_chunks(self, chunk_rows: int, columns: np.ndarray | None) -> Iterator[np.ndarray]:
        self.calls.append((chunk_rows, columns))
        x = self.x if columns is None else self.x[:, columns]
        for i in range(0, len(x), chunk_rows):
            yield np.ascontiguousarray(x[i : i + chunk_rows], dtype=np.float32)


def test_chunk_source_object() -> None:
    x = _data()
    src = _ChunkSource(x)
    m = streaming_moments(src, chunk_rows=40, columns=np.array([1, 2, 8]))
    assert src.calls[0][0] == 40
    np.testing.assert_allclose(correlation(m), _ref_corr(x[:, [1, 2, 8]]), atol=2e-6)


def test_large_offset_is_numerically_safe() -> None:
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((4000, 12)) @ rng.standard_normal((12, 12)) / 4).astype(np.float32)
    m = streaming_moments(x, chunk_rows=999)
    ref = _ref_corr(x)
    np.testing.assert_allclose(correlation(m), ref, atol=1e-5)
    np.testing.assert_allclose(covariance(m), _ref_cov(x), rtol=1e-4)
    # The naive float32 one-pass formula Σxxᵀ/n − m mᵀ is useless here: the test has teeth.
    x32 = x.astype(np.float32)
    naive = x32.T @ x32 / len(x32) - np.outer(x32.mean(0), x32.mean(0))
    assert np.abs(naive - np.cov(x.astype(np.float64), rowvar=False, ddof=0)).max() > 1.0


def test_constant_columns_and_exact_duplicates() -> None:
    x = _data(rows=200, cols=6)
    x[:, 1] = 0.25  # constant
    x[:, 4] = x[:, 2]  # exact duplicate
    x[:, 5] = -x[:, 2]  # sign flip
    m = streaming_moments(x, chunk_rows=64)
    np.testing.assert_array_equal(constant_columns(m), [False, True, False, False, False, False])
    with pytest.warns(RuntimeWarning, match="1 of 6 neurons are constant"):
        corr = correlation(m)
    assert np.isfinite(corr).all()
    assert corr[1, 1] == 1.0 and np.all(np.delete(corr[1], 1) == 0) and np.all(np.delete(corr[:, 1], 1) == 0)
    assert corr[2, 4] == 1.0 and corr[2, 5] == -1.0 and corr[4, 5] == -1.0
    np.testing.assert_array_equal(corr, corr.T)


def test_correlation_in_place_saves_a_matrix() -> None:
    x = _data()
    m = streaming_moments(x)
    expected = correlation(m)
    out = correlation(m, out=m.comoment)
    assert out is m.comoment
    np.testing.assert_array_equal(out, expected)


def test_save_load_roundtrip(tmp_path) -> None:
    m = streaming_moments(_data())
    save_moments(m, tmp_path / "mom")
    for mmap in (False, True):
        back = load_moments(tmp_path / "mom", mmap=mmap)
        assert back.n == m.n
        np.testing.assert_array_equal(back.mean, m.mean)
        np.testing.assert_array_equal(back.comoment, m.comoment)
    (tmp_path / "mom" / "moments_mean.npy").unlink()
    with pytest.raises(LexpInputError, match="moments_mean.npy: missing"):
        load_moments(tmp_path / "mom")
    np.save(tmp_path / "mom" / "moments_mean.npy", np.zeros(3))
    with pytest.raises(LexpInputError, match="inconsistent"):
        load_moments(tmp_path / "mom")
    with pytest.raises(LexpInputError, match="comoment"):
        Moments(n=3, mean=np.zeros(2), comoment=np.zeros((3, 3)))


def test_bfloat16_compute_gives_the_same_clusters() -> None:
    """bfloat16 products move correlations by ~1e-3, so only merges that close to ct can move.

    Measured on this data: max |Δcorr| 2.4e-3 and identical partitions at all 9 thresholds (an
    earlier blocking gave ARI 0.997 at one of them); asserted: ARI ≥ 0.99, ≤ 1% difference in the
    number of clusters, identical partitions at ≥ 6 thresholds.
    """
    x = _synthetic_activations(8000, n_layers=13, hidden=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no constant columns expected
        corr32 = correlation(streaming_moments(x, chunk_rows=1024, compute="float32"))
        corr16 = correlation(streaming_moments(x, chunk_rows=1024, compute="bfloat16"))
    assert np.abs(corr32 - corr16).max() < 5e-3
    assert np.abs(corr32 - _ref_corr(x)).max() < 1e-5
    cuts32 = cut_many(neuron_linkage(corr32), CTS)
    cuts16 = cut_many(neuron_linkage(corr16), CTS)
    n_equal = 0
    for ct in CTS:
        a, b = cuts32[ct], cuts16[ct]
        k32, k16 = len(np.unique(a)), len(np.unique(b))
        assert abs(k32 - k16) <= 0.01 * k32, ct
        assert adjusted_rand(a, b) >= 0.99, ct
        n_equal += adjusted_rand(a, b) == 1.0
    assert n_equal >= 6
    # The data is not degenerate: clusters form gradually over the thresholds.
    sizes = [len(np.unique(cuts32[ct])) for ct in CTS]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < 520 and sizes[-1] < 200


def test_real_store_source(tmp_path) -> None:
    """The activation store streams into the same moments as the array it holds."""
    from lexp.store import StoreWriter, open_store

    x = _data(rows=250, cols=12, seed=4).astype(np.float16)
    path = tmp_path / "store"
    with StoreWriter(
        path, n_rows=250, n_layers=3, hidden=4, dtype="float16", manifest={"fingerprint": "f"}
    ) as w:
        w.write_rows(0, x)
        w.finish(np.zeros(250, dtype=np.int64))
    store = open_store(path)
    cols = store.layer_columns([1, 2])
    m = streaming_moments(store, chunk_rows=64, columns=cols, progress=True)
    np.testing.assert_allclose(correlation(m), _ref_corr(x[:, cols]), atol=2e-6)
    np.testing.assert_allclose(m.mean, x[:, cols].astype(np.float64).mean(0), rtol=1e-12)


# ------------------------------------------------------------------------------ on a device
@pytest.mark.parametrize("chunk_rows", [7, 100, 5000])
def test_device_pass_matches_numpy(device, chunk_rows: int) -> None:
    """The public pass on ``device`` (CPU: the ssyrk path; CUDA: the torch path) equals numpy."""
    x = _data()
    m = streaming_moments(x, chunk_rows=chunk_rows, device=device)
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(covariance(m), _ref_cov(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(correlation(m), _ref_corr(x), atol=2e-6)
    np.testing.assert_array_equal(m.comoment, m.comoment.T)


@pytest.mark.parametrize("chunk_rows", [1, 64, 5000])
def test_torch_pass_equals_the_cpu_pass(chunk_rows: int) -> None:
    """The GPU algorithm (torch ops, float64 merge on the device), run on the CPU, equals the ssyrk
    path to float32 rounding, with a large offset (the chunks are centred before the product)."""
    import torch

    from lexp.redundancy.covariance import _array_chunks, _moments_on_device

    x = _data(rows=1200) + np.float32(1e3)
    cpu = streaming_moments(x.copy(), chunk_rows=chunk_rows)
    dev = _moments_on_device(_array_chunks(x.copy(), chunk_rows, None), torch.device("cpu"), "float32", "x")
    assert dev.n == cpu.n == 1200
    np.testing.assert_allclose(dev.mean, cpu.mean, rtol=1e-12)
    np.testing.assert_allclose(dev.comoment, cpu.comoment, rtol=1e-5, atol=1e-6 * np.abs(cpu.comoment).max())
    np.testing.assert_array_equal(dev.comoment, dev.comoment.T)
    with pytest.raises(LexpInputError, match="no rows"):
        _moments_on_device(iter(()), torch.device("cpu"), "float32", "empty")


def test_device_pass_gives_the_same_clusters(device) -> None:
    """float32 on the device gives exactly the CPU clusters at every ct (TF32 stays off on CUDA)."""
    x = _synthetic_activations(3000, n_layers=6, hidden=30)
    cpu = cut_many(neuron_linkage(correlation(streaming_moments(x, chunk_rows=512))), CTS)
    on = cut_many(neuron_linkage(correlation(streaming_moments(x, chunk_rows=512, device=device))), CTS)
    for ct in CTS:
        assert adjusted_rand(cpu[ct], on[ct]) == 1.0, ct


def test_device_pass_refuses_non_finite_rows(device) -> None:
    x = _data()
    x[200, 5] = np.nan
    with pytest.raises(LexpInputError, match="row 201"):
        streaming_moments(x, chunk_rows=64, device=device)


# ------------------------------------------------------------------------ debiased-CKA sums
def _row_norm_products(x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Q[A, B] = Σ_t ‖x̄_t^A‖² ‖x̄_t^B‖² written out in float64."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    b = np.concatenate([[0], np.cumsum(sizes)])
    r = np.stack([(xc[:, b[i] : b[i + 1]] ** 2).sum(1) for i in range(len(sizes))], axis=1)
    return r.T @ r


@pytest.mark.parametrize("chunk_rows", [1, 50, 5000])
def test_layer_sizes_add_the_row_norm_sums_and_change_nothing_else(chunk_rows: int) -> None:
    """The extra sums equal their definition (offset 1e3: they are taken about a shift), and the
    mean and co-moment are bit for bit those of the plain pass, on both passes."""
    import torch

    from lexp.redundancy.covariance import _array_chunks, _moments_on_device

    x = _data(rows=300, cols=12) + np.float32(1e3)
    sizes = [4, 3, 5]
    expected = _row_norm_products(x, sizes)
    plain = streaming_moments(x.copy(), chunk_rows=chunk_rows)
    cpu = streaming_moments(x.copy(), chunk_rows=chunk_rows, layer_sizes=sizes)
    dev = _moments_on_device(
        _array_chunks(x.copy(), chunk_rows, None),
        torch.device("cpu"),
        "float32",
        "x",
        layer_sizes=tuple(sizes),
    )
    assert plain.layer_sizes is None and plain.row_norm_products is None
    np.testing.assert_array_equal(cpu.comoment, plain.comoment)
    np.testing.assert_array_equal(cpu.mean, plain.mean)
    for m in (cpu, dev):
        assert m.layer_sizes == (4, 3, 5)
        np.testing.assert_allclose(m.row_norm_products, expected, rtol=2e-6)
        np.testing.assert_array_equal(m.row_norm_products, m.row_norm_products.T)


def test_layer_sizes_on_the_device(device) -> None:
    x = _data(rows=200, cols=12) + np.float32(500)
    m = streaming_moments(x, chunk_rows=64, device=device, layer_sizes=[6, 6])
    np.testing.assert_allclose(m.row_norm_products, _row_norm_products(x, [6, 6]), rtol=2e-6)


def test_save_load_keeps_the_row_norm_sums(tmp_path) -> None:
    x = _data(rows=100, cols=12)
    m = streaming_moments(x, layer_sizes=[6, 6])
    save_moments(m, tmp_path / "mom")
    back = load_moments(tmp_path / "mom", mmap=True)
    assert back.layer_sizes == (6, 6)
    np.testing.assert_array_equal(back.row_norm_products, m.row_norm_products)
    # saving plain moments over them removes the stale sums
    save_moments(streaming_moments(x), tmp_path / "mom")
    assert load_moments(tmp_path / "mom").row_norm_products is None
    save_moments(m, tmp_path / "mom")
    (tmp_path / "mom" / "moments_layer_sizes.npy").unlink()
    with pytest.raises(LexpInputError, match="moments_layer_sizes.npy missing"):
        load_moments(tmp_path / "mom")
    with pytest.raises(LexpInputError, match="go together"):
        Moments(n=3, mean=np.zeros(2), comoment=np.zeros((2, 2)), layer_sizes=(2,))
    with pytest.raises(LexpInputError, match="must sum to the 2 neurons"):
        Moments(
            n=3, mean=np.zeros(2), comoment=np.zeros((2, 2)), layer_sizes=(3,), row_norm_products=np.eye(1)
        )
