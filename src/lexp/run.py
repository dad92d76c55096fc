"""Command-line entry point: ``python -m lexp.run task=pos model=minilm analysis=general``.

A thin Hydra shell around :func:`lexp.experiment.run`; every stage lives in importable modules.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lexp.experiment import config_dir, friendly_errors, run


def quiet_third_party() -> None:
    """Drop third-party chatter that would bury lexp's own stage lines in every run log.

    pytorch-lightning 2.6 uses torch's deprecated ``LeafSpec`` (one FutureWarning per epoch), and
    every Trainer announces absent GPUs/TPUs and advertises a logger. Real warnings stay.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_third_party()
    try:
        results = run(cfg, run_dir)
    except Exception as exc:  # known input/model problems get one clear line, not a traceback
        message = friendly_errors(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(2) from None
    oracle = results.get("oracle") or {}
    metric = "pearson" if results.get("task_kind") == "regression" else "accuracy"
    return (oracle.get("dev") or {}).get(metric)  # the value a Hydra sweeper would optimise


def main() -> None:
    """Console-script entry point (``lexp task=pos``)."""
    _main()


if __name__ == "__main__":
    main()
