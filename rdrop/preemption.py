"""SIGTERM / SIGINT (cluster preemption, Ctrl-C) end the run cleanly instead of losing it.

The handler only records the request; the training loop finishes its current optimizer step, agrees
with the other ranks that someone was signalled (a rank may get the signal a moment before the rest),
saves a checkpoint and exits 0. A second signal while that happens exits at once.
"""
import signal
import sys


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            sys.exit(128 + signum)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
