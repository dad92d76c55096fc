"""Per-entry cache locks (lexp.locks) with several real processes started at once.

Each test starts plain subprocesses on one missing entry and asserts exactly one build, identical
results everywhere and no partial directory left; a killed builder neither blocks the next one
nor leaves its partial behind; a builder never replaces an entry while a reader holds it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lexp.locks import PARTIAL, ensure_entry, entry_lock, lock_path, remove_partials

N_PROCS = 4

# A toy cache entry: build() logs its pid, sleeps so that the others surely wait, writes a partial
# directory and renames it into place.
ENTRY_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from lexp.locks import PARTIAL, ensure_entry

entry, log, go = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
while time.time() < go:  # start together
    time.sleep(0.005)

def build(target):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    tmp = target.with_name(target.name + f"{PARTIAL}{os.getpid()}")
    tmp.mkdir()
    time.sleep(0.5)
    (tmp / "value.json").write_text(json.dumps({"builder": os.getpid(), "value": 42}))
    os.replace(tmp, target)

value, reused = ensure_entry(
    entry, ready=lambda p: (p / "value.json").exists(), build=build,
    load=lambda p: json.loads((p / "value.json").read_text()),
)
print(json.dumps({"value": value, "reused": reused}))
"""


def _start_together(script: str, *args: str, n: int = N_PROCS, delay: float = 1.5) -> list[dict]:
    """Run ``n`` copies of ``script`` that all start working at the same instant; their JSON lines."""
    go = str(time.time() + delay)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args, go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_one_build_for_many_processes_started_at_once(tmp_path: Path) -> None:
    entry, log = tmp_path / "cache" / "entry-0123", tmp_path / "builds.log"
    results = _start_together(ENTRY_SCRIPT, str(entry), str(log))
    builders = log.read_text().split()
    assert len(builders) == 1  # exactly one build
    assert sorted(r["reused"] for r in results) == [False] + [True] * (N_PROCS - 1)
    assert {json.dumps(r["value"]) for r in results} == {
        json.dumps({"builder": int(builders[0]), "value": 42})
    }
    assert not list(entry.parent.glob(f"*{PARTIAL}*"))  # no partial entry left
    assert lock_path(entry).exists()


STORE_SCRIPT = """
import json, os, sys, time
import numpy as np
from pathlib import Path
from lexp.store import StoreWriter, ensure_store

path, log, go = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
while time.time() < go:
    time.sleep(0.005)

def build(target):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((200, 3 * 8)).astype(np.float32)
    with StoreWriter(target, n_rows=200, n_layers=3, hidden=8, manifest={"fingerprint": "ab" * 32}) as w:
        for start in range(0, 200, 50):
            time.sleep(0.1)  # a slow extraction: the others must wait, not read a partial store
            w.write_rows(start, acts[start:start + 50])
        w.finish(np.arange(200) % 5)

store, reused = ensure_store(path, build)
print(json.dumps({"reused": reused, "sum": float(np.asarray(store.activations, dtype=np.float64).sum()),
                  "rows": store.n_rows, "checksums": store.manifest["checksums"]}))
"""


def test_activation_store_is_extracted_once_by_concurrent_processes(tmp_path: Path) -> None:
    path = tmp_path / "stores" / "m" / "toy" / "train-abababababab"
    log = tmp_path / "builds.log"
    results = _start_together(STORE_SCRIPT, str(path), str(log))
    assert len(log.read_text().split()) == 1
    assert sorted(r["reused"] for r in results) == [False] + [True] * (N_PROCS - 1)
    assert len({json.dumps(r, sort_keys=True) for r in ({**r, "reused": None} for r in results)}) == 1
    assert results[0]["rows"] == 200
    assert not list(path.parent.glob(f"*{PARTIAL}*"))


# A clustering cache (analysis=general's linkage + CKA) over one small real store, built by
# several processes at once through the real lexp.analyses.general.clustering_cache.
CLUSTER_SCRIPT = """
import hashlib, json, sys, time
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import torch
from omegaconf import OmegaConf
torch.set_num_threads(1)
from lexp.analyses.general import clustering_cache
from lexp.store import open_store

store_path, representative, go = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
cfg = OmegaConf.create({"analysis": {"max_rows": None, "representative": representative, "signed": False,
                        "compute": "float32", "chunk_rows": 64}, "threads": {"clustering": 1},
                        "progress": False})
ctx = SimpleNamespace(cfg=cfg, run_device=lambda: torch.device("cpu"), record_device=lambda *a, **k: None)
store = open_store(store_path)
while time.time() < go:
    time.sleep(0.005)
out = clustering_cache(ctx, store, None, "general")
digest = hashlib.sha256(np.ascontiguousarray(out["linkage"]).tobytes()).hexdigest()
print(json.dumps({"reused": out["reused"], "linkage": digest, "cka": np.asarray(out["cka"]).round(12).tolist(),
                  "corr": None if "corr" not in out else float(np.asarray(out["corr"], np.float64).sum())}))
"""


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    from lexp.store import StoreWriter

    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 6)).astype(np.float32)
    acts = np.concatenate([base, base + 0.1 * rng.standard_normal((300, 6)).astype(np.float32)], axis=1)
    acts = np.concatenate([acts, rng.standard_normal((300, 12)).astype(np.float32)], axis=1)  # 3 layers x 8
    path = tmp_path / "stores" / "m" / "toy" / "train-cdcdcdcdcdcd"
    with StoreWriter(path, n_rows=300, n_layers=3, hidden=8, manifest={"fingerprint": "cd" * 32}) as w:
        w.write_rows(0, acts)
        w.finish(np.arange(300) % 4)
    return path


def _cluster_in_process(store_path: Path, representative: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    from lexp.analyses.general import clustering_cache
    from lexp.store import open_store

    cfg = OmegaConf.create(
        {
            "analysis": {"max_rows": None, "representative": representative, "signed": False},
            "threads": {"clustering": 1},
            "progress": False,
        }
    )
    cfg.analysis.compute, cfg.analysis.chunk_rows = "float32", 64
    ctx = SimpleNamespace(cfg=cfg, run_device=lambda: torch.device("cpu"), record_device=lambda *a, **k: None)
    return clustering_cache(ctx, open_store(store_path), None, "general")


def test_clustering_cache_is_upgraded_once_and_never_under_a_reader(small_store: Path) -> None:
    """An entry written without the float32 correlations (representative=random) is what medoid
    runs must upgrade: the one place lexp deletes and replaces a cache entry."""
    import hashlib

    first = _cluster_in_process(small_store, "random")
    assert first["reused"] is False
    linkage = hashlib.sha256(np.ascontiguousarray(first["linkage"]).tobytes()).hexdigest()
    (entry,) = [p for p in small_store.parent.glob(f"{small_store.name}.general-*") if p.is_dir()]
    assert not (entry / "corr32.npy").exists()
    # three processes at once: two need the upgrade (one builds, one reuses), one reads as it is
    go = str(time.time() + 6.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLUSTER_SCRIPT, str(small_store), rep, go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rep in ("medoid", "medoid", "random")
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["reused"] for r in results[:2]) == [False, True] and results[2]["reused"] is True
    assert {r["linkage"] for r in results} == {linkage}  # identical everywhere
    assert len({json.dumps(r["cka"]) for r in results}) == 1
    assert results[0]["corr"] == results[1]["corr"] and (entry / "corr32.npy").exists()
    assert not list(small_store.parent.glob(f"*{PARTIAL}*"))  # no partial entry left


HOLD_SCRIPT = """
import os, sys, time
from pathlib import Path
from lexp.locks import PARTIAL, entry_lock
entry, shared, seconds = Path(sys.argv[1]), sys.argv[2] == "shared", float(sys.argv[3])
with entry_lock(entry, shared=shared):
    if not shared:  # a builder that dies half-way: a partial directory and the lock held
        (entry.with_name(entry.name + f"{PARTIAL}{os.getpid()}") / "half").mkdir(parents=True)
    print("locked", flush=True)
    time.sleep(seconds)
print(f"released {time.time():.6f}", flush=True)
"""


def _hold(entry: Path, mode: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(entry), mode, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_killed_builder_neither_blocks_nor_leaves_its_partial(tmp_path: Path) -> None:
    entry = tmp_path / "entry-0001"
    proc = _hold(entry, "exclusive", 600)
    dead_partial = entry.with_name(f"{entry.name}{PARTIAL}{proc.pid}")
    assert dead_partial.is_dir()
    os.kill(proc.pid, signal.SIGKILL)  # like an OOM kill or a SLURM time limit
    proc.wait(timeout=30)
    calls: list[Path] = []

    def build(target: Path) -> None:
        calls.append(target)
        assert remove_partials(target) == [dead_partial]  # under the lock every partial is stale
        target.mkdir()
        (target / "ok").write_text("1")

    start = time.monotonic()
    value, reused = ensure_entry(entry, ready=lambda p: (p / "ok").exists(), build=build, load=lambda p: 7)
    assert (value, reused, calls) == (7, False, [entry])
    assert time.monotonic() - start < 5  # the kernel released the dead process's lock
    assert not dead_partial.exists()


def test_an_entry_is_not_replaced_while_a_reader_holds_it(tmp_path: Path) -> None:
    entry = tmp_path / "entry-0002"
    entry.mkdir()
    (entry / "old").write_text("v1")  # an older, incomplete entry: the next caller replaces it
    reader = _hold(entry, "shared", 1.5)
    built_at: list[float] = []

    def build(target: Path) -> None:
        built_at.append(time.time())
        tmp = target.with_name(target.name + f"{PARTIAL}{os.getpid()}")
        tmp.mkdir()
        (tmp / "new").write_text("v2")
        from lexp.locks import replace_dir

        replace_dir(tmp, target)

    value, reused = ensure_entry(
        entry, ready=lambda p: (p / "new").exists(), build=build, load=lambda p: (p / "new").read_text()
    )
    assert (value, reused) == ("v2", False)
    assert reader.stdout is not None
    released = float(reader.stdout.readline().split()[1])
    reader.wait(timeout=30)
    assert built_at[0] >= released  # the builder waited for the reader
    assert not (entry / "old").exists()


def test_remove_partials_without_the_lock_keeps_live_writers(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    live = tmp_path / f"e{PARTIAL}{os.getppid()}"
    mine = tmp_path / f"e{PARTIAL}{os.getpid()}"
    other = tmp_path / f"e-other{PARTIAL}99999999"
    for d in (live, mine, other):
        d.mkdir()
    assert remove_partials(entry, only_dead=True) == [mine]
    assert live.is_dir() and other.is_dir()


def test_shared_locks_do_not_exclude_each_other(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    reader = _hold(entry, "shared", 0.5)
    start = time.monotonic()
    with entry_lock(entry, shared=True):
        assert time.monotonic() - start < 0.4
    reader.wait(timeout=30)
