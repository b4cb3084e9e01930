"""The output folder of a run: made, locked for the run, and never silently written over.

The lock is the operating system's (flock) on `.lock`, so it ends with the process however that ends:
a killed run never blocks its own resume; train.lock_output_dir=false goes without it, for file
systems that have no flock. A fresh run refuses a folder holding another run's
checkpoints or best weights unless train.overwrite is set.
"""

import errno
import fcntl
import logging
import os
import socket

from rdrop import atomic, config, logs
from rdrop.checkpoint import (
    BEST_METRICS,
    BEST_WEIGHTS,
    CHECKPOINTS,
    RUN_CONFIG,
    STEP_FOLDER,
    UNFINISHED_STEP_FOLDER,
    listdir,
)
from rdrop.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # held by rank 0 of the run using the folder; holds its host and pid
# How flock says the file system has no locks: ENOSYS (Lustre mounted without flock or localflock),
# ENOLCK (NFSv3 mounted with nolock, or no lock daemon).
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK)
_held_locks = {}  # real path of a lock file -> its open file, kept open for the rest of the process


def _lock_holder(stream):
    stream.seek(0)
    return stream.read().strip() or "a process that has not yet written its name"


def lock(output_dir):
    """Hold an exclusive lock on `output_dir` for the rest of this process, or a UserError naming
    the run (host, pid) that holds it. The lock is the operating system's (flock), so it ends with
    the process however that ends: a killed run never blocks its own resume. A file system without
    flock is a UserError too: the run could not be kept apart from another one in the folder."""
    path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
    if path in _held_locks:
        return
    stream = atomic.open_own(path, os.O_RDWR | os.O_CREAT, "r+")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(stream)
        stream.close()
        raise UserError(
            f"Output folder '{output_dir}' is in use by another training run ({holder}). Two runs in "
            f"one folder would overwrite and prune each other's checkpoints. Wait for that run to "
            f"end (or stop it), or choose another train.output_dir."
        ) from None
    except OSError as error:
        stream.close()
        if error.errno not in _NO_LOCKS:
            raise
        raise UserError(
            f"The file system of train.output_dir '{output_dir}' does not support file locks (flock "
            f"failed with {errno.errorcode[error.errno]}: {error.strerror}), as on Lustre mounted without "
            f"flock or NFSv3 mounted with nolock. The run locks its output folder so that a second run "
            f"started on the same folder (e.g. a scheduler's requeue while the first still runs) is "
            f"refused instead of overwriting and pruning its checkpoints; here two such runs could not be "
            f"kept apart. Put train.output_dir on a file system with locks (a local disk, or the mount "
            f"with flock enabled), or, if you make sure yourself that only one run uses the folder, "
            f"run without the lock: -o train.lock_output_dir=false."
        ) from None
    stream.seek(0)
    stream.truncate()
    stream.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    stream.flush()
    _held_locks[path] = stream


def _previous_results(output_dir):
    """What a run left in `output_dir` that a fresh run would overwrite: checkpoints and best weights."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    steps = [os.path.join(folder, name) for name in listdir(folder) if STEP_FOLDER.match(name)]
    best = [os.path.join(output_dir, name) for name in (BEST_WEIGHTS, BEST_METRICS)]
    return sorted(steps) + [path for path in best if os.path.lexists(path)]


def _written_by_runs(output_dir):
    """Everything `save` and `save_best` write, finished or not; never anything else in the folder."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    ours = [
        os.path.join(folder, name)
        for name in listdir(folder)
        if STEP_FOLDER.match(name) or UNFINISHED_STEP_FOLDER.match(name)
    ]
    for name in (BEST_WEIGHTS, BEST_METRICS):
        target = os.path.join(output_dir, name)
        ours += [target, atomic.partial_path(target)]
    return [path for path in ours if os.path.lexists(path)]


def _resumes_in_place(output_dir, resume_from):
    checkpoints = os.path.realpath(os.path.join(output_dir, CHECKPOINTS))
    return resume_from is not None and os.path.realpath(resume_from).startswith(checkpoints + os.sep)


def claim(cfg, resume_from):
    """Make `train.output_dir`, lock it for this run, refuse to write over the checkpoints or best
    weights a previous run left there (unless this run resumes from one of those checkpoints,
    `resume_from`, or train.overwrite is set), and write the run's config into it."""
    train_cfg = cfg["train"]
    output_dir = train_cfg["output_dir"]
    for name in (LOCK_FILE, RUN_CONFIG, CHECKPOINTS, BEST_WEIGHTS, BEST_METRICS, logs.LOG_FILE, logs.VISUALDL_DIR):
        atomic.refuse_link(os.path.join(output_dir, name))
    try:
        os.makedirs(output_dir, exist_ok=True)
        if train_cfg["lock_output_dir"]:
            lock(output_dir)
        else:
            logger.warning("train.lock_output_dir is false: nothing keeps another run out of %s", output_dir)
    except OSError as error:
        raise UserError(
            f"Cannot create train.output_dir '{output_dir}' or write into it ({error.strerror}). Choose "
            f"a writable folder."
        ) from None
    previous = [] if _resumes_in_place(output_dir, resume_from) else _previous_results(output_dir)
    if previous and not train_cfg["overwrite"]:
        shown = ", ".join(os.path.relpath(path, output_dir) for path in previous[:4])
        more = f" and {len(previous) - 4} more" if len(previous) > 4 else ""
        raise UserError(
            f"Output folder '{output_dir}' already holds results of another run ({shown}{more}), which "
            f"a new run would overwrite. Resume it with -o train.resume=auto (if it has a checkpoint), "
            f"choose another train.output_dir, or set train.overwrite=true to delete that run's "
            f"checkpoints and best weights."
        )
    if previous:
        logger.warning(
            "train.overwrite is set: deleting the checkpoints and best weights in %s (this run's VisualDL "
            "records replace the earlier run's)",
            output_dir,
        )
        for path in _written_by_runs(output_dir):
            atomic.remove(path)
    config.save(cfg, os.path.join(output_dir, RUN_CONFIG))
