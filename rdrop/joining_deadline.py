"""Ends a worker that waits too long in the job's collective set-up, with a paragraph saying why.

Paddle's set-up waits for every rank inside C++ without releasing the Python lock, so no thread of the
worker can keep time there, and its own timeout is long. `rdrop.job_watch.join` starts this small
process (it imports nothing heavy) before the set-up and closes its stdin once the worker has joined,
or when the worker ends; otherwise, after SECONDS, it prints the paragraph on the worker's stderr,
which it shares, and kills the worker.

    python joining_deadline.py SECONDS WORKER_PID RANK MASTER < a pipe the worker closes
"""

import os
import select
import signal
import sys

PEER_LOST_EXIT_CODE = 69  # rdrop.errors.PEER_LOST_EXIT_CODE; this process does not import the package


def paragraph(seconds, rank, master):
    return (
        f"error: rank {rank} waited {seconds:.0f} s in the job's collective set-up for the other ranks, "
        f"which never all arrived: a rank ended before it joined (killed, crashed, out of memory; look at "
        f"the other machines' consoles), or a machine cannot reach the job's master at {master}. Rank "
        f"{rank} stops too; start the job again on every machine."
    )


def main(seconds, worker_pid, rank, master):
    joined, _, _ = select.select([sys.stdin], [], [], seconds)
    if joined:
        return  # the worker joined the job, or ended
    sys.stderr.write(paragraph(seconds, rank, master) + "\n")
    sys.stderr.flush()
    os.kill(worker_pid, signal.SIGKILL)


if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGINT):  # the worker ends this process by closing the pipe
        signal.signal(signum, signal.SIG_IGN)
    main(float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
