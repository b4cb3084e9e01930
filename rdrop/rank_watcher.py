"""Watches the other workers on this machine and reports the first one that dies or is frozen.

Run by `rdrop.job_watch.JobWatch` as a small separate process (it imports nothing heavy), with
its stderr shared with the worker it serves, so the report lands in that worker's log even when the
worker itself is aborted by the collective library a moment later (gloo kills a process from C++
when its peer's connection resets, and the launcher then names whichever process it noticed first).

The launcher shows only rank 0's log on its console and ends the job with the exit code of the
process it noticed first, so when rank 0 is the one that died, nobody would read the cause. One
watcher, the lowest surviving rank's, also writes the report to the launcher's console (its stderr,
through /proc) and appends it to the run's train.log.

A worker that is alive but stopped (SIGSTOP, Ctrl-Z, a debugger) makes the others wait inside their
next collective until gloo's timeout, after which the error names whichever peer connection failed;
the watcher names the stopped rank as soon as it has been stopped for FROZEN_SECONDS.

    python rank_watcher.py OWN_RANK OWN_PID CONSOLE_PID LOG_FILE RANK:PID [RANK:PID ...]
"""

import os
import select
import sys
import time

from rdrop import atomic
from rdrop.errors import UserError

POLL_SECONDS = 2.0
FROZEN_SECONDS = 10.0


def is_stopped(pid):
    """True when the process is in state T (stopped by a signal) or t (stopped by a tracer)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def report(message, reporter, console_pid, log_file):
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    if not reporter:
        return
    # The console's stderr is a link by nature; train.log is never written through one (rdrop/atomic.py).
    openers = (
        lambda: open(f"/proc/{console_pid}/fd/2", "a", encoding="utf-8"),
        lambda: atomic.open_own(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a"),
    )
    for opener in openers:
        try:
            with opener() as stream:
                stream.write(message + "\n")
        except (OSError, UserError):
            pass  # the launcher or the output folder is gone, or a link was planted: the worker's own log has it


def is_reporter(own_rank, watched, lost_rank):
    """The lowest rank other than the lost one speaks for all (no duplicate lines on the console)."""
    return int(own_rank) == min(int(rank) for rank, _ in [*watched.values(), (own_rank, None)] if rank != lost_rank)


def main(own_rank, own_pid, console_pid, log_file, siblings):
    own = os.pidfd_open(own_pid)
    watched = {}
    for entry in siblings:
        rank, pid = entry.split(":")
        try:
            watched[os.pidfd_open(int(pid))] = (rank, pid)
        except ProcessLookupError:
            watched[None] = (rank, pid)
    stopped_since, frozen_reported = {}, set()

    def report_about(rank, message):
        report(message, reporter=is_reporter(own_rank, watched, rank), console_pid=console_pid, log_file=log_file)

    while True:
        ready = [None] if None in watched else select.select([own, *watched], [], [], POLL_SECONDS)[0]
        if own in ready:
            return
        if ready:
            rank, pid = watched[ready[0]]
            report_about(
                rank,
                f"error: rank {rank} (pid {pid}) exited while rank {own_rank} still needed it: the job "
                f"cannot continue. Look at rank {rank}'s log (workerlog.{rank} in the launcher's log "
                f"folder) for why it ended, then restart the job with -o train.resume=auto to continue "
                f"from the last checkpoint.",
            )
            return
        if is_stopped(own_pid):  # the whole job is suspended (Ctrl-Z on the launcher), not one rank
            stopped_since.clear()
            continue
        now = time.monotonic()
        for rank, pid in watched.values():
            if not is_stopped(pid):
                stopped_since.pop(pid, None)
                continue
            stopped_since.setdefault(pid, now)
            if now - stopped_since[pid] >= FROZEN_SECONDS and pid not in frozen_reported:
                frozen_reported.add(pid)
                report_about(
                    rank,
                    f"error: rank {rank} (pid {pid}) has been stopped (SIGSTOP, Ctrl-Z or a debugger) "
                    f"for {FROZEN_SECONDS:.0f} s; rank {own_rank} waits for it in the next collective "
                    f"operation, and the job fails when that times out. Continue it with "
                    f"`kill -CONT {pid}`, or stop the job and restart it with -o train.resume=auto.",
                )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
