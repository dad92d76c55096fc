"""General analysis at LLM width: peak RSS and wall time of the blocked path, and its agreement
with the exact path. Prints its figures; each part runs in a child process under /usr/bin/time -v.

    # 1. a tiny random decoder of real width (16 layers × 2048 = 34,816 neurons, intermediate 256,
    #    BPE tokenizer trained here on EWT train) through `python -m lexp.run ... analysis=general`
    python benchmarks/bench_wide.py decoder --workdir /tmp/bench_wide
    # 2. a synthetic 131,072-neuron store (8,192 rows, 32 "layers" × 4,096 of residual-stream-like
    #    correlated data, float16 on disk): column stats + blocked co-moment + CKA + clustering
    #    (--compute bfloat16: bfloat16 screen + float32 linkage, ≈ 3× faster products on AVX-512-BF16)
    python benchmarks/bench_wide.py synthetic --workdir /tmp/bench_wide --neurons 131072 --rows 8192 --compute bfloat16
    # 3. agreement (partitions at every ct, layer CKA) and timings of exact (float32) vs blocked
    #    at <= 10K neurons (same synthetic kind of data; 13 "layers" × 768 like BERT-base)
    python benchmarks/bench_wide.py agree --workdir /tmp/bench_wide --neurons 9984 --rows 8192 --layer 768 \
        --cts 0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9

    # 4. extraction memory of that decoder on a whole EWT split through the store writer: sentence
    #    batches of 32 (before the width cap) against extract.max_tokens=auto (capped by width)
    python benchmarks/bench_wide.py extract --workdir /tmp/bench_wide --split test

One run at a time: (1) and (2) are the big measurements (several GB, minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: exit code, wall seconds, max RSS (GB), last output lines.
    Its stderr (progress) goes to ``log`` as it runs (``tail -f`` it)."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
    wall = time.perf_counter() - start
    stderr = Path(log).read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "max_rss_gb": round(int(rss.group(1)) * 1024 / 1e9, 3) if rss else None,
        "tail": (proc.stdout + stderr).splitlines()[-25:],
        "stdout": proc.stdout,
    }


def synthetic(path: Path, rows: int, neurons: int, layer: int, seed: int = 0) -> Path:
    """float16 .npy of residual-stream-like data: layer l = layer l-1 + noise of a random scale per
    unit, every 8th unit also mixed with its neighbour (so clusters span layers and units)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(
        path.with_suffix(".partial.npy"), mode="w+", dtype=np.float16, shape=(rows, neurons)
    )
    prev = rng.standard_normal((rows, layer), dtype=np.float32)
    for lo in range(0, neurons, layer):
        if lo:
            scale = rng.uniform(0.2, 1.5, layer).astype(np.float32)
            prev = prev + scale * rng.standard_normal((rows, layer), dtype=np.float32)
            mix = np.arange(layer) % 8 == 0
            prev[:, mix] += 0.5 * np.roll(prev, 1, axis=1)[:, mix]
        out[:, lo : lo + layer] = prev / np.sqrt(1 + lo / layer)
    out.flush()
    del out
    path.with_suffix(".partial.npy").rename(path)
    return path


def worker(args: argparse.Namespace) -> None:
    """Child process: one method over the synthetic .npy; prints a JSON line."""
    import torch

    from lexp.redundancy import cka, clustering, covariance, wide

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    x = np.load(args.data, mmap_mode="r")
    cts = [float(c) for c in args.cts.split(",")]
    n_layers = x.shape[1] // args.layer
    start = time.perf_counter()
    if args.method == "exact":
        m = covariance.streaming_moments(
            x, chunk_rows=16384, compute=args.compute, layer_sizes=[args.layer] * n_layers
        )
        cka_biased = cka.cka_matrix(m, n_layers, args.layer)  # before the co-moment becomes corr
        z = clustering.neuron_linkage(covariance.correlation(m, out=m.comoment))
        info = {"method": "exact"}
    else:
        res = wide.wide_general(
            x,
            ct_max=max(cts),
            budget_bytes=args.budget_gb * 1e9,
            chunk_rows=16384,
            compute=args.compute,
            layer_sizes=[args.layer] * n_layers,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        z, info, cka_biased = res.linkage, res.info, res.cka
    wall = time.perf_counter() - start
    labels = {f"{ct:g}": clustering.flat_clusters(z, ct) for ct in cts}
    print(f"clusters done: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    np.savez(args.out, cka=cka_biased, **labels)
    print(
        json.dumps(
            {
                "seconds": round(wall, 1),
                "info": info,
                "clusters": {k: int(v.max() + 1) for k, v in labels.items()},
            }
        )
    )


def decoder_folder(args: argparse.Namespace) -> Path:
    """The tiny random 16 × 2048 decoder under the workdir (built once)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from lexp.tasks.readers import read_columns
    from tiny_llama import tiny_llama

    folder = Path(args.workdir) / "llama16x2048"
    if not (folder / "config.json").exists():
        train = Path(args.data_root) / "ud_english_ewt" / "en_ewt-ud-train.conllu"
        sents = read_columns(train, word_column=1, label_column=4, separator="\t", min_columns=10)
        tiny_llama(
            folder,
            layers=16,
            hidden=2048,
            intermediate=256,
            heads=16,
            lines=[" ".join(s.words) for s in sents[:4000]],
            vocab_size=4000,
        )
    return folder


def run_decoder(args: argparse.Namespace) -> None:
    folder = decoder_folder(args)
    cmd = [
        sys.executable,
        "-m",
        "lexp.run",
        "task=pos",
        f"model.name_or_path={folder}",
        "model.name=llama16x2048",
        "task.max_train_tokens=3000",
        "analysis=general",
        f"limit.dev={args.limit_eval}",
        f"limit.test={args.limit_eval}",
        f"cache_dir={Path(args.workdir) / 'cache'}",
        "logger=none",
        f"data_root={args.data_root}",
        f"hydra.run.dir={Path(args.workdir) / 'run_decoder'}",
        "progress=false",
    ]
    cmd += args.extra
    print("command:", " ".join(cmd))
    res = timed(cmd, Path(args.workdir) / "decoder.log")
    print(json.dumps({k: v for k, v in res.items() if k not in ("tail", "stdout")}))
    print("\n".join(res["tail"]))


def run_synthetic(args: argparse.Namespace, method: str = "blocked") -> dict:
    data = synthetic(
        Path(args.workdir) / f"synthetic_{args.rows}x{args.neurons}.npy", args.rows, args.neurons, args.layer
    )
    compute = "float32" if method == "exact" else args.compute  # the reference is always float32
    out = Path(args.workdir) / f"labels_{method}_{args.neurons}_{compute}.npz"
    cmd = [
        sys.executable,
        __file__,
        "_worker",
        "--data",
        str(data),
        "--method",
        method,
        "--cts",
        args.cts,
        "--budget-gb",
        str(args.budget_gb),
        "--compute",
        compute,
        "--layer",
        str(args.layer),
        "--out",
        str(out),
    ]
    print("command:", " ".join(cmd), flush=True)
    res = timed(cmd, out.with_suffix(".log"))
    line = next((x for x in reversed(res["stdout"].splitlines()) if x.startswith("{")), None)
    res["result"] = json.loads(line) if line else None
    print(
        json.dumps(
            {
                "method": method,
                "neurons": args.neurons,
                "rows": args.rows,
                "compute": compute,
                "rc": res["rc"],
                "wall_s": res["wall_s"],
                "max_rss_gb": res["max_rss_gb"],
                "result": res["result"],
            }
        )
    )
    if res["rc"]:
        print("\n".join(res["tail"]))
    return res | {"labels": out}


def run_agree(args: argparse.Namespace) -> None:
    from lexp.redundancy.clustering import adjusted_rand

    exact = run_synthetic(args, "exact")
    blocked = run_synthetic(args, "blocked")
    a, b = np.load(exact["labels"]), np.load(blocked["labels"])
    print(f"layer CKA: max abs diff exact vs blocked {np.abs(a['cka'] - b['cka']).max():.2e}")
    for ct in (f for f in a.files if f != "cka"):
        same = (
            len(set(zip(a[ct].tolist(), b[ct].tolist(), strict=True)))
            == len(set(a[ct].tolist()))
            == len(set(b[ct].tolist()))
        )
        print(
            f"ct={ct}: clusters exact {a[ct].max() + 1}, blocked {b[ct].max() + 1}, identical partition {same}, "
            f"ARI {adjusted_rand(a[ct], b[ct]):.6f}"
        )


def extract_worker(args: argparse.Namespace) -> None:
    """One split of EWT through extract_words and the background store writer, as a run writes a
    store; prints the peak anonymous memory sampled every 0.2 s (the weights are memory-mapped)."""
    import threading

    from lexp.encoders.extract import extract_words
    from lexp.encoders.loading import load_encoder
    from lexp.encoders.writer import write_extraction
    from lexp.store import StoreWriter
    from lexp.tasks.readers import read_columns

    def anon_gb() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon")) / 1e6

    conllu = Path(args.data_root) / "ud_english_ewt" / f"en_ewt-ud-{args.split}.conllu"
    words = [
        s.words for s in read_columns(conllu, word_column=1, label_column=4, separator="\t", min_columns=10)
    ]
    enc = load_encoder({"name_or_path": args.data})
    peak, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_gb())
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    offsets = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    budget = None if args.max_tokens == "none" else args.max_tokens
    start = time.perf_counter()
    ex = extract_words(
        enc.model,
        enc.tokenizer,
        words,
        batch_size=32,
        max_tokens=budget,
        progress=False,
        rows_dtype="float16",
    )
    with StoreWriter(Path(args.out), n_rows=int(offsets[-1]), n_layers=17, hidden=2048) as writer:
        write_extraction(ex, writer, offsets)
        writer.finish(None, offsets)
    done.set()
    print(json.dumps({"max_tokens": args.max_tokens, "batches": ex.stats.n_batches, "rows": int(offsets[-1]),
                      "seconds": round(time.perf_counter() - start, 1), "peak_anon_gb": round(peak[0], 2)}))  # fmt: skip


def run_extract(args: argparse.Namespace) -> None:
    """Extraction memory of the 16 × 2048 decoder on a whole EWT split: sentence batches of 32
    (max_tokens=none, lexp before the width cap) against max_tokens=auto (hidden states per forward
    capped by width), each in a child process."""
    import shutil

    folder = decoder_folder(args)
    for budget in ("none", "auto"):
        out = Path(args.workdir) / f"store_{args.split}_{budget}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "_extract", "--data", str(folder), "--split", args.split,
               "--max-tokens", budget, "--out", str(out), "--data-root", args.data_root]  # fmt: skip
        res = timed(cmd, Path(args.workdir) / f"extract_{budget}.log")
        line = next((x for x in reversed(res["stdout"].splitlines()) if x.startswith("{")), "{}")
        print(json.dumps({"rc": res["rc"], "max_rss_gb": res["max_rss_gb"], **json.loads(line)}), flush=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["decoder", "synthetic", "agree", "extract", "_worker", "_extract"])
    p.add_argument("--workdir", default="/tmp/bench_wide")
    p.add_argument("--data-root", default=os.environ.get("LEXP_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--neurons", type=int, default=131072)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--layer", type=int, default=4096, help="columns per synthetic layer")
    p.add_argument("--cts", default="0.1,0.2,0.3")
    p.add_argument("--budget-gb", type=float, default=14.0)
    p.add_argument("--compute", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--limit-eval", type=int, default=200, help="decoder: dev/test sentences (extraction is slow)"
    )
    p.add_argument("--data")
    p.add_argument("--method", choices=["exact", "blocked"])
    p.add_argument("--out")
    p.add_argument("--split", default="test", help="extract: the EWT split")
    p.add_argument("--max-tokens", default="auto", help="_extract: auto | none")
    p.add_argument("extra", nargs="*", help="decoder: more lexp.run overrides")
    args = p.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.mode == "_worker":
        worker(args)
    elif args.mode == "_extract":
        extract_worker(args)
    elif args.mode == "extract":
        run_extract(args)
    elif args.mode == "decoder":
        run_decoder(args)
    elif args.mode == "synthetic":
        run_synthetic(args)
    else:
        run_agree(args)


if __name__ == "__main__":
    main()
