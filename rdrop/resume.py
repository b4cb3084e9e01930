"""Which checkpoint a job resumes from, agreed by every rank.

Rank 0 decides (train.resume=auto: the newest complete checkpoint it sees); then every rank checks that
it can read that very folder and that it records the same step. Without the check, machines whose
output_dir is a local disk would start from step 0 while rank 0 resumes.
"""

import os
import socket

from rdrop import checkpoint, distributed
from rdrop.errors import UserError


def _main_rank_choice(train_cfg):
    resume, output_dir = train_cfg["resume"], train_cfg["output_dir"]
    if resume == "auto":
        existing = checkpoint.list_checkpoints(output_dir)
        return existing[-1][1] if existing else None
    return resume


def _recorded_step(path):
    """(the step checkpoint folder `path` records, None), or (None, why this process cannot resume from it)."""
    if not os.path.isdir(path):
        return None, "no such folder"
    for name in (checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.STATE_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            return None, f"{name} is missing"
    try:
        return int(checkpoint.read_json(os.path.join(path, checkpoint.STATE_FILE))["step"]), None
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
        return None, f"{checkpoint.STATE_FILE} cannot be read ({type(error).__name__}: {error})"


def agree(path, reports):
    """`path`, rank 0's choice, once every rank's report (step, host, problem) on it agrees with
    rank 0's; otherwise the UserError every rank raises."""
    if path is None:
        return None
    main_step, main_host, main_problem = reports[0]
    if main_problem is not None:
        raise UserError(
            f"Cannot resume from '{path}' ({main_problem}): it is not a complete checkpoint folder. "
            f"Point train.resume at a checkpoints/step_<N> folder of a previous run, or use "
            f"train.resume=auto."
        )
    for rank, (step, host, problem) in enumerate(reports):
        if problem is None and step == main_step:
            continue
        seen = problem if problem is not None else f"it records step {step}, rank 0 reads step {main_step}"
        raise UserError(
            f"Rank {rank} on host {host} cannot resume from '{path}', the checkpoint rank 0 (host "
            f"{main_host}) resumes from ({seen}), so the ranks would start from different states. "
            f"Only rank 0 writes checkpoints: with several machines, train.output_dir must be on "
            f"storage all machines share (the same path everywhere). Move it there, or copy that "
            f"checkpoint folder to the same path on every machine, and start the job again."
        )
    return path


def resolve(train_cfg, context):
    """The checkpoint folder every rank resumes from, or None for a fresh start."""
    path = distributed.broadcast_from_main(_main_rank_choice(train_cfg) if context.is_main else None, context)
    step, problem = _recorded_step(path) if path is not None else (None, None)
    return agree(path, distributed.gather((step, socket.gethostname(), problem), context))
