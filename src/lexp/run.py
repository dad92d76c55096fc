"""Command-line entry point: ``python -m lexp.run task=pos model=minilm analysis=general``.

A thin Hydra shell around :func:`lexp.experiment.run`; every stage lives in importable modules.
Settings are checked first (:func:`lexp.schema.check_config`), before torch is imported and long
before a model is loaded or a store is created: a bad value is one ``lexp: error:`` line and exit
code 2 within seconds. An override Hydra cannot parse (``task.comment_prefix='#'`` after the shell
took the quotes) gets the same kind of line, with the quoting that works.
"""

from __future__ import annotations

import logging
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

    from lexp.schema import check_config

    try:
        check_config(cfg)  # seconds, before torch (the device check, last, imports it)
    except LexpInputError as exc:
        _fail(f"lexp: error: {exc}")
    from lexp.experiment import friendly_errors, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_third_party()
    try:
        results = run(cfg, run_dir)
    except Exception as exc:  # known input/model problems get one clear line, not a traceback
        message = friendly_errors(exc)
        if message is None:
            raise
        _fail(message)
    oracle = results.get("oracle") or {}
    metric = "pearson" if results.get("task_kind") == "regression" else "accuracy"
    return (oracle.get("dev") or {}).get(metric)  # the value a Hydra sweeper would optimise


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


def main() -> None:
    """Console-script entry point (``lexp task=pos``)."""
    problem = override_problem(sys.argv[1:])
    if problem is not None:
        _fail(problem)
    _main()


if __name__ == "__main__":
    main()
