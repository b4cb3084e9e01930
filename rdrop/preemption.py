"""SIGTERM / SIGINT (cluster preemption, Ctrl-C) end the run cleanly instead of losing it.

The handler only records the request; the training loop finishes its current optimizer step, agrees
with the other ranks that someone was signalled (a rank may get the signal a moment before the rest),
saves a checkpoint and exits 0. Repeated signals change nothing: Paddle's launcher sends SIGTERM to
its workers several times during its 10-second grace period, and the checkpoint must still be written.
"""

import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
