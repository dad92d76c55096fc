"""SIGTERM in a run or a multirun job: results.json says ``killed (SIGTERM)`` instead of ``running``.

SLURM stops a job with SIGTERM (then SIGKILL after ``KillWait``) at its time limit, at preemption
and on ``scancel``; ``kill`` does the same to a single run. :func:`job_signals` (entered by
:func:`lexp.experiment.run`) makes SIGTERM raise :class:`lexp.errors.RunKilled` in the main thread,
wherever the run is: the run unwinds like on Ctrl-C (partial stores removed), results.json records
the kill, and :mod:`lexp.run` exits 143 (a multirun job under submitit returns instead). Under submitit on SLURM,
the time-limit warning (USR2, ``--signal=USR2@<signal_delay_s>``) first reaches submitit's handler,
which may requeue the job (``scontrol requeue``, then exit): the SIGTERM that SLURM sends the
requeued job is then left alone, so that the job ends as submitit intends and starts again.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lexp.errors import RunKilled

__all__ = ["job_signals", "requeueing"]


_requeueing = threading.Event()


def requeueing() -> bool:
    """True once submitit's USR2 handler began requeueing this job (it then exits)."""
    return _requeueing.is_set()


def _on_sigterm(signum: int, frame: Any) -> None:
    if _requeueing.is_set():  # submitit is requeueing the job: it exits by itself
        return
    raise RunKilled(signum)


def _chain_usr2(submitit_handler: Any):
    def handler(signum: int, frame: Any) -> None:
        _requeueing.set()
        try:
            submitit_handler(signum, frame)
        except SystemExit:  # requeued: submitit exits, the SIGTERM that follows is expected
            raise
        except BaseException:  # not requeued (no timeout left): a later SIGTERM kills the job
            _requeueing.clear()
            raise

    return handler


@contextmanager
def job_signals(enabled: bool = True) -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`~lexp.errors.RunKilled` (main thread only; no-op when
    not enabled); the previous handlers come back afterwards."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _requeueing.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    usr2 = signal.getsignal(signal.SIGUSR2)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and callable(usr2):
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, _chain_usr2(usr2))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
