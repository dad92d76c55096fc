"""Peak RSS and wall time of a whole `python -m lexp.run` (default: task=pos, the issue's number).

Usage: python benchmarks/bench_rss.py [hydra overrides ...]   e.g.  python benchmarks/bench_rss.py task=pos
Prints wall time, peak RSS of the run (children's ru_maxrss) and the oracle scores, and writes
bench_results/rss_<task>.json. Run it once with a cold cache (extraction) and once warm (reuse).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    overrides = argv or ["task=pos"]
    run_dir = Path(tempfile.mkdtemp(prefix="lexp-rss-"))
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    cmd = [
        sys.executable,
        "-m",
        "lexp.run",
        *overrides,
        "logger=none",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    results = json.loads((run_dir / "results.json").read_text())
    record = {
        "command": " ".join(cmd),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "stores_reused": results.get("stores_reused"),
        "rows": results.get("rows"),
        "n_neurons": results.get("n_neurons"),
        "oracle": results.get("oracle"),
        "timings_s": results.get("timings_s"),
    }
    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "pos")
    out = Path("bench_results") / f"rss_{task}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    metric = "pearson" if results.get("task_kind") == "regression" else "accuracy"
    print(f"lexp.run {' '.join(overrides)}")
    print(f"  wall time      {wall:.1f} s   (stages: {results['timings_s']})")
    print(f"  peak RSS       {peak_mb:.0f} MB")
    print(f"  stores reused  {results.get('stores_reused')}")
    print(
        f"  oracle {metric}  dev {results['oracle']['dev'][metric]:.4f}  test {results['oracle']['test'][metric]:.4f}"
    )
    print(f"  written        {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
