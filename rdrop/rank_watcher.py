"""Watches the other workers on this machine and reports the first one that dies.

Run by `rdrop.distributed.RankWatchdog` as a small separate process (it imports nothing heavy), with
its stderr shared with the worker it serves, so the report lands in that worker's log even when the
worker itself is aborted by the collective library a moment later (gloo kills a process from C++
when its peer's connection resets, and the launcher then names whichever process it noticed first).

    python rank_watcher.py OWN_RANK OWN_PID RANK:PID [RANK:PID ...]
"""

import os
import select
import sys


def main(own_rank, own_pid, siblings):
    own = os.pidfd_open(own_pid)
    watched = {}
    for entry in siblings:
        rank, pid = entry.split(":")
        try:
            watched[os.pidfd_open(int(pid))] = (rank, pid)
        except ProcessLookupError:
            watched[None] = (rank, pid)
    ready = [None] if None in watched else select.select([own, *watched], [], [])[0]
    if own in ready:
        return
    rank, pid = watched[ready[0]]
    sys.stderr.write(
        f"error: rank {rank} (pid {pid}) exited while rank {own_rank} still needed it: the job "
        f"cannot continue. Look at rank {rank}'s log for why it ended, then restart the job with "
        f"-o train.resume=auto to continue from the last checkpoint.\n"
    )
    sys.stderr.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
