"""A write that runs in a thread, so that the other ranks are not held while rank 0 writes: the best
weights (344 MB for ViT-B/16, flushed to disk) are replaced at every evaluation that improves, every
100 steps in the paper configs, and the next collective would make every rank wait for the write.

One write at a time: `start` first waits for the previous one. The caller hands over values that
training no longer changes (a host copy of the weights), and the write goes through rdrop/atomic.py,
so a crash in the middle of it leaves the previous version complete. An error in the thread (a full
disk: the writer's UserError) is raised by the next `wait` or `start` in the training loop, where it
ends the run with its paragraph as any other. If the process ends before that (another error ended
it first), the paragraph is printed when the interpreter exits, after Python has waited for the
thread: never silently.
"""

import atexit
import sys
import threading


class BackgroundWrite:
    def __init__(self, name):
        self.name = name
        self._thread = None
        self._error = None
        self._reports_at_exit = False

    def start(self, write, *arguments):
        """Wait for the previous write, then run `write(*arguments)` in a thread."""
        self.wait()
        if not self._reports_at_exit:
            atexit.register(self._report_at_exit)
            self._reports_at_exit = True
        self._thread = threading.Thread(target=self._run, args=(write, arguments), name=self.name)
        self._thread.start()

    def _run(self, write, arguments):
        try:
            write(*arguments)
        except BaseException as error:  # raised in the training loop by the next wait()
            self._error = error

    def wait(self):
        """Block until the current write (if any) is on disk; raise the error it ended with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _report_at_exit(self):
        if self._error is not None:
            paragraph = " ".join(str(self._error).split())
            print(f"error: {self.name} failed: {paragraph}", file=sys.stderr, flush=True)
