"""Benchmark: lexp's one-pass correlation clustering against NeuroX 1.0.9 (paper Section 5.2).

Same data for both: ``--rows`` × 9,984 synthetic neurons (13 "layers" × 768, BERT-base size),
float32 ``.npy``. Neurons come in groups — noisy, scaled, shifted, sign-flipped copies of one
signal, homed in one layer and its neighbours — plus weak shared factors, so clusters form
gradually over ct like in BERT. Each contender runs in its own subprocess (wall time and peak RSS
measured by the worker itself, ``getrusage(RUSAGE_SELF).ru_maxrss``):

* ``lexp-float32`` / ``lexp-bfloat16``: ``streaming_moments`` over the memory-mapped file
  (8,192-row chunks) → ``correlation`` (in place) → ``neuron_linkage`` → ``flat_clusters(ct)``;
* ``neurox``: ``neurox.interpretation.clustering.create_correlation_clusters`` on the array loaded
  into RAM (``np.corrcoef`` in float64, then scipy), in ``.venv-neurox``;
* ``gemm-floor``: one float32 GEMM ``XᵀX`` (N×R times R×N) in torch, the same in bfloat16, and
  OpenBLAS ``ssyrk`` (one triangle: exactly the arithmetic lexp-float32 does).

Usage::

    python benchmarks/bench_clustering.py --rows 20000            # quick (≈ 2 min)
    python benchmarks/bench_clustering.py                         # 150,000 rows (NeuroX: ≈ 19 GB)
    python benchmarks/bench_clustering.py --only lexp-bfloat16     # redo one run, keep the others

Wall time on a shared 2-core host depends on what else runs; every run also reports its CPU
seconds (user + system), which do not, and the ratios are given both ways.

NeuroX is started only when ``MemAvailable`` covers its estimated peak plus a margin, and runs with
an address-space limit so it fails with MemoryError instead of pushing the machine into the OOM
killer. The data file is cached in ``--workdir`` (default ``/tmp/lexp-bench-clustering``).
Writes JSON to ``--out`` (default ``bench_results/clustering.json``). This file is also the
worker (``--worker``), run by the NeuroX venv's python too, so it imports lexp lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NEUROX_PYTHON = REPO / ".venv-neurox" / "bin" / "python"
GB = 1024**3
THREADS = "2"
RUNS = ("lexp-float32", "lexp-bfloat16", "gemm-floor", "neurox")


# ------------------------------------------------------------------------------------------ data
def write_synthetic(path: Path, rows: int, n_layers: int, hidden: int, seed: int, chunk: int = 8192) -> None:
    """Write the activations chunk by chunk (never the whole matrix in RAM); deterministic in seed."""
    rng = np.random.default_rng(seed)
    n = n_layers * hidden
    n_groups = n // 3
    n_factors = 16
    home = rng.integers(0, n_layers, n_groups)
    layer = np.repeat(np.arange(n_layers), hidden)
    target = np.clip(layer + rng.choice([0, 0, 0, 1, -1, 2], n), 0, n_layers - 1)
    group = np.empty(n, dtype=np.int64)
    for lay in range(n_layers):  # each neuron joins a random group homed in its target layer
        members = np.flatnonzero(target == lay)
        homed = np.flatnonzero(home == lay)
        group[members] = (
            rng.choice(homed, members.size) if homed.size else rng.integers(0, n_groups, members.size)
        )
    noise = np.exp(rng.uniform(np.log(0.03), np.log(2.0), n)).astype(np.float32)
    loadings = (0.08 * rng.standard_normal((n_factors, n))).astype(np.float32)
    scale = (rng.choice([-1.0, 1.0], n) * rng.lognormal(0, 0.5, n)).astype(np.float32)
    offset = rng.normal(0, 2, n).astype(np.float32)
    tmp = path.with_name(path.name + ".partial")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, n))
    for i, start in enumerate(range(0, rows, chunk)):
        r = np.random.default_rng([seed, i])
        m = min(chunk, rows - start)
        x = r.standard_normal((m, n), dtype=np.float32)
        x *= noise
        x += r.standard_normal((m, n_groups), dtype=np.float32)[:, group]
        x += r.standard_normal((m, n_factors), dtype=np.float32) @ loadings
        x *= scale
        x += offset
        out[start : start + m] = x
    out.flush()
    del out
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- workers
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process: less distorted than wall time on a busy host."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_lexp(data: Path, ct: float, compute: str, labels_out: Path) -> dict:
    from lexp.redundancy.clustering import flat_clusters, neuron_linkage
    from lexp.redundancy.covariance import correlation, streaming_moments

    stages = {}
    c0 = _cpu_s()
    t0 = time.perf_counter()
    x = np.load(data, mmap_mode="r")
    m = streaming_moments(x, chunk_rows=16384, compute=compute)
    stages["moments_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    corr = correlation(m, out=m.comoment)
    stages["correlation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    Z = neuron_linkage(corr)
    stages["linkage_s"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = flat_clusters(Z, ct)
    stages["cut_s"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    np.save(labels_out, labels)
    return {
        "time_s": total,
        "cpu_s": _cpu_s() - c0,
        "stages": stages,
        "peak_rss_gb": _rss_gb(),
        "n_clusters": int(labels.max() + 1),
    }


def worker_neurox(data: Path, ct: float, labels_out: Path) -> dict:
    import contextlib
    import io

    from neurox.interpretation.clustering import create_correlation_clusters

    t = time.perf_counter()
    x = np.load(data)  # NeuroX works on an in-memory array (the output of create_tensors)
    load_s = time.perf_counter() - t
    t, c0 = time.perf_counter(), _cpu_s()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            labels = create_correlation_clusters(x, use_abs_correlation=True, clustering_threshold=ct)
    except MemoryError:
        return {
            "failed": "MemoryError in create_correlation_clusters",
            "after_s": time.perf_counter() - t,
            "peak_rss_gb": _rss_gb(),
        }
    total = time.perf_counter() - t
    labels = np.asarray(labels)
    np.save(labels_out, labels)
    return {
        "time_s": total,
        "cpu_s": _cpu_s() - c0,
        "load_s": load_s,
        "peak_rss_gb": _rss_gb(),
        "n_clusters": int(np.unique(labels).size),
    }


def worker_gemm(data: Path) -> dict:
    import torch
    from scipy.linalg import blas

    x = torch.from_numpy(np.load(data))
    out = {}
    # The work lexp-float32 does (only one triangle of XᵀX): OpenBLAS ssyrk, R·N² flops.
    t, c0 = time.perf_counter(), _cpu_s()
    g = blas.ssyrk(1.0, x.numpy().T, trans=0, lower=1)
    dt = time.perf_counter() - t
    del g
    out["ssyrk_float32"] = {
        "time_s": dt,
        "cpu_s": _cpu_s() - c0,
        "gflops": x.shape[0] * x.shape[1] ** 2 / dt / 1e9,
    }
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = x if dtype == torch.float32 else x.to(dtype)
        t, c0 = time.perf_counter(), _cpu_s()
        g = a.T @ a
        dt = time.perf_counter() - t
        del g
        out[name] = {
            "time_s": dt,
            "cpu_s": _cpu_s() - c0,
            "gflops": 2 * a.shape[0] * a.shape[1] ** 2 / dt / 1e9,
        }
        del a
    out["time_s"] = out["float32"]["time_s"]
    out["cpu_s"] = out["float32"]["cpu_s"]
    out["peak_rss_gb"] = _rss_gb()
    return out


def run_worker(args: argparse.Namespace) -> int:
    data, labels_out = Path(args.data), Path(args.labels_out) if args.labels_out else None
    if args.worker == "lexp":
        res = worker_lexp(data, args.ct, args.compute, labels_out)
    elif args.worker == "neurox":
        res = worker_neurox(data, args.ct, labels_out)
    else:
        res = worker_gemm(data)
    print("RESULT " + json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------- driver
def mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def spawn(cmd: list[str], as_limit_gb: float | None = None) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": THREADS,
        "OPENBLAS_NUM_THREADS": THREADS,
        "MKL_NUM_THREADS": THREADS,
    }
    env.pop("VIRTUAL_ENV", None)

    def limit() -> None:
        if as_limit_gb is not None:
            lim = int(as_limit_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {
            "failed": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:],
            "process_wall_s": wall,
            "loadavg_before": load,
        }
    res = json.loads(lines[-1][len("RESULT ") :])
    res["process_wall_s"] = wall
    res["loadavg_before"] = load
    return res


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    from lexp.redundancy.clustering import adjusted_rand  # lazily: the NeuroX worker has no lexp

    return adjusted_rand(a, b)


def _said(name: str, res: dict) -> None:
    """Each run's figures as soon as it ends: a later failure must not lose a 20-minute run."""
    keys = ("time_s", "cpu_s", "peak_rss_gb", "n_clusters")
    print(
        f"  {name}: " + ", ".join(f"{k} {res[k]:.4g}" for k in keys if isinstance(res.get(k), int | float)),
        flush=True,
    )


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=150_000)
    p.add_argument("--layers", type=int, default=13)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ct", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/lexp-bench-clustering")
    p.add_argument("--out", default="bench_results/clustering.json")
    p.add_argument("--skip-neurox", action="store_true")
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument(
        "--only",
        help="comma-separated runs to (re)do, e.g. 'neurox'; the others are taken from --out "
        "when it holds the same configuration",
    )
    p.add_argument("--neurox-python", default=str(NEUROX_PYTHON))
    p.add_argument("--worker", choices=["lexp", "neurox", "gemm"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--compute", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n = args.layers * args.hidden
    data = work / f"acts_r{args.rows}_n{n}_s{args.seed}.npy"
    if not data.exists():
        print(f"writing {args.rows} × {n} float32 synthetic activations to {data} ...", flush=True)
        t = time.perf_counter()
        write_synthetic(data, args.rows, args.layers, args.hidden, args.seed)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--ct", str(args.ct)]
    results: dict[str, dict] = {}
    wanted = set(RUNS if not args.only else args.only.split(","))
    if wanted - set(RUNS):
        p.error(f"--only: unknown runs {sorted(wanted - set(RUNS))}; choose from {RUNS}")
    config = {"rows": args.rows, "neurons": n, "ct": args.ct, "seed": args.seed}
    previous = Path(args.out)
    if args.only and previous.exists():
        old = json.loads(previous.read_text())
        if {k: old["config"].get(k) for k in config} == config:
            results = {k: v for k, v in old["results"].items() if k not in wanted}
    for compute in ("float32", "bfloat16"):
        name = f"lexp-{compute}"
        if name not in wanted:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = spawn(
            [*me, "--worker", "lexp", "--compute", compute, "--labels-out", str(work / f"labels_{name}.npy")]
        )
        _said(name, results[name])
    if not args.skip_gemm and "gemm-floor" in wanted:
        print("running gemm-floor ...", flush=True)
        results["gemm-floor"] = spawn([*me, "--worker", "gemm"])
        _said("gemm-floor", results["gemm-floor"])
    if not args.skip_neurox and "neurox" in wanted:
        # np.corrcoef holds X (float32) and its float64 copy, plus the N × N results.
        need = (args.rows * n * (4 + 8) + 2 * n * n * 8) / GB + 0.5
        avail = mem_available_gb()
        if not Path(args.neurox_python).exists():
            results["neurox"] = {
                "skipped": f"{args.neurox_python} not found (run benchmarks/setup_neurox.sh)"
            }
        elif avail < need + 2.5:
            results["neurox"] = {"skipped": f"needs ≈ {need:.1f} GB, only {avail:.1f} GB available"}
        else:
            print(f"running neurox (estimated peak {need:.1f} GB, {avail:.1f} GB available) ...", flush=True)
            neurox_cmd = [
                args.neurox_python,
                *me[1:],
                "--worker",
                "neurox",
                "--labels-out",
                str(work / "labels_neurox.npy"),
            ]
            results["neurox"] = spawn(neurox_cmd, as_limit_gb=avail - 0.5)
            _said("neurox", results["neurox"])

    # ------------------------------------------------------------------ comparison and report
    results = {k: results[k] for k in RUNS if k in results}
    labels = {
        k: np.load(work / f"labels_{k}.npy") for k in results if k != "gemm-floor" and "time_s" in results[k]
    }
    agreement = {}
    for a, b in (("lexp-float32", "neurox"), ("lexp-bfloat16", "neurox"), ("lexp-bfloat16", "lexp-float32")):
        if a in labels and b in labels:
            agreement[f"{a} vs {b}"] = {
                "adjusted_rand": _ari(labels[a], labels[b]),
                "same_partition": same_partition(labels[a], labels[b]),
            }
    ratios = {}
    nx = results.get("neurox", {})
    floor = results.get("gemm-floor", {}).get("time_s")
    syrk_floor = results.get("gemm-floor", {}).get("ssyrk_float32", {}).get("time_s")
    for k in ("lexp-float32", "lexp-bfloat16"):
        r = results.get(k, {})
        if "time_s" not in r:
            continue
        ratios[k] = {}
        if "time_s" in nx:
            ratios[k]["speedup_vs_neurox"] = nx["time_s"] / r["time_s"]
            ratios[k]["memory_ratio_vs_neurox"] = nx["peak_rss_gb"] / r["peak_rss_gb"]
            # CPU seconds do not depend on how busy the shared host was during each run.
            ratios[k]["cpu_speedup_vs_neurox"] = nx["cpu_s"] / r["cpu_s"]
        if floor:
            ratios[k]["time_over_gemm_floor"] = r["time_s"] / floor
        if syrk_floor:
            ratios[k]["time_over_ssyrk_floor"] = r["time_s"] / syrk_floor
            ratios[k]["cpu_over_ssyrk_floor"] = r["cpu_s"] / results["gemm-floor"]["ssyrk_float32"]["cpu_s"]
    record = {
        "config": {
            "rows": args.rows,
            "neurons": n,
            "layers": args.layers,
            "hidden": args.hidden,
            "ct": args.ct,
            "seed": args.seed,
            "data": str(data),
            "threads": int(THREADS),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "results": results,
        "ratios": ratios,
        "agreement": agreement,
        "targets": {"speedup_vs_neurox": 3.0, "memory_ratio_vs_neurox": 3.0, "time_over_gemm_floor_max": 2.0},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))

    print(f"\ncorrelation clustering, {args.rows} rows × {n} neurons, ct = {args.ct}")
    print(
        f"{'run':16s} {'time s':>8s} {'CPU s':>8s} {'peak RSS GB':>12s} {'clusters':>9s} {'load':>5s}  notes"
    )
    for k, r in results.items():
        if "time_s" in r:
            note = ""
            if "stages" in r:
                note = " ".join(f"{s[:-2]} {v:.1f}" for s, v in r["stages"].items())
            elif k == "gemm-floor":
                note = (
                    f"torch f32 XᵀX {r['float32']['gflops']:.0f} GFLOP/s; "
                    f"bf16 XᵀX {r['bfloat16']['time_s']:.1f} s ({r['bfloat16']['gflops']:.0f} GFLOP/s); "
                    f"OpenBLAS ssyrk {r['ssyrk_float32']['time_s']:.1f} s"
                )
            elif "load_s" in r:
                note = f"+ {r['load_s']:.1f} s np.load"
            print(
                f"{k:16s} {r['time_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_gb']:12.2f} {r.get('n_clusters', ''):>9} "
                f"{r['loadavg_before']:5.1f}  {note}"
            )
        else:
            print(
                f"{k:16s} {'-':>8s} {'-':>8s} {r.get('peak_rss_gb', float('nan')):12.2f}  "
                f"{r.get('skipped') or r.get('failed')}"
            )
    for k, rr in ratios.items():
        print(f"{k}: " + ", ".join(f"{m} {v:.2f}" for m, v in rr.items()))
    for k, v in agreement.items():
        print(f"{k}: ARI {v['adjusted_rand']:.5f}, identical partition {v['same_partition']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
