"""`make install` on an externally managed Python (PEP 668: Debian's and Ubuntu's /usr/bin/python3).

pip refuses to install into such an interpreter, so the Makefile makes .venv in the checkout (or uses
the active virtualenv) and every target runs that environment's python. The real install (torch and
lexp into .venv from /usr/bin/python3) is what `.ci/run` does; these tests check the same Makefile
path in a copy of it, cheaply: the venv it creates, the commands it would run, and the test target's
exit status when pytest collects nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _externally_managed(python: Path) -> bool:
    code = "import sys, sysconfig, pathlib; print(pathlib.Path(sysconfig.get_paths()['stdlib'], 'EXTERNALLY-MANAGED').exists())"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def _clean_env(**extra: str) -> dict[str, str]:
    """A new user's shell: no active virtualenv or conda environment, the system's PATH only."""
    env = {
        k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "MAKEFLAGS"}
    }
    env["PATH"] = "/usr/bin:/bin"
    env.update(extra)
    return env


def _checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "clone"
    repo.mkdir()
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    return repo


def _make(repo: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=300
    )


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_install_makes_a_venv_from_an_externally_managed_python(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists() or not _externally_managed(SYSTEM_PYTHON):
        pytest.skip("/usr/bin/python3 is not an externally managed interpreter here")
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import venv, ensurepip"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-venv is not installed (apt-get install python3-venv)")
    # The premise: pip refuses this interpreter (it stops before any index is asked).
    refused = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "pip", "install", "lexp-not-a-package"],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr

    repo = _checkout(tmp_path)
    env = _clean_env()
    before = _make(repo, "env", env=env)  # nothing installed yet: one clear line, exit 2
    assert before.returncode != 0 and "run `make install` first" in before.stdout

    made = _make(repo, "venv", "VENV_PYTHON=/usr/bin/python3", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    venv_python = repo / ".venv" / "bin" / "python"
    code = "import sys; print(sys.prefix, sys.base_prefix)"
    prefix, base = subprocess.run(
        [str(venv_python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(prefix) == repo / ".venv" and base == "/usr"
    assert _make(repo, "env", env=env).returncode == 0
    # pip works in the venv (the install's first step would use this very interpreter).
    pip = subprocess.run([str(venv_python), "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(repo / ".venv") in pip.stdout
    # A second `make venv` keeps the environment it made.
    stamp = (repo / ".venv" / "pyvenv.cfg").stat().st_mtime_ns
    assert _make(repo, "venv", "VENV_PYTHON=/usr/bin/python3", env=env).returncode == 0
    assert (repo / ".venv" / "pyvenv.cfg").stat().st_mtime_ns == stamp


@needs_make
def test_every_target_uses_the_checkouts_venv_or_the_active_one(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    venv_python = f"{repo}/.venv/bin/python"
    plan = _make(repo, "-n", "install", "test", "run", "sweep", env=_clean_env())
    assert plan.returncode == 0, plan.stderr
    commands = [
        line
        for line in plan.stdout.splitlines()
        if "-m pip" in line or "-m pytest" in line or "lexp.run" in line
    ]
    assert [c.split()[0] for c in commands if "-m pip" in c] == [venv_python, venv_python]
    assert "-m pip install torch==2.13.0" in commands[0] and '-m pip install -e ".[dev]"' in commands[1]
    assert any(f"{venv_python} -m pytest" in c for c in commands)
    assert any(c.startswith(f"{venv_python} -m lexp.run task=pos") for c in commands)
    assert any(c.startswith(f"{venv_python} -m lexp.run -m task=pos,sem,ccg,chunking") for c in commands)
    assert "--break-system-packages" not in plan.stdout

    active = tmp_path / "active-venv"
    plan = _make(repo, "-n", "install", "run", env=_clean_env(VIRTUAL_ENV=str(active)))
    assert plan.returncode == 0, plan.stderr
    assert f"{active}/bin/python -m pip install torch==2.13.0" in plan.stdout
    assert f"{active}/bin/python -m lexp.run task=pos" in plan.stdout
    assert ".venv" not in plan.stdout  # no second environment beside the active one


@needs_make
def test_make_test_fails_when_pytest_collects_nothing(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    (repo / "tests").mkdir()
    (repo / "tests" / "test_nothing.py").write_text('"""No test in here."""\n')
    (repo / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    result = _make(repo, "test", f"PYTHON={sys.executable}", env=_clean_env())
    assert result.returncode != 0
    assert "pytest collected no tests: failing" in result.stdout
