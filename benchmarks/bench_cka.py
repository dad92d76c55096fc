"""Benchmark: the extra cost of the debiased-CKA sums in the streaming covariance pass.

``streaming_moments`` over the same float16 memory-mapped file (``--rows`` × ``--layers`` ·
``--hidden``, MiniLM size by default: 150,000 × 7 × 384 = 2,688 neurons), once plain and once
with ``layer_sizes`` (what ``analysis=general`` and ``analysis=compare`` pass), alternating,
``--repeats`` times each; reports the best and median wall and CPU seconds of each and the
relative extra cost. Also times ``cka_matrix`` (biased and debiased) from the moments.

Usage::

    python benchmarks/bench_cka.py                        # 150,000 × 2,688
    python benchmarks/bench_cka.py --rows 50000 --repeats 2

The data file is cached in ``--workdir`` (default ``/tmp/lexp-bench-cka``). Results go to stdout
as JSON (and to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _data(path: Path, rows: int, n: int, seed: int = 0) -> np.ndarray:
    if not path.exists():
        rng = np.random.default_rng(seed)
        mix = (rng.standard_normal((64, n)) * 0.3).astype(np.float32)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, n))
        for start in range(0, rows, 10_000):
            stop = min(rows, start + 10_000)
            block = rng.standard_normal((stop - start, 64), dtype=np.float32) @ mix
            block += rng.standard_normal((stop - start, n), dtype=np.float32)
            out[start:stop] = block + 3.0
        out.flush()
        del out
    return np.load(path, mmap_mode="r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--chunk-rows", type=int, default=16_384)
    parser.add_argument("--compute", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lexp-bench-cka"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from lexp.redundancy.cka import cka_matrix
    from lexp.redundancy.covariance import streaming_moments

    n = args.layers * args.hidden
    args.workdir.mkdir(parents=True, exist_ok=True)
    x = _data(args.workdir / f"x-{args.rows}x{n}.npy", args.rows, n)
    sizes = [args.hidden] * args.layers
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "debiased_sums": []}
    moments = None
    streaming_moments(x[:2048], chunk_rows=1024, layer_sizes=sizes)  # warm-up (BLAS, page cache)
    for _ in range(args.repeats):
        for name, extra in (("plain", None), ("debiased_sums", sizes)):
            wall, cpu = time.perf_counter(), time.process_time()
            m = streaming_moments(x, chunk_rows=args.chunk_rows, compute=args.compute, layer_sizes=extra)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            if extra is not None:
                moments = m
            del m
    assert moments is not None
    t0 = time.perf_counter()
    cka_matrix(moments, args.layers, args.hidden)
    t1 = time.perf_counter()
    cka_matrix(moments, args.layers, args.hidden, debiased=True)
    t2 = time.perf_counter()

    def summary(values: list[tuple[float, float]]) -> dict[str, float]:
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        return {
            "wall_best_s": round(min(walls), 3),
            "wall_median_s": round(statistics.median(walls), 3),
            "cpu_best_s": round(min(cpus), 3),
            "cpu_median_s": round(statistics.median(cpus), 3),
        }

    plain, extra = summary(times["plain"]), summary(times["debiased_sums"])
    result = {
        "rows": args.rows,
        "neurons": n,
        "layers": args.layers,
        "chunk_rows": args.chunk_rows,
        "compute": args.compute,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "plain": plain,
        "with_debiased_sums": extra,
        "extra_wall_best_pct": round(100 * (extra["wall_best_s"] / plain["wall_best_s"] - 1), 1),
        "extra_cpu_best_pct": round(100 * (extra["cpu_best_s"] / plain["cpu_best_s"] - 1), 1),
        "cka_matrix_biased_s": round(t1 - t0, 4),
        "cka_matrix_debiased_s": round(t2 - t1, 4),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
