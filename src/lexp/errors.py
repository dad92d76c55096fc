"""Error types whose messages tell the user what went wrong and how to fix it."""

from __future__ import annotations


class LexpInputError(ValueError):
    """Bad input data or configuration: the message names the file, the line and the fix."""


class LexpModelError(RuntimeError):
    """A model or tokenizer could not be loaded: the message says what was tried and the fix."""


class RunKilled(BaseException):
    """The run was stopped by a signal (SIGTERM from SLURM, a cluster or ``kill``; SIGINT).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it:
    every ``with`` block still cleans up (partial stores are removed), results.json records
    ``killed (SIGTERM)`` and ``lexp.run`` exits with 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"killed ({self.name})")
