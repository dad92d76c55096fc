"""Command-line entry point: ``python -m lexp.run task=pos model=minilm analysis=general``.

A thin Hydra shell around :func:`lexp.experiment.run`; every stage lives in importable modules.
Settings are checked first (:func:`lexp.schema.check_config`), before torch is imported and long
before a model is loaded or a store is created: a bad value is one ``lexp: error:`` line and exit
code 2 within seconds. An override Hydra cannot parse (``task.comment_prefix='#'`` after the shell
took the quotes) gets the same kind of line, with the quoting that works.

Sweeps (``-m``): a failing job never stops the others, under any launcher (basic, joblib,
submitit): its results.json says ``status: failed: <message>`` and the sweep goes on;
:class:`lexp.sweep.SweepCallback` prints a line per finished job and, at the end, the failed jobs
with their one-line errors, then exits 1. ``hydra/launcher=joblib|submitit_local|submitit_slurm``
are the pinned Hydra plugins (conf/hydra/launcher/ documents their settings).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lexp.errors import LexpInputError


def _config_dir() -> Path:
    """conf/ without importing lexp.experiment (which imports torch): the same rule as
    :func:`lexp.experiment.config_dir` (packaged with the wheel, or at the top of a checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def quiet_third_party() -> None:
    """Drop third-party chatter that would bury lexp's own stage lines in every run log.

    pytorch-lightning 2.6 uses torch's deprecated ``LeafSpec`` (one FutureWarning per epoch), and
    every Trainer announces absent GPUs/TPUs and advertises a logger. Real warnings stay.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=str(_config_dir()), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lexp.schema import check_config

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        check_config(cfg)  # seconds, before torch (the device check, last, imports it)
    except LexpInputError as exc:
        return _job_failed(cfg, run_dir, f"lexp: error: {exc}", multirun)
    from lexp.experiment import friendly_errors, run

    quiet_third_party()
    from lexp.errors import RunKilled
    from lexp.jobsignals import requeueing

    try:
        results = run(cfg, run_dir)
    except RunKilled as exc:  # SLURM's time limit or preemption, scancel, kill: never left at "running"
        if not multirun:
            raise  # main(): one line, exit 143
        return _job_killed(cfg, run_dir, exc.name)
    except SystemExit:
        if multirun and requeueing():
            _job_requeued(cfg, run_dir)  # submitit's USR2 handler requeued the job and exits
        raise
    except Exception as exc:  # known input/model problems get one clear line, not a traceback
        timed_out = _uncompleted(exc)
        if timed_out is not None:  # submitit's USR2 handler: no requeue left
            return _job_killed(cfg, run_dir, f"time limit: {str(timed_out).strip()}")
        message = friendly_errors(exc)
        if message is None:
            if not multirun:
                raise
            # a bug or an unexpected failure: the traceback goes to the job's log, the sweep goes on
            logging.getLogger("lexp").exception("job %s failed", hc.job.get("num"))
            message = f"{type(exc).__name__}: {exc}"
        return _job_failed(cfg, run_dir, message, multirun)
    _record_slurm_restarts(run_dir)
    oracle = results.get("oracle") or {}
    metric = "pearson" if results.get("task_kind") == "regression" else "accuracy"
    return (oracle.get("dev") or {}).get(metric)  # the value a Hydra sweeper would optimise


def _job_failed(cfg: DictConfig, run_dir: Path, message: str, multirun: bool) -> None:
    """A single run stops with the message (exit 2). A multirun job records the failure in its
    results.json and returns, so that the sweep goes on under every launcher: Hydra's sweepers
    re-raise a job's exception after its batch, and lexp.sweep.SweepCallback lists the failures
    at the end of the sweep (and exits 1) instead."""
    if not multirun:
        _fail(message)
    from lexp.sweep import write_failure

    write_failure(run_dir, cfg, message)
    print(f"lexp: job failed ({run_dir.name}): {message.splitlines()[0]}", file=sys.stderr, flush=True)
    return None


def _uncompleted(exc: BaseException) -> BaseException | None:
    """submitit's UncompletedJobError, raised by its USR2 handler wherever the job was: also when a
    library's ``except Exception`` turned it into another error (``raise ... from``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "UncompletedJobError":
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _job_killed(cfg: DictConfig, run_dir: Path, reason: str) -> None:
    """results.json says ``killed (<reason>)``. Under submitit the job then ends normally (its result
    is what tells the launching process that the job is over); a job of the basic or joblib
    launcher stops the sweep with 143, as SIGTERM would have."""
    from lexp.sweep import write_status

    write_status(run_dir, cfg, f"killed ({reason})")
    print(f"lexp: job killed ({run_dir.name}): {reason}", file=sys.stderr, flush=True)
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        raise SystemExit(143)
    return None


def _job_requeued(cfg: DictConfig, run_dir: Path) -> None:
    """submitit requeued this SLURM job (its USR2 handler exits after ``scontrol requeue``): not
    final, the job resumes from lexp's caches when SLURM starts it again."""
    from lexp.sweep import write_status

    write_status(run_dir, cfg, "requeued (SLURM time limit or preemption): resumes from the caches")


def _record_slurm_restarts(run_dir: Path) -> None:
    """A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) says so in its results.json (``slurm``)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    if not restarts.isdigit() or int(restarts) == 0:
        return
    from lexp.sweep import update_results

    update_results(run_dir, {"slurm": {"job_id": os.environ.get("SLURM_JOB_ID"), "restarts": int(restarts)}})


def override_problem(argv: list[str]) -> str | None:
    """One ``lexp: error:`` line for a command-line override Hydra's grammar rejects, else None.

    Hydra reads ``#``, ``\\`` and a few other characters as syntax, so a value such as ``#`` must
    reach it quoted. A shell removes one level of quotes: ``task.comment_prefix='#'`` arrives as
    ``task.comment_prefix=#``.
    """
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import OverrideParseException
    except ImportError:  # pragma: no cover - another Hydra layout: Hydra reports it itself
        return None
    args, _ = get_args_parser().parse_known_args(argv)
    parser = OverridesParser.create()
    for override in args.overrides or []:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as exc:
            key, _, value = override.partition("=")
            named = {"#": " or the named value " + f"{key}=hash"} if key.endswith("comment_prefix") else {}
            return (
                f"lexp: error: cannot parse the override {override!r} ({str(exc).splitlines()[0].strip()}). "
                f"Hydra needs a value with special characters ({value!r}) in quotes, and the shell removes "
                f"one level of them: quote the whole override for the shell, e.g. \"{key}='{value}'\""
                f"{named.get(value, '')}."
            )
    return None


#: launcher config name -> (plugin module, pip requirement pinned in pyproject.toml)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher==1.2.0"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher==1.2.0"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher==1.2.0"),
    # lexp's own settings over the submitit plugin (conf/hydra/launcher/)
    "local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher==1.2.0"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher==1.2.0"),
}


def launcher_problem(argv: list[str]) -> str | None:
    """One ``lexp: error:`` line when ``hydra/launcher=<name>`` names a plugin that is not installed
    (Hydra itself would fail later, with a long "could not load" report)."""
    import importlib.util

    for arg in argv:
        key, _, name = arg.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or name not in LAUNCHER_PLUGINS:
            continue
        module, requirement = LAUNCHER_PLUGINS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # hydra_plugins itself is absent
            found = False
        if not found:
            return (
                f"lexp: error: hydra/launcher={name} needs the Hydra plugin {requirement.split('==')[0]}, "
                f"which is not installed. Fix: pip install '{requirement}' (lexp pins it), or leave "
                "hydra/launcher out for the basic launcher (jobs one after another)"
            )
    return None


def main() -> None:
    """Console-script entry point (``lexp task=pos``).

    A run stopped by SIGTERM (SLURM, ``kill``) or SIGINT (Ctrl-C) ends with one line and the shell's
    exit status for the signal (143, 130); results.json says ``killed (SIGTERM)``.
    """
    from lexp.errors import RunKilled

    problem = override_problem(sys.argv[1:]) or launcher_problem(sys.argv[1:])
    if problem is not None:
        _fail(problem)
    try:
        _main()
    except (RunKilled, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, RunKilled) else 2
        name = exc.name if isinstance(exc, RunKilled) else "SIGINT"
        print(
            f"lexp: error: stopped by {name}; partial stores were removed and results.json records "
            f"killed ({name}). Rerun the same command to continue (finished stores are reused).",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
