"""SIGTERM / SIGINT (cluster preemption, Ctrl-C) end the run cleanly, at any moment, instead of losing it.

`StopRequest().install()` is the first thing `train.py` does, so Paddle's own C++ handler (which dumps
a FatalError and exits 143, and can deadlock in `malloc` because it is not async-signal-safe) never
sees these signals. During start-up (config, data, model, restore: minutes on a real run) a signal
raises `Stopped` at once: nothing has been trained, so nothing needs saving. Once the training loop
starts, `defer()` makes the handler only record the request; the loop finishes its current optimizer
step, agrees with the other ranks that someone was signalled (a rank may get the signal a moment
before the rest), saves a checkpoint and exits. Repeated signals change nothing: Paddle's launcher
sends SIGTERM to its workers several times during its grace period, and the checkpoint must still be
written.

A run that stops before `schedule.total_steps` exits with STOPPED_EXIT_CODE (75, EX_TEMPFAIL of
sysexits.h: "try again later"), never 0, so a scheduler requeues it instead of taking it as finished.
"""

import functools
import logging
import signal
import sys

logger = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 75


class Stopped(BaseException):
    """A stop signal arrived before training started. A BaseException, so `except Exception` blocks in
    the start-up code (which turn file errors into messages) let it through."""


class StopRequest:
    """`requested`: this process was signalled; `stopping`: the ranks agreed, after a step, to stop."""

    def __init__(self):
        self.requested = False
        self.stopping = False
        self.signal_name = None
        self._deferred = False

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def defer(self):
        """From now on a signal only sets `requested`, for the training loop to act on after its step."""
        self._deferred = True

    def after_step(self, any_rank_requested, step, total_steps):
        """Decide after optimizer step `step`, on what every rank agreed, whether the run stops there
        (saves and exits): a stop during the last step changes nothing."""
        self.stopping = any_rank_requested and step < total_steps

    def exit_if_stopping(self, step, total_steps):
        if self.stopping:
            logger.info(
                "Stopped by %s at step %d of %d; checkpoint saved. Resume with -o train.resume=auto "
                "(exit code %d: stopped before the end, resumable).",
                self.signal_name or "a signal on another rank",
                step,
                total_steps,
                STOPPED_EXIT_CODE,
            )
            exit_stopped()

    def _handle(self, signum, frame):
        first = not self.requested
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if first and not self._deferred:
            raise Stopped(self.signal_name)


def exit_stopped():
    """sys.exit(STOPPED_EXIT_CODE), ignoring any further SIGTERM / SIGINT on the way out.

    While Python shuts down it gives handled signals their default, fatal action back, and the launcher
    signals the workers still finishing once the first one has exited: without this, a worker that
    saved its checkpoint could still die by SIGTERM, and the launcher report 241 (-15) instead of 75.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(STOPPED_EXIT_CODE)


def exit_when_stopped(main):
    """Entry-point wrapper: a `Stopped` start-up ends in one line and STOPPED_EXIT_CODE, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Stopped as stopped:
            print(
                f"Stopped by {stopped} during start-up, before the first training step; nothing was "
                f"trained or saved (exit code {STOPPED_EXIT_CODE}). Run the same command again to start.",
                file=sys.stderr,
                flush=True,
            )
            exit_stopped()

    return wrapper
