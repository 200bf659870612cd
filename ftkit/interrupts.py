"""Stopping a run: SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's time limit) alike.

Outside the training loop a signal raises :class:`Stopped` at once: before training the pipeline
removes its partial folder, after it the newest checkpoint is kept. Inside the loop the signal is
only noted: the Trainer finishes its optimizer step, saves a checkpoint and stops (see
``ftkit.training.checkpoint_callback``), then the pipeline raises :class:`Stopped` and prints the
resume command. A second signal stops at once. The exit code is 128 + the signal's number: 130
for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

#: The signals a run stops on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal; a KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")


class StopRequests:
    """The signal handlers of one run; :attr:`signum` is a signal noted during training, else None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_training = False  # set around the Trainer's loop: signals wait for the step's end there

    def handle(self, signum: int, frame) -> None:  # noqa: ANN001 - the signal module's handler signature
        if self.in_training and self.signum is None:
            self.signum = signum
            return
        raise Stopped(signum)

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Handle the stop signals while the block runs (the main thread only: others cannot), then restore."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


_points_reached: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """For tests only: SIGKILL this process at the named point when ``FTKIT_TEST_KILL_AT`` names it.

    ``FTKIT_TEST_KILL_AT=checkpoint-write`` kills the first time the point is reached, ``training@25``
    the 25th time (in this process). Points: ``data`` (the data loaded, not yet returned),
    ``baselines`` (the first baseline evaluated, not yet saved), ``training`` (each optimizer step's
    end), ``checkpoint-write`` (a checkpoint's files written, not yet marked complete),
    ``final-eval`` (the fine-tuned model evaluated, not yet returned), ``save`` (the weights
    written, metrics and manifest not yet). ``FTKIT_TEST_KILL_SIGNAL=TERM`` (or ``INT``) sends that
    signal instead. tests/test_crash.py kills a run at each point and resumes it.
    """
    wanted = os.environ.get("FTKIT_TEST_KILL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _points_reached[name] += 1
    if _points_reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get("FTKIT_TEST_KILL_SIGNAL", "KILL")])
