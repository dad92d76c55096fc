"""SIGTERM in a multirun job: results.json says ``killed (SIGTERM)`` instead of ``running``.

SLURM stops a job with SIGTERM (then SIGKILL after ``KillWait``) at its time limit, at preemption
and on ``scancel``. :func:`job_signals` makes SIGTERM raise :class:`JobKilled` in the main thread,
wherever the job is; :mod:`lexp.run` catches it and finalises results.json. Under submitit on SLURM,
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

__all__ = ["JobKilled", "job_signals", "requeueing"]


class JobKilled(BaseException):
    """SIGTERM reached the job. A BaseException, so that no ``except Exception`` swallows it."""


_requeueing = threading.Event()


def requeueing() -> bool:
    """True once submitit's USR2 handler began requeueing this job (it then exits)."""
    return _requeueing.is_set()


def _on_sigterm(signum: int, frame: Any) -> None:
    if _requeueing.is_set():  # submitit is requeueing the job: it exits by itself
        return
    raise JobKilled(signal.Signals(signum).name)


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
def job_signals(enabled: bool) -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`JobKilled` (main thread only; no-op when not enabled)."""
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
