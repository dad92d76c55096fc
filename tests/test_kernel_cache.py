"""The compiled-kernel cache loads nothing another user could have written (issue 12, case 6).

A planted library carries a constructor that writes a marker file when the library is loaded, so
"not loaded" is observed, not assumed. Tests run as root here, where every file is ours: the
owner check is exercised by pretending to be another uid (``kernels._uid``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from lexp import kernels

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")

#: one flag set (no -march=native / OpenMP variants), so each test knows the one name looked for
ONE_VARIANT = (("-fopenmp",),)


@pytest.fixture
def kernel_dir(monkeypatch, tmp_path: Path) -> Path:
    """A fresh LEXP_KERNEL_DIR (not yet created), one flag set, a forgotten library() cache."""
    directory = tmp_path / "kernels"
    monkeypatch.setenv("LEXP_KERNEL_DIR", str(directory))
    monkeypatch.delenv("LEXP_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_VARIANTS", ONE_VARIANT)
    monkeypatch.setattr(kernels, "_loaded", {})
    return directory


def _key() -> str:
    return kernels._key(kernels._identity(kernels._compiler()), ONE_VARIANT[0])


def _compile(source: str, out: Path) -> bytes:
    c = out.with_suffix(".c")
    c.write_text(source)
    subprocess.run([kernels._compiler(), "-shared", "-fPIC", str(c), "-o", str(out)], check=True)
    return out.read_bytes()


def _planted(tmp_path: Path, marker: Path) -> bytes:
    """A library whose constructor creates ``marker``: it runs as soon as the library is loaded."""
    return _compile(
        "#include <stdio.h>\n__attribute__((constructor)) static void plant(void) "
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
        "int lexp_kernel_threads(void) { return 99; }\n",
        tmp_path / "planted.so",
    )


def _plant(directory: Path, library: bytes) -> Path:
    """Put ``library`` where the loader looks, with a build record that matches its bytes."""
    digest = hashlib.sha256(library).hexdigest()
    name = f"lexp_kernels-{_key()}-{digest[:16]}.so"
    (directory / name).write_bytes(library)
    (directory / f"lexp_kernels-{_key()}.json").write_text(json.dumps({"library": name, "sha256": digest}))
    return directory / name


def _build(directory: Path) -> Path:
    """A real build and its record, not loaded into this process (dlopen would cache the name)."""
    assert kernels._check_dir(directory) is None
    record = kernels._build(kernels._compiler(), ONE_VARIANT[0], directory, _key())
    return directory / record["library"]


def _load(caplog) -> object:
    with caplog.at_level(logging.WARNING, logger="lexp.kernels"):
        return kernels.library()


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "lexp.kernels" and r.levelno == logging.WARNING
    ]


def test_a_new_directory_is_private_and_the_library_is_recorded_by_its_hash(kernel_dir: Path, caplog) -> None:
    lib = _load(caplog)
    assert lib is not None and lib.lexp_kernel_threads() >= 1 and _warnings(caplog) == []
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700
    (so,) = kernel_dir.glob("lexp_kernels-*.so")
    record = json.loads((kernel_dir / f"lexp_kernels-{_key()}.json").read_text())
    assert record["library"] == so.name and record["flags"] == list(ONE_VARIANT[0])
    assert record["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    assert so.name == f"lexp_kernels-{_key()}-{record['sha256'][:16]}.so"
    assert not so.stat().st_mode & 0o022 and not list(kernel_dir.glob(".build-*"))
    mtime = so.stat().st_mtime_ns
    assert kernels._load() is not None and so.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_library_planted_in_a_group_writable_directory_is_never_loaded(
    kernel_dir: Path, tmp_path: Path, caplog
) -> None:
    kernel_dir.mkdir(mode=0o777)
    os.chmod(kernel_dir, 0o777)  # a shared, pre-created directory (case 6)
    marker = tmp_path / "constructor-ran"
    planted = _plant(kernel_dir, _planted(tmp_path, marker))
    lib = _load(caplog)
    assert not marker.exists(), "the planted library was loaded"
    (warning,) = _warnings(caplog)
    assert f"{kernel_dir} is not safe" in warning and "writable by group or others (mode 0777)" in warning
    assert "private directory" in warning and "chmod 700" in warning
    # the library was built privately instead, and it is the real one
    assert lib is not None and lib.lexp_kernel_threads() != 99
    assert not Path(lib._name).is_relative_to(kernel_dir)
    assert sorted(p.name for p in kernel_dir.iterdir()) == sorted(
        [planted.name, f"lexp_kernels-{_key()}.json"]
    )


def test_the_directory_and_its_parents_must_belong_to_the_user(tmp_path: Path, monkeypatch) -> None:
    mine = tmp_path / "mine"
    assert kernels._check_dir(mine) is None and stat.S_IMODE(mine.stat().st_mode) == 0o700
    monkeypatch.setattr(kernels, "_uid", lambda: 12345)  # as another user: root's directory is foreign
    assert kernels._check_dir(mine) == f"{mine} is owned by uid 0, not by this user (uid 12345)"
    monkeypatch.undo()
    new = tmp_path / "a" / "b" / "k"  # missing parents are made private too, whatever the umask
    old_umask = os.umask(0o002)
    try:
        assert kernels._check_dir(new) is None
    finally:
        os.umask(old_umask)
    assert {stat.S_IMODE(d.stat().st_mode) for d in (new, new.parent, new.parent.parent)} == {0o700}
    os.chmod(tmp_path / "a", 0o775)  # group-writable parent (umask 002's ~/.cache): accepted
    assert kernels._check_dir(new) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may rename the kernel directory below it away
    assert kernels._check_dir(shared / "k") == f"its parent {shared} is writable by everyone and not sticky"
    os.chmod(shared, 0o1777)  # like /tmp: only the owner may rename entries
    assert kernels._check_dir(shared / "k") is None
    link = tmp_path / "link"
    link.symlink_to(shared / "k")  # a symlinked directory is judged by its target and both paths' parents
    assert kernels._check_dir(link) is None
    os.chmod(shared / "k", 0o770)
    assert "writable by group or others (mode 0770)" in kernels._check_dir(link)


def test_a_library_changed_after_it_was_built_is_refused(kernel_dir: Path, tmp_path: Path, caplog) -> None:
    so = _build(kernel_dir)
    marker = tmp_path / "constructor-ran"
    so.write_bytes(_planted(tmp_path, marker))  # same name, other bytes, still mode 0700 and ours
    assert _load(caplog) is None
    assert not marker.exists(), "the changed library was loaded"
    (warning,) = _warnings(caplog)
    assert f"{so} changed after it was built" in warning and "delete it to rebuild" in warning
    assert "probes use torch operations" in warning


@pytest.mark.parametrize("problem", ["symlink", "group-writable", "foreign-record"])
def test_a_symlinked_shared_or_foreign_file_is_refused(
    kernel_dir: Path, tmp_path: Path, caplog, monkeypatch, problem: str
) -> None:
    so = _build(kernel_dir)
    record = kernel_dir / f"lexp_kernels-{_key()}.json"
    if problem == "symlink":  # the same bytes elsewhere: the hash would match, the link is refused
        copy = tmp_path / "elsewhere.so"
        copy.write_bytes(so.read_bytes())
        so.unlink()
        so.symlink_to(copy)
        expected = f"{so} is a symbolic link"
    elif problem == "group-writable":
        os.chmod(so, 0o775)
        expected = f"{so} is writable by group or others (mode 0775)"
    else:
        monkeypatch.setattr(kernels, "_uid", lambda: 12345)
        monkeypatch.setattr(kernels, "_check_dir", lambda _: None)  # only the files' owner is tested here
        expected = f"{record} is owned by uid 0, not by this user (uid 12345)"
    assert _load(caplog) is None
    (warning,) = _warnings(caplog)
    assert expected in warning and "refused to load" in warning


def test_a_library_missing_a_symbol_falls_back_with_one_warning(
    kernel_dir: Path, tmp_path: Path, caplog
) -> None:
    kernel_dir.mkdir(mode=0o700)
    _plant(kernel_dir, _compile("int unrelated(void) { return 42; }\n", tmp_path / "wrong.so"))
    assert _load(caplog) is None  # loaded (our own, unchanged file), but not the kernels: no traceback
    (warning,) = _warnings(caplog)
    assert "AttributeError" in warning and "lexp_kernel_threads" in warning
    assert "probes use torch operations" in warning


def test_any_unexpected_failure_falls_back_with_a_warning(kernel_dir: Path, monkeypatch, caplog) -> None:
    def broken() -> str:
        raise KeyError("cpuinfo")

    monkeypatch.setattr(kernels, "_cpu_tag", broken)
    assert _load(caplog) is None
    (warning,) = _warnings(caplog)
    assert "unexpected error while loading: KeyError" in warning
    assert kernels.library() is None and len(_warnings(caplog)) == 1  # once, not per call
