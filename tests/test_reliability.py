"""Reliability as a hostile-but-fair user sees it: settings beyond the machine, misspelt keys and
missing inputs refused before any work; one integrity rule for reuse and ``lexp.verify``; a bad disk,
a signal or a tampered file ends in one ``lexp: error:`` line and nothing half-written.
Every test here failed on the code before its fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp import store as store_mod
from lexp.errors import LexpInputError, LexpModelError
from lexp.experiment import config_dir
from lexp.schema import MAX_THREADS, check_config
from lexp.store import StoreWriter, check_integrity, ensure_store, open_store, verify_store
from mounts import tmpfs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_LAYERS, HIDDEN = 3, 64


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ------------------------------------------------------------------- settings refused at start
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("threads.probes=100000", f"an integer in [1, {MAX_THREADS}] or null"),
        ("threads.extract=100000", f"an integer in [1, {MAX_THREADS}] or null"),
        ("extract.batch_size=100000000", "an integer in [1, 65536]"),
        ("extract.max_tokens=100000000000", "an integer in [1, 16777216]"),
        ("probe.batch_size=100000000000", "an integer in [1, 67108864]"),
        ("finetune.batch_size=100000000", "an integer in [1, 65536]"),
        ("probe.seeds=[1,1]", "holds 1 twice"),
    ],
)
def test_settings_beyond_the_machine_are_refused(override: str, expected: str) -> None:
    cfg = _cfg([override])
    with pytest.raises(LexpInputError) as err:
        check_config(cfg, device=False)
    message = str(err.value)
    assert message.startswith(override.split("=")[0]) and "Fix:" in message, message
    if "twice" in expected:
        assert "distinct" in message
    else:
        assert expected in message, message


def test_threads_within_the_bound_pass() -> None:
    check_config(_cfg([f"threads.probes={MAX_THREADS}", "threads.extract=1"]), device=False)


@pytest.mark.parametrize(
    ("overrides", "key", "near"),
    [
        (["+probe.lrr=0.5"], "probe.lrr", "probe.lr"),
        (["+task.label_colum=2"], "task.label_colum", "task.label_column"),
        (["+extract.subwrd=first"], "extract.subwrd", "extract.subword"),
        (["+store.dtyp=float32"], "store.dtyp", "store.dtype"),
        (["analysis=general", "+analysis.ctt=0.2"], "analysis.ctt", "analysis.ct"),
    ],
)
def test_a_misspelt_key_is_an_error_with_the_nearest_key(overrides, key, near, tmp_path: Path) -> None:
    from lexp.experiment import run

    cache = tmp_path / "cache"
    cfg = _cfg([*overrides, f"cache_dir={cache}", "logger=none"])
    with pytest.raises(LexpInputError) as err:
        check_config(cfg, device=False)
    message = str(err.value)
    assert message.startswith(f"{key} is not a setting") and f"Did you mean {near}?" in message, message
    start = time.perf_counter()
    with pytest.raises(LexpInputError, match=key):
        run(cfg, tmp_path / "run")
    assert time.perf_counter() - start < 5.0 and not cache.exists()


def test_a_missing_model_folder_is_refused_before_the_data_is_read(tmp_path: Path, monkeypatch) -> None:
    from lexp import experiment

    def never(ctx) -> None:
        raise AssertionError("the task was read before the model was checked")

    monkeypatch.setattr(experiment, "read_task", never)
    cfg = _cfg([f"model.name_or_path={tmp_path / 'nowhere'}", f"cache_dir={tmp_path / 'c'}", "logger=none"])
    with pytest.raises(LexpModelError, match="is not an existing directory"):
        experiment.run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"].startswith("failed")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_model, tiny_bert

    tmp = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_bert(tmp, layers=1, max_positions=16)
    return save_model(model, tokenizer, tmp / "model")


def _columns_files(folder: Path, dev_words: int = 3) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, length in (("train", 6, 4), ("dev", 2, dev_words), ("test", 2, 4)):
        sentence = "".join("fox\tNN\n" if i % 2 else "the\tDT\n" for i in range(length))
        files[split] = folder / f"{split}.txt"
        files[split].write_text((sentence + "\n") * n, encoding="utf-8")
    return files


def _tiny_run_cfg(files: dict[str, Path], model: Path, cache: Path, *extra: str):
    return _cfg(
        [
            "task=custom_columns",
            *(f"task.files.{s}={p}" for s, p in files.items()),
            f"model.name_or_path={model}",
            "model.name=tiny",
            f"cache_dir={cache}",
            "logger=none",
            "progress=false",
            "probe.epochs=1",
            "device=cpu",
            *extra,
        ]
    )


def test_a_too_long_dev_sentence_is_refused_before_the_train_store_is_built(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lexp.experiment import run

    files = _columns_files(tmp_path / "data", dev_words=40)  # 42 tokens > the model's 16
    cache = tmp_path / "cache"
    cfg = _tiny_run_cfg(files, tiny_model_dir, cache, "extract.long_sentences=error")
    with pytest.raises(LexpInputError, match=r"dev\.txt:1\): 42 tokens") as err:
        run(cfg, tmp_path / "run")
    assert "longer than the model maximum of 16" in str(err.value)
    stores = cache / "stores" / "tiny"
    assert not stores.exists() or not [p for p in stores.iterdir() if p.name.startswith("train-")]


# ------------------------------------------------------------------------------ integrity rule
def _store(
    path: Path, n_rows: int = 500, seed: int = 0, hidden: int = HIDDEN, n_layers: int = N_LAYERS
) -> Path:
    rng = np.random.default_rng(seed)
    fp = {"fingerprint": "0123456789ab" + "0" * 52, "label_vocab": ["a", "b"], "model": "m", "task": "t"}
    with StoreWriter(path, n_rows=n_rows, n_layers=n_layers, hidden=hidden, manifest=fp) as w:
        w.write_rows(0, rng.standard_normal((n_rows, n_layers * hidden)).astype(np.float32))
        w.finish(rng.integers(0, 2, n_rows))
    return path


def _no_build(_: Path) -> None:
    raise AssertionError("a tampered store must not be rebuilt behind the user's back")


def _reuse_refused(path: Path, match: str) -> None:
    with pytest.raises(LexpInputError, match=match) as err:
        ensure_store(path, _no_build)
    assert str(path) in str(err.value) and "Delete this store directory" in str(err.value)
    report = verify_store(path)  # the same rule, every file re-hashed
    assert not report.ok and any(match.replace("\\", "") in p for p in report.problems), report.problems


def test_replaced_labels_are_refused_by_reuse_and_verify(tmp_path: Path) -> None:
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")
    y_file = next(path.glob("labels/*/labels.npy"))
    y = np.load(y_file)
    np.save(y_file, np.zeros_like(y))  # same size, new content: case 1 of the audit
    _reuse_refused(path, "labels.npy does not match the checksum")


def test_replaced_offsets_are_refused(tmp_path: Path) -> None:
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")
    off = np.load(path / "sentence_offsets.npy")
    off[1:-1] = off[1:-1][::-1] * 0 + 1
    np.save(path / "sentence_offsets.npy", np.maximum.accumulate(off))
    _reuse_refused(path, "sentence_offsets.npy does not match the checksum")


@pytest.mark.parametrize(
    "edit",
    [{"n_layers": 6, "hidden": 32}, {"label_vocab": ["a"]}, {"fingerprint": "0123456789ab" + "f" * 52}],
    ids=["shape", "labels", "fingerprint"],
)
def test_an_edited_manifest_is_refused_by_reuse_and_verify(edit: dict, tmp_path: Path) -> None:
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")
    manifest = json.loads((path / "manifest.json").read_text())
    assert N_LAYERS * HIDDEN == 6 * 32  # the same columns: only the manifest can tell
    (path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    _reuse_refused(path, "manifest.json does not match its own checksum")


def test_verify_applies_the_fingerprint_rule_of_reuse(tmp_path: Path) -> None:
    """A store renamed to another fingerprint: the run refused it, verify said ok."""
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")
    moved = path.with_name("train-abcdefabcdef")
    path.rename(moved)
    with pytest.raises(LexpInputError, match="does not match the directory name"):
        ensure_store(moved, _no_build)
    report = verify_store(moved)
    assert not report.ok and "does not match the directory name" in report.problems[0]


def test_an_unchanged_store_is_reused_without_reading_its_files(tmp_path: Path, monkeypatch) -> None:
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")

    def no_scan(*args, **kwargs):
        raise AssertionError("an unchanged store must not be re-hashed")

    monkeypatch.setattr(store_mod, "_scan", no_scan)
    store, reused = ensure_store(path, _no_build)
    assert reused and check_integrity(store, full=False).rehashed == ()


def test_a_touched_but_intact_file_is_rehashed_once_and_used(tmp_path: Path, caplog) -> None:
    path = _store(tmp_path / "stores" / "m" / "t" / "train-0123456789ab")
    y_file = next(path.glob("labels/*/labels.npy"))
    os.utime(y_file, ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="lexp.store"):
        store, reused = ensure_store(path, _no_build)
    assert reused and "labels.npy was modified" in caplog.text
    name = f"labels/{y_file.parent.name}/labels.npy"
    assert check_integrity(store, full=False).rehashed == (name,)


def test_dev_store_that_disagrees_with_train_is_refused(tmp_path: Path) -> None:
    from lexp.experiment import _check_consistent_stores

    train = open_store(_store(tmp_path / "train-0123456789ab"))
    dev = open_store(_store(tmp_path / "dev-0123456789ab", n_layers=6, hidden=32))
    with pytest.raises(LexpInputError, match=r"does not match the train store .*n_layers: 6 vs train 3"):
        _check_consistent_stores({"train": train, "dev": dev})
    _check_consistent_stores({"train": train, "dev": open_store(_store(tmp_path / "dev-0123456789ac"))})


# ----------------------------------------------------------------------------- a bad disk
@pytest.fixture
def ro_mount(tmp_path: Path):
    """A read-only tmpfs (stops root too, unlike chmod); skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        yield mount


def test_unwritable_cache_is_one_error_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from lexp import fs
    from lexp.experiment import run

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cfg = _cfg([f"cache_dir={a_file}", "logger=none"])
    with pytest.raises(LexpInputError, match=r"cache_dir=.*afile: this path is a file, not a folder"):
        run(cfg, tmp_path / "run")
    cfg = _cfg([f"cache_dir={a_file / 'below'}", "logger=none"])
    with pytest.raises(LexpInputError, match=r"cache_dir=.*: cannot write there \(.*a file, not a folder"):
        run(cfg, tmp_path / "run")

    real_open = os.open

    def read_only(path, flags, *args):  # a read-only mount, simulated (root ignores chmod)
        if ".lexp-write-test" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fs.os, "open", read_only)
    cfg = _cfg([f"cache_dir={tmp_path / 'cache'}", "logger=none"])
    with pytest.raises(LexpInputError, match=r"cannot write there \(the file system is read-only"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_read_only_mount_as_cache_and_run_dir(ro_mount: Path, tmp_path: Path, data_root: Path) -> None:
    env = {**ENV, "LEXP_DATA": str(data_root)}
    for args in (
        [f"cache_dir={ro_mount / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        [f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={ro_mount / 'run'}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lexp.run", "logger=none", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
        assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in done.stderr, done.stderr


def _enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path) if path else None)


def test_full_disk_keeps_a_final_status_in_results_json_and_no_tmp(tmp_path: Path, monkeypatch) -> None:
    from lexp.report.results import Report

    report = Report(tmp_path, task="pos", model="m", analysis="general", config={"x": "y" * 5000})
    real = Path.write_text

    def full(self: Path, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, "")  # the file is created, then the disk is full
            raise _enospc(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        report["status"] = "failed: OSError: disk full"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed: OSError: disk full" and data["task"] == "pos"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_full_disk_while_writing_the_linkage_is_one_error_line(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    from lexp.experiment import friendly_errors, run
    from lexp.redundancy import clustering

    files = _columns_files(tmp_path / "data")
    cache = tmp_path / "cache"
    cfg = _tiny_run_cfg(files, tiny_model_dir, cache, "analysis=general", "analysis.evaluate=false")
    disk_full = {"now": False}

    def save_linkage(linkage, path):
        Path(path).write_bytes(b"")
        disk_full["now"] = True
        raise _enospc(path)

    real_write = Path.write_text

    def write_text(self: Path, *args, **kwargs):  # from the linkage on, results.json.tmp hits the full disk
        if disk_full["now"] and self.name.endswith(".tmp"):
            real_write(self, "")
            raise _enospc(self)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(clustering, "save_linkage", save_linkage)
    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError) as err:
        run(cfg, tmp_path / "run")
    message = friendly_errors(err.value)
    assert message is not None and message.startswith("lexp: error: ") and "\n" not in message
    assert "linkage.npy: the disk is full" in message and "Fix:" in message
    status = json.loads((tmp_path / "run" / "results.json").read_text())["status"]
    assert status.startswith("failed: OSError")
    leftovers = [p for p in cache.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    leftovers += [p for p in (tmp_path / "run").rglob("*.tmp")]
    assert not leftovers, leftovers


# -------------------------------------------------------------------------------- signals
_KILL_SCRIPT = """
import os, signal, sys, time
import lexp.encoders.writer as writer
def write_extraction(stream, store_writer, offsets, **kw):
    os.kill(os.getpid(), signal.{sig})  # inside the StoreWriter block: a partial store exists
    time.sleep(30)
writer.write_extraction = write_extraction
from lexp.run import main
sys.argv = ["lexp.run", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_records_killed_cleans_partials_and_exits_128_plus_n(
    sig: str, code: int, tmp_path: Path, tiny_model_dir: Path
) -> None:
    files = _columns_files(tmp_path / "data")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [
        "task=custom_columns",
        *(f"task.files.{s}={p}" for s, p in files.items()),
        f"model.name_or_path={tiny_model_dir}",
        "model.name=tiny",
        f"cache_dir={cache}",
        "logger=none",
        "progress=false",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT.format(sig=sig), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"lexp: error: stopped by {sig}" in done.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == f"killed ({sig})"
    assert not [p for p in cache.rglob("*") if ".partial-" in p.name]


# --------------------------------------------------------------------- misleading messages
def _odd_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    fifo = tmp_path / "a_fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {
        "folder": (folder, "is a folder, not a file"),
        "fifo": (fifo, "is a named pipe (FIFO)"),
        "device": (Path("/dev/zero"), "is a device, not a regular file"),
        "loop": (loop, "is a symlink loop"),
        "missing": (tmp_path / "nope.txt", "does not exist"),
    }


def test_a_task_file_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    from lexp.tasks import load_task

    good = _columns_files(tmp_path / "data")
    for name, (path, words) in _odd_paths(tmp_path).items():
        cfg = {
            "name": "custom",
            "kind": "labelling",
            "reader": "columns",
            "data_dir": None,
            "files": {"train": str(path), "dev": str(good["dev"]), "test": None},
            "word_column": 0,
            "label_column": 1,
        }
        with pytest.raises(LexpInputError) as err:
            load_task(cfg)
        assert words in str(err.value), (name, str(err.value))


def test_predict_input_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path: Path, capsys) -> None:
    from test_extractor import predict_cli, save_tiny_extractor

    path, _ = save_tiny_extractor(tmp_path)
    capsys.readouterr()
    for name, (odd, words) in _odd_paths(tmp_path).items():
        rc, out, err = predict_cli([path, "--input", odd], capsys)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert f"{odd}: {words}" in err, (name, err)


def test_predict_warns_about_words_that_became_the_unknown_token(tmp_path: Path, capsys) -> None:
    from test_extractor import predict_cli, save_tiny_extractor

    path, _ = save_tiny_extractor(tmp_path)
    capsys.readouterr()
    text = tmp_path / "in.txt"
    text.write_text("The quick fox\nA zzqj cat\n", encoding="utf-8")
    rc, out, err = predict_cli([path, "--input", text], capsys)
    assert rc == 0 and out.count("\n") == 8
    assert "lexp: warning: 1 word(s) became the unknown token '[UNK]'" in err
    assert f"'zzqj' ({text}:2)" in err and "'fox'" not in err


# ------------------------------------------------------------------------- hostile files
def test_deeply_nested_results_json_is_left_out_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "results.json").write_text('{"schema_version": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for module in ("lexp.tables", "lexp.report"):
        extra = ["--out", str(tmp_path / "r.html")] if module == "lexp.report" else []
        done = subprocess.run(
            [sys.executable, "-m", module, str(tmp_path / "runs"), *extra],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr, done.stderr
        assert "nests JSON too deeply" in done.stderr, done.stderr
    from lexp.report.results_schema import MAX_DEPTH, UnreadableResults, load_results

    (run / "results.json").write_text('{"schema_version": 2, "x": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(UnreadableResults, match=f"levels deep; a results.json nests at most {MAX_DEPTH}"):
        load_results(run / "results.json")


@pytest.mark.parametrize("tamper", ["labels", "columns"])
def test_a_tampered_extractor_is_one_clear_error(tamper: str, tmp_path: Path, capsys) -> None:
    from safetensors.numpy import load_file, save_file

    from test_extractor import predict_cli, save_tiny_extractor

    path, _ = save_tiny_extractor(tmp_path)
    capsys.readouterr()
    if tamper == "labels":
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["labels"] = manifest["labels"][:2]
        (path / "manifest.json").write_text(json.dumps(manifest))
        expected = "expected (2 labels, 8 columns)"
    else:
        tensors = load_file(str(path / "probe.safetensors"))
        tensors["columns"][3] = 10_000
        save_file(tensors, str(path / "probe.safetensors"))
        expected = "columns run from 1 to 10000; the encoder has"
    text = tmp_path / "in.txt"
    text.write_text("The quick fox\n", encoding="utf-8")
    rc, out, err = predict_cli([path, "--input", text], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lexp: error: ") and expected in err and "re-run" in err, err


# ------------------------------------------------------------------------------- outputs
def test_forward_time_curve_runs_in_order_of_layers_kept() -> None:
    from lexp.analyses.pipeline import forward_curve

    records = [  # as forward_speedups returns them: the full model (6 layers) first
        {"n_layers": 6, "seconds_per_sentence": 0.006},
        {"n_layers": 0, "seconds_per_sentence": 0.001},
        {"n_layers": 3, "seconds_per_sentence": 0.0035},
        {"n_layers": 1, "seconds_per_sentence": 0.002},
    ]
    curve = forward_curve(records)
    assert [n for n, _ in curve] == [0, 1, 3, 6]
    assert curve[-1] == (6, pytest.approx(6.0)) and curve[0] == (0, pytest.approx(1.0))


def test_run_summary_names_labels_and_tokens_apart() -> None:
    from lexp.experiment import _unseen_text

    text = _unseen_text({"train": {}, "dev": {"FW": 3, "UH": 16}, "test": {"ADD": 8}})
    assert text == "; not in train (scored as errors): dev 2 labels (19 tokens), test 1 label (8 tokens)"
    assert _unseen_text({"dev": {}, "test": {}}) == "; every dev/test label is in train"


def test_table_rows_name_the_data_release(tmp_path: Path) -> None:
    from lexp.report.tables import Run, task_cell

    def run(files: list[str]) -> Run:
        return Run(path=tmp_path / "results.json", mtime_ns=0, data={"task": "sem", "data_files": files})

    assert task_cell(run(["/d/pmb/4.0.0/en/train.conll"])) == "sem (pmb 4.0.0)"
    assert task_cell(run(["/d/pmb/3.0.0/en/train.conll"])) == "sem (pmb 3.0.0)"
    assert task_cell(run(["/d/ud_english_ewt/en_ewt-ud-train.conllu"])) == "sem"


def test_report_captions_say_what_a_figure_shows() -> None:
    from lexp.report.html import FIGURE_CAPTIONS

    for name in (
        "cka.png",
        "cluster_makeup.png",
        "minimal_set.png",
        "forward_time.png",
        "classifier_time.png",
    ):
        assert not FIGURE_CAPTIONS[name].endswith(".png") and len(FIGURE_CAPTIONS[name].split()) >= 3


def test_the_feature_search_logs_every_probe_pass(caplog) -> None:
    from lexp.analyses.pipeline import logged_evaluator

    evaluate = logged_evaluator(lambda candidates: {i: {} for i in candidates})
    with caplog.at_level(logging.INFO, logger="lexp"):
        evaluate({0: {"a": np.arange(10), "b": np.arange(30)}})
        evaluate({0: {"c": np.arange(5)}})
    lines = [r.getMessage() for r in caplog.records]
    assert "pipeline: probe pass 1: 2 heads of 10, 30 neurons ..." in lines
    assert any(line.startswith("pipeline: probe pass 2 done in") for line in lines)


def test_readme_states_plain_facts_not_project_history() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    import re

    history = re.findall(r"(?i)\bissue \d+|\bsessions? so far|\bin earlier sessions|\bthe audit\b", text)
    assert not history, history
    assert "GPU figures: not yet measured" in text and "python benchmarks/bench_gpu.py" in text
