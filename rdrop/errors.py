"""User-fixable failures: one clear paragraph and exit code 2, never a traceback.

Anything a user can get wrong (a config value, a data file, a checkpoint) raises `UserError` with a
message that names the thing and says how to fix it. Entry points wrap `main` in `exit_on_user_error`.
A data-loading worker killed from outside (out of memory) gets the same treatment. Everything else
is a programming error and keeps its traceback.
"""

import functools
import re
import sys

USER_ERROR_EXIT_CODE = 2
# EX_UNAVAILABLE of sysexits.h: another rank of the job vanished; resumable from the last checkpoint.
PEER_LOST_EXIT_CODE = 69

# Paddle reports a data-loading worker that died in one of these forms. Its SIGCHLD handler raises
# wherever the main thread is, often inside backward (wrapped in several C++ error layers); when that
# is inside a logging call, logging prints and swallows it, and the next read finds the queue killed.
_DEAD_LOADER_WORKER = re.compile(
    r"DataLoader process \(pid \d+\) exited[^\n(]*|DataLoader \d+ workers exit unexpectedly[^\n(]*"
    r"|Blocking queue is killed because the data reader raises an exception"
)


class UserError(Exception):
    """A problem in the user's input, with a message that names it and the fix."""

    exit_code = USER_ERROR_EXIT_CODE


class PeerLost(UserError):
    """Another rank of the job vanished (killed, crashed, its machine gone). Not the user's input, but
    the same treatment: one paragraph, no traceback, and an exit code of its own."""

    exit_code = PEER_LOST_EXIT_CODE


def exit_missing_dependency(error, needed_for, install):
    """For the ImportError of a package only some scripts or options need: one line saying which package
    is missing and how to install it, and exit code 2 (scripts import it before `main`)."""
    print(
        f"error: {needed_for} needs the Python package '{error.name}', which cannot be imported ({error}). "
        f"Install it with {install}.",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(USER_ERROR_EXIT_CODE)


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            paragraph = " ".join(str(error).split())  # embedded messages (YAML, Paddle) bring line breaks
            print(f"error: {paragraph}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)
        except Exception as error:
            dead_worker = _DEAD_LOADER_WORKER.search(str(error))
            if dead_worker is None:
                raise
            print(
                f"error: a data-loading worker process died ({dead_worker.group(0).strip()}). Something "
                f"outside the run killed it: most often the kernel's out-of-memory killer (see `dmesg`) "
                f"or a full /dev/shm. Lower data.num_workers (0 loads in the training process) or free "
                f"memory, then resume with -o train.resume=auto.",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper
