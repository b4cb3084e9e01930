"""Checkpoints and best weights on disk: the run folder's layout, and writing that never leaves a
half-written file.

    config.yaml                              the run's full config
    checkpoints/step_<N>/model.pdparams      model weights (the state_dict of the bare model)
                        optimizer.pdopt     optimizer state (portable names, rdrop/optim.py)
                        trainer_state.json  step, data-stream position, best metric, loss-scaler state
                                            (arrays, such as the fp16 loss scale, as tagged lists)
    best.pdparams, best.json                 weights with the best selection accuracy, and its metrics
    .lock                                    held by the run using the folder (rdrop/output_folder.py)

A checkpoint is written into a hidden `.step_<N>.partial` folder and renamed to `step_<N>` once every
file is on disk (rdrop/atomic.py), so a folder named `step_<N>` is always complete. Only rank 0 writes.
"""

import json
import logging
import os
import re
import shutil

from rdrop import atomic
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
STEP_FOLDER = re.compile(r"^step_(\d+)$")
UNFINISHED_STEP_FOLDER = re.compile(r"^\.step_\d+\.(partial|old)$")  # see rdrop/atomic.py


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
    for name in listdir(folder):
        match = STEP_FOLDER.match(name)
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


def host_copy(state):
    """`state`'s tensors copied into host memory (a blocking copy, also on a CPU, where `Tensor.cpu()`
    would return the same tensor): a write of them in the background sees these values while the
    optimizer goes on updating the model's own tensors. The copies keep their names, so paddle.save
    writes the same file as from the model's state_dict."""
    return {name: value._copy_to(paddle.CPUPlace(), True) for name, value in state.items()}


def save_best(output_dir, model_state, metrics):
    """Replace best.pdparams, then best.json, each by an atomic rename."""
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


def read_json(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream, object_hook=_restore_arrays)


def _require_folder(path):
    if not os.path.isdir(path):
        raise UserError(
            f"Checkpoint '{path}' is not a folder. Point train.resume at a checkpoints/step_<N> "
            f"folder of a previous run, or use train.resume=auto."
        )


def load(path):
    """Read a checkpoint folder: (model_state, optimizer_state, trainer_state)."""
    _require_folder(path)
    return tuple(
        _load_file(os.path.join(path, name), reader)
        for name, reader in ((MODEL_FILE, paddle.load), (OPTIMIZER_FILE, paddle.load), (STATE_FILE, read_json))
    )


def listdir(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def selection_of(weights):
    """How the weights at `weights` (what eval.py's --checkpoint names) were chosen: (split, description),
    where split is the split that selected them ('val' or 'test', from the best.json that train.py
    writes beside best.pdparams) or None when no split selected them or it is unknown."""
    path = os.path.abspath(weights) if "://" not in weights else weights
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    step = STEP_FOLDER.match(os.path.basename(folder))
    if step and os.path.basename(os.path.dirname(folder)) == CHECKPOINTS:
        return None, f"the weights of training step {step.group(1)}, not selected on any split"
    metrics_path = os.path.join(folder, BEST_METRICS)
    if os.path.basename(path) != BEST_WEIGHTS or not os.path.isfile(metrics_path):
        return None, "not written by train.py's model selection (no best.json beside them): selection unknown"
    try:
        metrics = read_json(metrics_path)
        split, step = metrics["split"], metrics["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"selection unknown: {metrics_path} cannot be read ({type(error).__name__}: {error})"
    optimistic = ": their test accuracy is an optimistic estimate" if split == "test" else ""
    return split, f"the best on the {split} split during training (step {step}, {BEST_METRICS}){optimistic}"


def run_config_path(weights):
    """The config.yaml of the training run that wrote `weights`: in the same folder (best.pdparams, a
    checkpoint folder or its model.pdparams) or in the run folder above `checkpoints/step_<N>`."""
    if "://" not in weights and not os.path.exists(weights):
        raise UserError(
            f"Checkpoint '{weights}' does not exist. Pass a training run's best.pdparams or "
            f"checkpoints/step_<N> folder, or other weights together with --config."
        )
    folder = os.path.abspath(weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights)))
    candidates = [folder]
    if os.path.basename(os.path.dirname(folder)) == CHECKPOINTS:
        candidates.append(os.path.dirname(os.path.dirname(folder)))
    for candidate in candidates:
        config_path = os.path.join(candidate, RUN_CONFIG)
        if os.path.isfile(config_path):
            return config_path
    raise UserError(
        f"No --config given and no {RUN_CONFIG} found for checkpoint '{weights}' (looked in "
        f"{' and '.join(candidates)}): only the weights of a training run of this project have one, "
        f"not a Google .npz or a URL. Pass the config that describes the weights' architecture and "
        f"dataset, e.g. --config output/run/{RUN_CONFIG} or --config configs/vit_b16_cifar100.yaml."
    )
