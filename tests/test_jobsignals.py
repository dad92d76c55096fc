"""SIGTERM in a multirun job (lexp.jobsignals), without a cluster: the signal raises RunKilled
wherever the job is, the handlers are restored afterwards, and the SIGTERM that follows submitit's
own requeue (USR2) is left to submitit. tests/test_slurm_cluster.py runs the same on SLURM."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lexp.errors import RunKilled
from lexp.jobsignals import job_signals, requeueing
from lexp.run import _uncompleted


def _term_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs in the main thread at the next bytecode


def test_sigterm_raises_runkilled_through_except_exception_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    caught_by_library = False
    with pytest.raises(RunKilled, match="SIGTERM"), job_signals(True):
        try:
            _term_self()
        except Exception:  # a library's broad except must not swallow it
            caught_by_library = True
    assert not caught_by_library
    assert signal.getsignal(signal.SIGTERM) is before


def test_not_enabled_leaves_the_handlers_alone() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with job_signals(False):
        assert signal.getsignal(signal.SIGTERM) is before


class UncompletedJobError(RuntimeError):
    """Stands for submitit's (lexp matches it by name, as raised by submitit's USR2 handler)."""


def test_sigterm_after_submitits_requeue_is_left_to_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls: list[str] = []

    def submitit_usr2(signum: int, frame: object) -> None:  # requeue, then SLURM's SIGTERM, then exit
        calls.append("requeue")
        _term_self()
        calls.append("after SIGTERM")
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_usr2)
    try:
        with pytest.raises(SystemExit), job_signals(True):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.5)
        assert calls == ["requeue", "after SIGTERM"]  # not RunKilled: the job exits for its requeue
        assert requeueing()  # lexp.run records results.json as requeued, not failed
        assert signal.getsignal(signal.SIGUSR2) is submitit_usr2  # restored

        def no_requeue_left(signum: int, frame: object) -> None:
            raise UncompletedJobError("Job not requeued because: timed-out too many times.")

        signal.signal(signal.SIGUSR2, no_requeue_left)
        with pytest.raises(UncompletedJobError), job_signals(True):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.5)
        with pytest.raises(RunKilled), job_signals(True):  # a later SIGTERM kills again
            _term_self()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_time_limit_error_is_found_inside_a_wrapping_error() -> None:
    try:
        try:
            raise UncompletedJobError("Job not requeued because: timed-out too many times.")
        except Exception as inner:  # what inspect.getfullargspec does with it
            raise TypeError("unsupported callable") from inner
    except TypeError as outer:
        found = _uncompleted(outer)
    assert found is not None and "timed-out too many times" in str(found)
    assert _uncompleted(ValueError("other")) is None
