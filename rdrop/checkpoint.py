"""Resumable checkpoints and best weights, written so that a crash never leaves a half-written one.

Layout under `train.output_dir`:

    config.yaml                              the run's full config
    checkpoints/step_<N>/model.pdparams      model weights (the state_dict of the bare model)
                        optimizer.pdopt     optimizer state: momentum / Adam moments, LR scheduler
                        trainer_state.json  step, data-stream position, best metric, loss-scaler state
                                            (arrays, such as the fp16 loss scale, as tagged lists)
    best.pdparams, best.json                 weights with the best selection accuracy, and its metrics
    .lock                                    held by the run using the folder (its host and pid)

A checkpoint is written into a hidden `.step_<N>.partial` folder, every file flushed to disk, and only
then renamed to `step_<N>` (rdrop/atomic.py): the rename is atomic, so a folder named `step_<N>` is
always complete, and a crash mid-save leaves the previous checkpoints untouched. Only rank 0 calls
the writers, and only after `claim_output_dir` has locked the folder for its run.
The model weights in a checkpoint are read like weights from any other source, by `load_weights`.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import socket

from rdrop import atomic, distributed
from rdrop.errors import UserError

import numpy as np
import paddle

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.pdparams"
OPTIMIZER_FILE = "optimizer.pdopt"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "best.pdparams"
BEST_METRICS = "best.json"
_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_UNFINISHED_STEP_FOLDER = re.compile(r"^\.step_\d+\.(partial|old)$")  # see rdrop/atomic.py
LOCK_FILE = ".lock"  # held by rank 0 of the run using the folder; holds its host and pid
_held_locks = {}  # real path of a lock file -> its open file, kept open for the rest of the process


_ARRAY_TAG = "__ndarray__"


def _json_value(value):
    """NumPy values inside the trainer state as JSON. On GPUs the loss scaler's state holds its scale
    as a float32 array of shape [1] (GradScaler.state_dict returns `self._scale.numpy()`)."""
    if isinstance(value, np.ndarray):
        return {_ARRAY_TAG: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be written to a checkpoint's {STATE_FILE}")


def _restore_arrays(obj):
    if set(obj) == {_ARRAY_TAG, "dtype"}:
        return np.array(obj[_ARRAY_TAG], dtype=obj["dtype"])
    return obj


def _write_json(data, path):
    atomic.write_json(path, data, sort_keys=True, default=_json_value)


def _save_error(what, error):
    return UserError(
        f"Could not write {what} ({error.strerror or error}). Free disk space or make the "
        f"folder writable, then resume with train.resume=auto: the previous checkpoints "
        f"are intact."
    )


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, as (step, path), oldest first."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    found = []
    for name in _listdir(folder):
        match = _STEP_FOLDER.match(name)
        if match and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def save(output_dir, step, model_state, optimizer_state, trainer_state, keep):
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones."""
    final = os.path.join(output_dir, CHECKPOINTS, f"step_{step}")
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with atomic.replacing(final) as partial:
            os.makedirs(partial)
            paddle.save(model_state, os.path.join(partial, MODEL_FILE))
            paddle.save(optimizer_state, os.path.join(partial, OPTIMIZER_FILE))
            _write_json(dict(trainer_state, step=step), os.path.join(partial, STATE_FILE))
    except OSError as error:
        raise _save_error(f"checkpoint '{final}'", error) from None
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(output_dir, model_state, metrics):
    """Replace best.pdparams and best.json, each by an atomic rename."""
    try:
        with atomic.replacing(os.path.join(output_dir, BEST_WEIGHTS)) as partial:
            paddle.save(model_state, partial)
        _write_json(metrics, os.path.join(output_dir, BEST_METRICS))
    except OSError as error:
        raise _save_error(f"the best weights in '{output_dir}'", error) from None


def _require_file(path):
    if not os.path.isfile(path):
        raise UserError(
            f"Checkpoint file '{path}' is missing: the checkpoint is incomplete or not a "
            f"checkpoint folder of this project. Point train.resume at a checkpoints/step_<N> "
            f"folder, or use train.resume=auto."
        )


def _load_file(path, loader):
    _require_file(path)
    try:
        return loader(path)
    except Exception as error:  # paddle.load and json raise many types on corrupt files
        raise UserError(
            f"Checkpoint file '{path}' cannot be read ({type(error).__name__}: {error}). It is "
            f"corrupt or not a checkpoint; resume from another checkpoint."
        ) from None


def _read_json(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream, object_hook=_restore_arrays)


def _require_folder(path):
    if not os.path.isdir(path):
        raise UserError(
            f"Checkpoint '{path}' is not a folder. Point train.resume at a checkpoints/step_<N> "
            f"folder of a previous run, or use train.resume=auto."
        )


def load(path):
    """Read a checkpoint folder: (optimizer_state, trainer_state), after checking that its model
    weights are there too (`load_weights` reads them)."""
    _require_folder(path)
    _require_file(os.path.join(path, MODEL_FILE))
    return (
        _load_file(os.path.join(path, OPTIMIZER_FILE), paddle.load),
        _load_file(os.path.join(path, STATE_FILE), _read_json),
    )


def _rename_keys(state, renames):
    """Rename `old` -> `new` where a key is `old`, or starts with `old_` (Paddle's accumulator names)."""
    ordered = sorted(renames.items(), key=lambda item: -len(item[0]))
    renamed = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _rename_keys(value, renames)
        for old, new in ordered:
            if key == old or key.startswith(old + "_"):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    return renamed


def portable_optimizer_state(optimizer, model):
    """The optimizer state keyed by parameter paths (`blocks.0.attn.qkv.weight_velocity_0`) instead of
    Paddle's generated names (`linear_7.w_0_velocity_0`), which depend on how many layers the process
    built before: a checkpoint then loads into any process that builds the same model."""
    return _rename_keys(optimizer.state_dict(), {p.name: path for path, p in model.named_parameters()})


def restore_optimizer(optimizer, model, portable_state):
    optimizer.set_state_dict(_rename_keys(portable_state, {path: p.name for path, p in model.named_parameters()}))


def _main_rank_choice(train_cfg):
    resume, output_dir = train_cfg["resume"], train_cfg["output_dir"]
    if resume == "auto":
        existing = list_checkpoints(output_dir)
        return existing[-1][1] if existing else None
    return resume


def _recorded_step(path):
    """(the step checkpoint folder `path` records, None), or (None, why this process cannot resume from it)."""
    if not os.path.isdir(path):
        return None, "no such folder"
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            return None, f"{name} is missing"
    try:
        return int(_read_json(os.path.join(path, STATE_FILE))["step"]), None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{STATE_FILE} cannot be read ({type(error).__name__}: {error})"


def agree_on_resume(path, reports):
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


def resolve_resume(train_cfg, context):
    """The checkpoint folder every rank resumes from, or None for a fresh start.

    Rank 0 decides (train.resume=auto: the newest complete checkpoint it sees); then every rank
    checks that it can read that very folder and that it records the same step. Without the check,
    machines whose output_dir is a local disk would start from step 0 while rank 0 resumes.
    """
    path = distributed.broadcast_from_main(_main_rank_choice(train_cfg) if context.is_main else None, context)
    step, problem = _recorded_step(path) if path is not None else (None, None)
    return agree_on_resume(path, distributed.gather((step, socket.gethostname(), problem), context))


def _lock_holder(stream):
    stream.seek(0)
    return stream.read().strip() or "a process that has not yet written its name"


def lock_output_dir(output_dir):
    """Hold an exclusive lock on `output_dir` for the rest of this process, or a UserError naming
    the run (host, pid) that holds it. The lock is the operating system's (flock), so it ends with
    the process however that ends: a killed run never blocks its own resume."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
    if path in _held_locks:
        return
    stream = open(path, "a+", encoding="utf-8")
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
    stream.seek(0)
    stream.truncate()
    stream.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    stream.flush()
    _held_locks[path] = stream


def _previous_results(output_dir):
    """What a run left in `output_dir` that a fresh run would overwrite: checkpoints and best weights."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    steps = [os.path.join(folder, name) for name in _listdir(folder) if _STEP_FOLDER.match(name)]
    best = [os.path.join(output_dir, name) for name in (BEST_WEIGHTS, BEST_METRICS)]
    return sorted(steps) + [path for path in best if os.path.lexists(path)]


def _listdir(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def _written_by_runs(output_dir):
    """Everything `save` and `save_best` write, finished or not; never anything else in the folder."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    ours = [
        os.path.join(folder, name)
        for name in _listdir(folder)
        if _STEP_FOLDER.match(name) or _UNFINISHED_STEP_FOLDER.match(name)
    ]
    for name in (BEST_WEIGHTS, BEST_METRICS):
        target = os.path.join(output_dir, name)
        ours += [target, atomic.partial_path(target)]
    return [path for path in ours if os.path.lexists(path)]


def _resumes_in_place(output_dir, resume_from):
    checkpoints = os.path.realpath(os.path.join(output_dir, CHECKPOINTS))
    return resume_from is not None and os.path.realpath(resume_from).startswith(checkpoints + os.sep)


def claim_output_dir(train_cfg, resume_from):
    """Make `train.output_dir`, lock it for this run, and refuse to write over the checkpoints or best
    weights a previous run left there, unless this run resumes from one of those checkpoints
    (`resume_from`) or train.overwrite is set."""
    output_dir = train_cfg["output_dir"]
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock_output_dir(output_dir)
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
        logger.warning("train.overwrite is set: deleting the checkpoints and best weights in %s", output_dir)
        for path in _written_by_runs(output_dir):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
