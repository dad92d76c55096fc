"""Benchmark: the paper's layer step with lexp's MultiHeadProbe against NeuroX 1.0.9.

The layer step of the paper (Section 6.1 and the LayerSelector of Section 7) trains, on the same
activations, one probe per layer, one probe per prefix of layers 0..k and the oracle (all layers).
lexp trains them all as heads of one ``MultiHeadProbe`` in a single pass over the data; NeuroX
trains them one after another with ``train_logistic_regression_probe`` (in its own venv, through
a subprocess, on the same arrays passed as ``.npy`` files). Same hyper-parameters on both sides
(λ1 = λ2 = 1e-5, 10 epochs, batch 128, Adam lr 1e-3) and the same batches: NeuroX trains in
row order, so lexp does too unless ``--order shuffled`` (its own seeded per-epoch shuffle). Both
run with torch's default threads and OpenMP's default wait policy, on an idle machine.

Also measured: lexp's single probe on all columns (``train_probes(dm, None)``, seconds per
epoch), against the number DESIGN.md quotes for NeuroX (2.4 s per epoch for 150,000 × 2,688 × 49
classes).

Usage::

    python benchmarks/bench_probes.py                       # 150,000 × 7·384, 49 classes (synthetic)
    python benchmarks/bench_probes.py --rows 20000          # quick
    python benchmarks/bench_probes.py --store <train-store> --dev-store <dev> --test-store <test>
    python benchmarks/bench_probes.py --precisions 32-true             # float32 only (default: both)

Writes JSON to ``--out`` (default ``bench_results/probes.json``). This file is also the NeuroX
worker (``--neurox-worker DIR``, run by the NeuroX venv's python), so it imports lexp lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NEUROX_PYTHON = REPO / ".venv-neurox" / "bin" / "python"
HYPER = {"l1": 1e-5, "l2": 1e-5, "lr": 1e-3, "batch_size": 128}
READ_STEPS = 16  # lexp's default (conf/probe/elasticnet.yaml): minibatches read per training batch


# ------------------------------------------------------------------------------------------ data
def synthetic(
    rows: int,
    n_layers: int,
    hidden: int,
    n_classes: int,
    seed: int,
    signal: tuple[float, float] = (0.15, 0.5),
) -> dict[str, np.ndarray]:
    """Random but learnable activations: class prototypes seen through a noisy random map per layer.

    Later layers carry a stronger class signal (as for POS in BERT), so per-layer accuracies differ;
    a shared latent noise keeps the oracle well below 100%. Class frequencies are Zipf-like.
    Dev and test have ``rows // 6`` rows each (EWT: 150K train tokens, 25K dev / test).
    """
    rng = np.random.default_rng(seed)
    latent = 24
    prototypes = rng.normal(size=(n_classes, latent))
    maps = rng.normal(size=(n_layers, latent, hidden)) / np.sqrt(latent)
    strength = np.linspace(*signal, n_layers)
    freq = 1.0 / np.arange(1, n_classes + 1) ** 0.8
    freq /= freq.sum()

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(n_classes, size=n, p=freq)
        y[:n_classes] = np.arange(n_classes)  # every class occurs (NeuroX counts classes from train)
        x = np.empty((n, n_layers * hidden), dtype=np.float32)
        for start in range(0, n, 8192):
            stop = min(start + 8192, n)
            z = prototypes[y[start:stop]] + 0.9 * rng.normal(size=(stop - start, latent))
            for layer in range(n_layers):
                block = strength[layer] * (z @ maps[layer]) + rng.standard_normal((stop - start, hidden))
                x[start:stop, layer * hidden : (layer + 1) * hidden] = block
        return x, y.astype(np.int64)

    data = {}
    for name, n in (("train", rows), ("dev", rows // 6), ("test", rows // 6)):
        data[f"x_{name}"], data[f"y_{name}"] = split(n)
    return data


def layer_step_subsets(n_layers: int, hidden: int) -> dict[str, np.ndarray]:
    """Per-layer probes, probes on layers 0..k (k = 1..L-2; 0..0 is layer 0, 0..L-1 the oracle), oracle."""
    subsets = {f"layer_{k}": np.arange(k * hidden, (k + 1) * hidden) for k in range(n_layers)}
    for k in range(1, n_layers - 1):
        subsets[f"layers_0-{k}"] = np.arange((k + 1) * hidden)
    subsets["oracle"] = np.arange(n_layers * hidden)
    return subsets


def _store_arrays(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Path], int, int]:
    """float32 .npy copies of the stores for NeuroX (written in chunks, never a float64 copy)."""
    from lexp.store import open_store

    paths = {}
    train = open_store(args.store, args.task)
    for split, path in (("train", args.store), ("dev", args.dev_store), ("test", args.test_store)):
        store = open_store(path, args.task)
        x_path = workdir / f"x_{split}.npy"
        out = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=store.activations.shape)
        row = 0
        for chunk in store.iter_chunks(8192):
            out[row : row + len(chunk)] = chunk
            row += len(chunk)
        out.flush()
        del out
        np.save(workdir / f"y_{split}.npy", np.asarray(store.labels, dtype=np.int64), allow_pickle=False)
        paths[f"x_{split}"] = x_path
    return paths, train.n_layers, train.hidden


# ------------------------------------------------------------------------------------- lexp side
class _InMemory:
    """Batches of an in-memory array; ``rows`` is a slice or an index array (no per-row collate)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        import torch

        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, rows):
        import torch

        if isinstance(rows, slice):
            return self.x[rows], self.y[rows]
        idx = torch.from_numpy(rows)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


def _array_datamodule(data: dict[str, np.ndarray], n_classes: int, batch_size: int, seed: int, shuffle: bool):
    """ActivationDataModule's batching (per-epoch order, ``read_steps`` minibatches per read) over
    in-memory arrays."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lexp.datamodules import EpochBatchSampler

    class ArrayDataModule(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.n_features = data["x_train"].shape[1]
            self.n_classes = n_classes
            self.regression = False
            self.batch_size = batch_size  # rows per optimiser step (the probes read it from here)

        def _loader(self, split: str, shuffle: bool, size: int) -> DataLoader:
            ds = _InMemory(data[f"x_{split}"], data[f"y_{split}"])
            sampler = EpochBatchSampler(len(ds), size, shuffle=shuffle, seed=seed)
            return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=lambda b: b)

        def train_dataloader(self):
            return self._loader("train", shuffle, batch_size * READ_STEPS)

        def val_dataloader(self):
            return self._loader("dev", False, 2048)

        def test_dataloader(self):
            return self._loader("test", False, 2048)

    return ArrayDataModule()


def run_lexp(datamodule, subsets, epochs: int, precision: str, progress: bool, select_on_dev: bool) -> dict:
    from lexp.probes import train_probes

    cfg = {
        "epochs": epochs,
        "lr": HYPER["lr"],
        "l1": HYPER["l1"],
        "l2": HYPER["l2"],
        "seed": 42,
        "select_on_dev": select_on_dev,
    }
    trainer = {"enable_progress_bar": progress, "precision": precision}
    cpu, wall = time.process_time(), time.perf_counter()
    results = train_probes(datamodule, subsets, probe_cfg=cfg, trainer_kwargs=trainer)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    first = next(iter(results.values()))
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "train_seconds": first["train_seconds"],
        "heads_trained": first["heads_in_pass"],
        "probes": {
            name: {
                "test_accuracy": r["test"]["accuracy"],
                "dev_accuracy": r["dev"]["accuracy"],
                "best_epoch": r["best_epoch"],
                "dev_history": r["dev_history"],
            }
            for name, r in results.items()
        },
    }


# ----------------------------------------------------------------------------------- NeuroX side
def run_neurox(workdir: Path, subsets: dict[str, np.ndarray], epochs: int, threads: int | None) -> dict:
    spec = {
        "subsets": {name: cols.tolist() for name, cols in subsets.items()},
        "epochs": epochs,
        "threads": threads,
        **HYPER,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    log = workdir / "neurox.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(NEUROX_PYTHON), str(Path(__file__).resolve()), "--neurox-worker", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"NeuroX worker failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}"
        )
    return json.loads((workdir / "neurox_result.json").read_text())


def neurox_worker(workdir: Path) -> None:
    """Runs inside the NeuroX venv: train and evaluate every probe one after another."""
    import torch
    from neurox.interpretation import linear_probe

    spec = json.loads((workdir / "spec.json").read_text())
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    arrays = {
        name: np.load(workdir / f"{name}.npy", mmap_mode="r") for name in ("x_train", "x_dev", "x_test")
    }
    labels = {name: np.load(workdir / f"{name}.npy") for name in ("y_train", "y_dev", "y_test")}
    total_cpu, total_wall = time.process_time(), time.perf_counter()
    probes = {}
    for name, cols in spec["subsets"].items():
        cols = np.asarray(cols)
        wall = time.perf_counter()
        # A NeuroX user slices the columns of every probe out of the full matrix (float32 copies).
        x_train = np.ascontiguousarray(arrays["x_train"][:, cols])
        prepared = time.perf_counter()
        torch.manual_seed(42)
        with contextlib.redirect_stdout(io.StringIO()):
            probe = linear_probe.train_logistic_regression_probe(
                x_train,
                labels["y_train"],
                lambda_l1=spec["l1"],
                lambda_l2=spec["l2"],
                num_epochs=spec["epochs"],
                batch_size=spec["batch_size"],
                learning_rate=spec["lr"],
            )
        trained = time.perf_counter()
        scores = {}
        for split in ("dev", "test"):
            x = np.ascontiguousarray(arrays[f"x_{split}"][:, cols])
            with contextlib.redirect_stdout(io.StringIO()):
                out = linear_probe.evaluate_probe(
                    probe, x, labels[f"y_{split}"], batch_size=spec["batch_size"]
                )
            scores[split] = float(out["__OVERALL__"])
        probes[name] = {
            "test_accuracy": scores["test"],
            "dev_accuracy": scores["dev"],
            "slice_seconds": prepared - wall,
            "train_seconds": trained - prepared,
            "seconds": time.perf_counter() - wall,
        }
        print(f"{name}: {probes[name]}", flush=True)
        del x_train
    result = {
        "wall_seconds": time.perf_counter() - total_wall,
        "cpu_seconds": time.process_time() - total_cpu,
        "probes": probes,
        "torch_threads": torch.get_num_threads(),
    }
    (workdir / "neurox_result.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=150_000, help="training rows of the synthetic data")
    parser.add_argument("--layers", type=int, default=7, help="layers incl. embeddings (MiniLM: 7)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--classes", type=int, default=49)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--store", help="a real train store (then also --dev-store and --test-store)")
    parser.add_argument("--dev-store")
    parser.add_argument("--task", help="whose labels, when the stores hold several tasks' (e.g. sem, ccg)")
    parser.add_argument("--test-store")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: torch's)"
    )
    parser.add_argument(
        "--precisions",
        default="32-true,bf16-mixed",
        help="comma-separated Lightning precisions for the lexp side (default: float32 and bfloat16 products)",
    )
    parser.add_argument(
        "--select-on-dev",
        action="store_true",
        help="lexp keeps each probe's best dev epoch (NeuroX has no such option: off by default, so "
        "both sides report the last epoch; dev is evaluated every epoch either way)",
    )
    parser.add_argument(
        "--order",
        choices=("sequential", "shuffled"),
        default="sequential",
        help="lexp's batch order: 'sequential' = store order, as NeuroX trains (same batches on both "
        "sides, the default); 'shuffled' = lexp's default seeded per-epoch shuffle",
    )
    parser.add_argument("--skip-neurox", action="store_true")
    parser.add_argument("--skip-single", action="store_true", help="skip lexp's single-probe epoch timing")
    parser.add_argument("--progress", action="store_true", help="show lexp's progress bars")
    parser.add_argument("--out", default=str(REPO / "bench_results" / "probes.json"))
    parser.add_argument("--workdir", help="where the .npy files for NeuroX go (default: a temp dir)")
    parser.add_argument("--neurox-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.neurox_worker:
        neurox_worker(Path(args.neurox_worker))
        return

    # OpenMP's default (spinning) wait policy is kept: these probes run thousands of small kernels
    # per epoch, and with OMP_WAIT_POLICY=PASSIVE waking the worker thread for each one made a step
    # 2.3x slower here (9.1 vs 3.9 ms) — for NeuroX too. Run on an idle machine; the policy in force
    # is recorded in the report and inherited by the NeuroX worker (same setting on both sides).
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_probes_"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        if args.store:
            from lexp.datamodules import ActivationDataModule

            if not (args.dev_store and args.test_store):
                parser.error("--store needs --dev-store and --test-store")
            _, n_layers, hidden = _store_arrays(args, workdir)
            dm = ActivationDataModule(
                args.store,
                args.dev_store,
                args.test_store,
                batch_size=HYPER["batch_size"],
                seed=42,
                shuffle=args.order == "shuffled",
                read_steps=READ_STEPS,
                task=args.task,
            )
            n_classes, rows, source = dm.n_classes, dm.stores["train"].n_rows, f"store {args.store}"
            data = None
        else:
            n_layers, hidden, n_classes = args.layers, args.hidden, args.classes
            t = time.perf_counter()
            data = synthetic(args.rows, n_layers, hidden, n_classes, args.seed)
            for name, array in data.items():
                np.save(workdir / f"{name}.npy", array, allow_pickle=False)
            print(
                f"synthetic data {args.rows} × {n_layers * hidden}, {n_classes} classes: {time.perf_counter() - t:.1f} s"
            )
            dm = _array_datamodule(data, n_classes, HYPER["batch_size"], 42, args.order == "shuffled")
            rows, source = args.rows, "synthetic"

        subsets = layer_step_subsets(n_layers, hidden)
        print(
            f"layer step: {len(subsets)} probes on {rows} rows × {n_layers * hidden} columns, {args.epochs} epochs"
        )

        lexp, singles = {}, {}
        for precision in args.precisions.split(","):
            ours = run_lexp(dm, subsets, args.epochs, precision, args.progress, args.select_on_dev)
            lexp[precision] = ours
            print(
                f"lexp MultiHeadProbe [{precision}]: {ours['wall_seconds']:.1f} s wall ({ours['cpu_seconds']:.1f} s CPU)"
            )
            if not args.skip_single:
                single = run_lexp(dm, None, args.epochs, precision, args.progress, args.select_on_dev)
                single["seconds_per_epoch"] = single["train_seconds"] / args.epochs
                singles[precision] = single
                print(
                    f"lexp single probe on all columns [{precision}]: {single['seconds_per_epoch']:.2f} s/epoch "
                    "(dev evaluation included)"
                )

        theirs = None
        if not args.skip_neurox:
            theirs = run_neurox(workdir, subsets, args.epochs, args.threads)
            print(
                f"NeuroX, probes one by one: {theirs['wall_seconds']:.1f} s wall ({theirs['cpu_seconds']:.1f} s CPU)"
            )
            # The machine's speed drifts over minutes; lexp runs again after NeuroX, and the ratio
            # uses the mean of lexp's two runs, so a drift during the long NeuroX run cancels.
            for precision, ours in lexp.items():
                again = run_lexp(dm, subsets, args.epochs, precision, args.progress, args.select_on_dev)
                ours["after_neurox"] = {k: again[k] for k in ("wall_seconds", "cpu_seconds")}
                print(
                    f"lexp MultiHeadProbe [{precision}] again after NeuroX: {again['wall_seconds']:.1f} s wall "
                    f"({again['cpu_seconds']:.1f} s CPU)"
                )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "source": source,
        "rows": rows,
        "columns": n_layers * hidden,
        "classes": n_classes,
        "epochs": args.epochs,
        "select_on_dev": args.select_on_dev,
        "lexp_order": args.order,
        "probes": list(subsets),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "lexp": lexp,
        "lexp_single": singles,
        "neurox": theirs,
        "comparison": {},
    }
    for precision, ours in lexp.items():
        print(
            f"\n[{precision}] {'probe':<14}{'lexp test acc':>14}{'NeuroX':>10}{'diff (pt)':>11}{'NeuroX s':>10}"
        )
        diffs = []
        for name in subsets:
            a = ours["probes"][name]["test_accuracy"]
            if theirs:
                b = theirs["probes"][name]["test_accuracy"]
                diffs.append(100 * (a - b))
                line = f"{b:>10.4f}{100 * (a - b):>+11.2f}{theirs['probes'][name]['seconds']:>10.1f}"
            else:
                line = ""
            print(f"{'':<{len(precision) + 3}}{name:<14}{a:>14.4f}{line}")
        if theirs:
            runs = [ours, ours.get("after_neurox", ours)]
            wall = float(np.mean([r["wall_seconds"] for r in runs]))
            cpu = float(np.mean([r["cpu_seconds"] for r in runs]))
            cmp = {
                "lexp_wall_seconds_mean": wall,
                "lexp_cpu_seconds_mean": cpu,
                "speedup_wall": theirs["wall_seconds"] / wall,
                "speedup_cpu": theirs["cpu_seconds"] / cpu,
                "max_abs_accuracy_diff_points": float(np.max(np.abs(diffs))),
                "mean_accuracy_diff_points": float(np.mean(diffs)),
            }
            report["comparison"][precision] = cmp
            print(
                f"speed-up vs the mean of lexp's runs before and after NeuroX (wall): {cmp['speedup_wall']:.1f}x"
                f"   (CPU time: {cmp['speedup_cpu']:.1f}x)   "
                f"max |accuracy diff|: {cmp['max_abs_accuracy_diff_points']:.2f} points"
            )
    if theirs:
        neurox_oracle = theirs["probes"]["oracle"]["train_seconds"] / args.epochs
        report["neurox_oracle_seconds_per_epoch"] = neurox_oracle
        ours_oracle = ", ".join(f"lexp [{p}] {s['seconds_per_epoch']:.2f}" for p, s in singles.items())
        print(
            f"\noracle alone, s/epoch: NeuroX {neurox_oracle:.2f} (training only){', ' + ours_oracle if singles else ''}"
        )
    print(f"load average before/after: {load_before[0]:.1f} / {report['loadavg_after'][0]:.1f} (2 cores)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
