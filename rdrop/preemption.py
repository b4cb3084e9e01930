"""SIGTERM / SIGINT / SIGHUP (cluster preemption, Ctrl-C, a closed terminal or dropped ssh session) end
the run cleanly, at any moment, instead of losing it.

Importing Paddle installs its C++ handler for SIGTERM (it dumps a FatalError and exits 143, and can
deadlock in `malloc` because it is not async-signal-safe). `python train.py` therefore blocks these
signals with `hold_stop_signals()` before it imports Paddle (this module and the `rdrop` package import
no Paddle), and `StopRequest().install()`, the first thing `main` does, replaces Paddle's handler with
ours and unblocks them: a signal that arrived meanwhile is delivered then. During start-up (config,
data, model, restore: minutes on a real run) a signal raises `Stopped` at once: nothing has been
trained, so nothing needs saving. Once the training loop starts, `defer()` makes the handler only
record the request; the loop finishes its current optimizer step, agrees with the other ranks that
someone was signalled (a rank may get the signal a moment before the rest), saves a checkpoint and
exits. Repeated signals change nothing: Paddle's launcher
sends SIGTERM to its workers several times during its grace period, and the checkpoint must still be
written. After the loop, `interruptible(phase)` makes a phase such as the final test evaluation
stoppable at once again (the checkpoint of the last step is saved by then); a signal received during
the last step stops the run before that phase starts.

A run that stops before `schedule.total_steps`, or before its final test evaluation, exits with
STOPPED_EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try again later"), never 0, so a scheduler requeues
it instead of taking it as finished.
"""

import contextlib
import functools
import logging
import signal
import sys

logger = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
START_UP = "start-up"


class Stopped(BaseException):
    """A stop signal arrived outside the training loop: during start-up, or in `phase` after the loop. A
    BaseException, so `except Exception` blocks (which turn file errors into messages) let it through."""

    def __init__(self, signal_name, phase=START_UP):
        super().__init__(signal_name, phase)
        self.signal_name, self.phase = signal_name, phase


def hold_stop_signals():
    """Block the stop signals until `StopRequest.install()` takes them, so that none reaches the handler
    Paddle installs while it is imported; a signal sent meanwhile waits, it is not lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class StopRequest:
    """`requested`: this process was signalled; `stopping`: the ranks agreed, after a step, to stop."""

    def __init__(self):
        self.requested = False
        self.stopping = False
        self.signal_name = None
        self._deferred = False
        self._phase = START_UP

    def install(self):
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a held signal is handled here
        return self

    def defer(self):
        """From now on a signal only sets `requested`, for the training loop to act on after its step."""
        self._deferred = True

    @contextlib.contextmanager
    def interruptible(self, phase):
        """A phase after the training loop that a signal ends at once (with `Stopped`), and that does
        not start if this process was signalled during the last step."""
        if self.requested:
            raise Stopped(self.signal_name, phase)
        self._deferred, self._phase = False, phase
        try:
            yield
        finally:
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
            raise Stopped(self.signal_name, self._phase)


def exit_stopped():
    """sys.exit(STOPPED_EXIT_CODE), ignoring any further SIGTERM / SIGINT on the way out.

    While Python shuts down it gives handled signals their default, fatal action back, and the launcher
    signals the workers still finishing once the first one has exited: without this, a worker that
    saved its checkpoint could still die by SIGTERM, and the launcher report 241 (-15) instead of 75.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(STOPPED_EXIT_CODE)


def exit_when_stopped(main):
    """Entry-point wrapper: `Stopped` ends in one log line (the console, and train.log once it is open)
    and STOPPED_EXIT_CODE, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Stopped as stopped:
            if stopped.phase == START_UP:
                logger.warning(
                    "Stopped by %s during start-up, before the first training step; nothing was trained or "
                    "saved (exit code %d). Run the same command again to start.",
                    stopped.signal_name,
                    STOPPED_EXIT_CODE,
                )
            else:
                logger.warning(
                    "Stopped by %s during %s, after the last training step, whose checkpoint is saved; "
                    "rerun with -o train.resume=auto to run it (exit code %d: stopped before the end, resumable).",
                    stopped.signal_name,
                    stopped.phase,
                    STOPPED_EXIT_CODE,
                )
            exit_stopped()

    return wrapper
