"""Run folders with hand-set weights for the eval, export and predict tests.

`write_run` lays out what train.py leaves behind (config.yaml, best.pdparams and a checkpoint
folder), with weights chosen by the test, so that predictions are either known in closed form
(`fixed_class_weights`) or generic and free of ties (`random_weights`).
"""

import shutil

from rdrop import checkpoint, config

import numpy as np
import paddle
from run_helpers import tiny_config

import models

CHECKPOINT_STEP = 3


def random_weights(seed=0, scale=0.5):
    """Every parameter drawn from N(0, scale^2): distinct logits for every image and class."""
    rng = np.random.default_rng(seed)

    def fill(state):
        for name, value in state.items():
            state[name] = (scale * rng.standard_normal(value.shape)).astype(np.float32)

    return fill


def fixed_class_weights(head_bias):
    """All weights zero except the head bias: every image's logits are exactly `head_bias`."""

    def fill(state):
        for name, value in state.items():
            state[name] = np.zeros(value.shape, dtype=np.float32)
        state["head.bias"] = np.asarray(head_bias, dtype=np.float32)

    return fill


def write_run(tmp_path, archive, name, set_weights, **sections):
    """A run folder under tmp_path/name: config.yaml, best.pdparams and checkpoints/step_3/model.pdparams."""
    cfg = config.load(tiny_config(tmp_path, archive, name, **sections))
    run = tmp_path / name
    run.mkdir()
    config.save(cfg, str(run / "config.yaml"))
    model = models.build_model(cfg["model"])
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    set_weights(state)
    model.set_state_dict(state)
    paddle.save(model.state_dict(), str(run / checkpoint.BEST_WEIGHTS))
    step_folder = run / checkpoint.CHECKPOINTS / f"step_{CHECKPOINT_STEP}"
    step_folder.mkdir(parents=True)
    shutil.copy(run / checkpoint.BEST_WEIGHTS, step_folder / checkpoint.MODEL_FILE)
    return run, cfg, model
