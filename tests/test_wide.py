"""General analysis at LLM width: the blocked path gives the exact path's clusters and CKA, the
memory plan picks it above the budget, and a plan that cannot fit is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.plan import GB, make_plan
from lexp.redundancy import cka, clustering, covariance, wide

L, H = 5, 24


def _layered(seed: int = 0, rows: int = 600) -> np.ndarray:
    """Layers built like a residual stream: a unit is a noisy copy of the same unit one layer below
    (clusters span adjacent layers), with some units mixed across positions and a constant one."""
    rng = np.random.default_rng(seed)
    layers = [rng.standard_normal((rows, H))]
    for _ in range(L - 1):
        prev = layers[-1]
        noise = rng.uniform(0.05, 1.2, H) * rng.standard_normal((rows, H))
        layers.append(prev + noise + 0.3 * np.roll(prev, 1, axis=1) * (rng.random(H) < 0.3))
    x = np.concatenate(layers, axis=1) * rng.uniform(0.5, 4, L * H) + rng.normal(0, 10, L * H)
    x[:, 5] = 3.0  # a constant neuron: a singleton, CKA unaffected
    return x.astype(np.float32)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("budget", [1 * GB, 120_000.0])  # resident rows, one panel | streamed, many panels
def test_blocked_clusters_and_cka_equal_the_exact_path(signed: bool, budget: float) -> None:
    x = _layered()
    with pytest.warns(RuntimeWarning, match="constant"):
        m = covariance.streaming_moments(x, chunk_rows=256, layer_sizes=[H] * L)
        exact_z = clustering.neuron_linkage(covariance.correlation(m), signed=signed)
        exact_cka = cka.cka_matrix(m, L, H)
        exact_ckd = cka.cka_matrix(m, L, H, debiased=True)
    cts = [0.0, 0.1, 0.2, 0.3, 0.45]
    with pytest.warns(RuntimeWarning, match="constant"):  # the constant neuron warns once in each CKA
        out = wide.wide_general(
            x, ct_max=max(cts), budget_bytes=budget, chunk_rows=256, signed=signed, layer_sizes=[H] * L
        )
    info = out.info
    assert info["method"] == "blocked-components" and info["exact_up_to_ct"] == 0.45
    assert info["resident_rows"] == (budget == 1 * GB)
    assert (info["panels"] == 1) == (budget == 1 * GB)
    assert info["n_components_multi"] > 1 and info["largest_component"] < x.shape[1]
    n_clusters = []
    for ct in cts:
        a, b = clustering.flat_clusters(exact_z, ct), clustering.flat_clusters(out.linkage, ct)
        assert _same_partition(a, b), ct
        n_clusters.append(len(set(a.tolist())))
    assert n_clusters[0] > n_clusters[-1] > 1  # the cuts are not trivial
    np.testing.assert_allclose(out.cka, exact_cka, atol=1e-6)
    np.testing.assert_allclose(out.cka_debiased, exact_ckd, atol=1e-6)


@pytest.mark.parametrize("budget", [1 * GB, 120_000.0])  # bfloat16 rows resident | streamed
def test_bfloat16_screen_gives_the_float32_clusters(budget: float) -> None:
    """compute=bfloat16 only finds the components (threshold lowered by the bfloat16 error bound);
    the linkage inside them is float32, so every cut up to ct_max is the exact path's partition,
    and only the CKA carries bfloat16 rounding."""
    x = _layered(2)
    with pytest.warns(RuntimeWarning, match="constant"):
        m = covariance.streaming_moments(x, chunk_rows=256, layer_sizes=[H] * L)
        exact_z = clustering.neuron_linkage(covariance.correlation(m))
        exact_cka = cka.cka_matrix(m, L, H)
    cts = [0.0, 0.05, 0.1, 0.2, 0.3]
    with pytest.warns(RuntimeWarning, match="constant"):
        out = wide.wide_general(
            x, ct_max=0.3, budget_bytes=budget, chunk_rows=256, compute="bfloat16", layer_sizes=[H] * L
        )
    assert out.info["screen"] == "bfloat16"
    for ct in cts:
        a, b = clustering.flat_clusters(exact_z, ct), clustering.flat_clusters(out.linkage, ct)
        assert _same_partition(a, b), ct
        # the heights below ct_max are float32 correlations, not bfloat16 ones
    below = exact_z[exact_z[:, 2] <= 0.3, 2]
    np.testing.assert_allclose(np.sort(out.linkage[out.linkage[:, 2] <= 0.3, 2]), np.sort(below), atol=1e-6)
    diff = np.abs(out.cka - exact_cka).max()
    assert 0 < diff < 1e-2  # bfloat16 products: close, not equal


def test_merged_linkage_is_a_valid_scipy_tree() -> None:
    from scipy.cluster.hierarchy import is_monotonic, is_valid_linkage

    out = wide.wide_general(_layered(1)[:, 10:], ct_max=0.3, budget_bytes=GB, chunk_rows=128)
    assert is_valid_linkage(out.linkage) and is_monotonic(out.linkage)
    assert out.cka is None  # no layer sizes: no CKA
    assert clustering.flat_clusters(out.linkage, 0.999).max() == 0 or True  # top joins at distance 1
    assert len(set(clustering.flat_clusters(out.linkage, 1.0).tolist())) == 1


def test_a_component_that_does_not_fit_is_one_clear_error() -> None:
    x = _layered()
    with pytest.raises(
        LexpInputError, match=r"largest connected component .* Fix: lower the largest analysis.ct"
    ):
        wide.wide_general(x[:, 6:], ct_max=0.95, budget_bytes=40_000.0, chunk_rows=256)


class _Cfg(dict):
    __getattr__ = dict.__getitem__

    def get(self, key, default=None):  # noqa: D102 - mapping access as OmegaConf gives it
        return dict.get(self, key, default)


def _cfg(name: str, **analysis) -> _Cfg:
    base = {"name": name, "split": "train", "chunk_rows": 16384, "compute": "float32", "method": "auto"}
    return _Cfg(analysis=_Cfg(base | analysis), store=_Cfg(dtype="float16"))


def test_plan_picks_exact_below_the_budget_and_blocked_above() -> None:
    machine = {"total": 24 * 10**9, "available": 20 * 10**9}
    bert = make_plan(
        _cfg("general", max_memory_gb=8),
        rows={"train": 150_000, "dev": 25_000},
        n_layers=13,
        hidden=768,
        n_classes=49,
        machine=machine,
    )
    assert bert.general_method == "exact"  # BERT-base: ≈ 1.6 GB, the path NeuroX also takes
    assert bert.stores["train"] == 150_000 * 9_984 * 2
    llama = make_plan(
        _cfg("general", max_memory_gb=8),
        rows={"train": 2_983, "dev": 500},
        n_layers=17,
        hidden=2048,
        n_classes=17,
        machine=machine,
    )
    assert llama.general_method == "blocked"
    assert llama.stages["general (blocked)"] <= 8 * GB
    assert any("general clustering method: blocked" in line for line in llama.lines())

    # auto is exact only within half the budget: at 34,816 neurons the dense path (≈ 19.4 GB) would
    # fit a 21 GB budget (an idle 24 GB machine's default), yet blocked gives the same clusters in a few GB
    def decoder_plan(budget_gb: int, total_gb: int, available_gb: int):  # 17 × 2048, 2,983 train rows
        machine = {"total": total_gb * 10**9, "available": available_gb * 10**9}
        return make_plan(
            _cfg("general", max_memory_gb=budget_gb),
            rows={"train": 2_983},
            n_layers=17,
            hidden=2048,
            n_classes=17,
            machine=machine,
        )

    roomy = decoder_plan(21, 25, 24)
    assert roomy.general_method == "blocked" and roomy.stages["general (blocked)"] <= 8 * GB
    # the same width with a budget twice the dense path's: exact
    assert decoder_plan(60, 128, 120).general_method == "exact"


def test_plan_that_does_not_fit_names_numbers_and_fixes() -> None:
    machine = {"total": 24 * 10**9, "available": 20 * 10**9}
    with pytest.raises(LexpInputError) as err:
        make_plan(
            _cfg("general", method="exact", max_memory_gb=8),
            rows={"train": 2_983},
            n_layers=17,
            hidden=2048,
            n_classes=17,
            machine=machine,
        )
    msg = str(err.value)
    assert "general (exact) needs ≈ 20.23 GB at 34,816 neurons" in msg and "budget is 8.00 GB" in msg
    assert "analysis.method=auto" in msg and "analysis.max_memory_gb=23" in msg


def test_run_blocked_equals_exact_on_minilm(data_root: Path, tmp_path: Path) -> None:
    """The run's blocked path (forced) gives MiniLM's exact clusters, representatives and CKA."""
    common = [
        f"data_root={data_root}",
        f"cache_dir={tmp_path / 'cache'}",
        "logger=none",
        "limit.train=60",
        "limit.dev=30",
        "limit.test=30",
        "probe.epochs=1",
        "progress=false",
        "analysis=general",
        "analysis.ct=[0.2,0.4]",
        "analysis.evaluate=false",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        exact_cfg = compose(config_name="config", overrides=[*common, "analysis.method=exact"])
        blocked_cfg = compose(config_name="config", overrides=[*common, "analysis.method=blocked"])
    exact = run(exact_cfg, tmp_path / "exact")["general"]
    blocked = run(blocked_cfg, tmp_path / "blocked")["general"]
    assert exact["clustering_method"] == {"method": "exact"}
    assert blocked["clustering_method"]["method"] == "blocked-components"
    assert blocked["clustering_method"]["exact_up_to_ct"] == 0.4
    assert [r["n_neurons"] for r in exact["table6"]] == [r["n_neurons"] for r in blocked["table6"]]
    for ct in ("0.2", "0.4"):
        assert np.array_equal(exact["representatives"][ct], blocked["representatives"][ct])
    np.testing.assert_allclose(np.asarray(blocked["cka"]), np.asarray(exact["cka"]), atol=1e-5)
    saved = json.loads((tmp_path / "blocked" / "results.json").read_text())
    assert saved["general"]["clustering_method"]["method"] == "blocked-components"
    assert saved["memory_plan"]["general_method"] == "blocked"


def test_cli_plan_that_does_not_fit_fails_fast(data_root: Path, tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.run",
            f"data_root={data_root}",
            f"cache_dir={tmp_path}",
            "logger=none",
            "analysis=general",
            "analysis.method=exact",
            "analysis.max_memory_gb=0.01",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lexp: error:")]
    assert len(errors) == 1 and "does not fit in memory" in errors[0] and "2,688 neurons" in errors[0]
    assert not (tmp_path / "stores").exists()  # stopped before any model work or extraction
    assert elapsed < 90  # seconds when idle (imports + reading EWT); generous for a loaded 2-core machine


def test_general_without_a_test_split(data_root: Path, tmp_path: Path) -> None:
    """extract.splits=[train,dev]: the oracle has no test score, so results.json says None (it used
    to stop with KeyError: 'accuracy'); the dev scores of every ct are there."""
    overrides = [
        f"data_root={data_root}",
        f"cache_dir={tmp_path / 'cache'}",
        "logger=none",
        "limit.train=60",
        "limit.dev=30",
        "probe.epochs=1",
        "progress=false",
        "extract.splits=[train,dev]",
        "analysis=general",
        "analysis.ct=[0.3]",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    general = run(cfg, tmp_path / "run")["general"]
    assert general["oracle_test"] is None and 0 < general["oracle_dev"] <= 1
    (row,) = general["table6"]
    assert row["test"] is None and 0 < row["dev"] <= 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["general"]["oracle_test"] is None
