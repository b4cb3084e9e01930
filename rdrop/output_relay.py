"""Passes a worker's output on unchanged, except gloo's abort, which becomes one paragraph.

When another rank's process ends in the middle of a collective, gloo (the CPU collectives) throws an
exception that Paddle cannot hand to Python: the survivor is aborted from C++ at once (SIGABRT), and
prints `terminate called after throwing an instance of 'gloo::IoException'`, a C++ traceback and
Paddle's FatalError dump. No code in that process runs any more, so `rdrop.job_watch` starts this
small process (it imports nothing heavy) and routes the worker's stdout and stderr through it: from gloo's
`terminate` line on, the lines are held back, and when the worker's output closes, the paragraph
below takes their place, on the worker's console and (from the lowest surviving rank) in the run's train.log.

    python output_relay.py OWN_RANK WORLD_SIZE LOG_FILE < the worker's output
"""

import contextlib
import os
import re
import signal
import sys

from rdrop import atomic
from rdrop.errors import UserError

_GLOO_ABORT = re.compile(rb"terminate called after throwing an instance of 'gloo::")
_WHAT = re.compile(rb"what\(\):\s*(.*)")


def paragraph(own_rank, world_size, what):
    other = f"rank {1 - own_rank}" if world_size == 2 else "another rank"
    return (
        f"error: rank {own_rank} lost its connection to {other} inside a collective operation, and gloo "
        f"aborted it ({what}). {other[0].upper()}{other[1:]}'s process ended (killed, crashed, out of memory) "
        f"or its machine is gone: the job cannot continue. Look at {other}'s log for why it ended, then "
        f"restart the job with -o train.resume=auto to continue from the last checkpoint."
    )


def relay(source, sink, own_rank, world_size, log_file):
    """Copy `source` to `sink` line by line until it closes; returns the paragraph written, if any."""
    what = None
    for line in iter(source.readline, b""):
        if what is None and _GLOO_ABORT.search(line):
            what = ""
        if what is None:
            sink.write(line)
            sink.flush()
        elif not what and _WHAT.search(line):
            what = _WHAT.search(line).group(1).decode(errors="replace").strip()
    if what is None:
        return None
    message = paragraph(own_rank, world_size, what or "no details")
    sink.write(message.encode() + b"\n")
    sink.flush()
    lost = 1 - own_rank if world_size == 2 else None
    speaks_for_all = own_rank == min(rank for rank in range(world_size) if rank != lost)  # rank 0, unless it is lost
    if speaks_for_all and os.path.exists(log_file):
        # Never through a link planted at train.log (rdrop/atomic.py); the console has the message anyway.
        with (
            contextlib.suppress(OSError, UserError),
            atomic.open_own(log_file, os.O_WRONLY | os.O_APPEND, "a") as stream,
        ):
            stream.write(message + "\n")
    return message


if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGINT):  # the worker ends this relay by closing its output
        signal.signal(signum, signal.SIG_IGN)
    relay(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
