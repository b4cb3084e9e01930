"""What a training run carries from one session to the next, saved in every checkpoint and restored
from it on resume: the step, the best selection metrics, the data stream's position, the loss
scaler, the config, and the weights and optimizer state of that step.
"""

import dataclasses
import logging
import math
import os
from typing import Any

from rdrop import checkpoint, config, optim, step
from rdrop.errors import UserError

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ("val", "test")  # where the best weights were selected (rdrop/evaluation.py)
# A checkpoint may lack "loss_scaler" (older versions wrote none): the scale then starts fresh
# (rdrop/step.py restore_loss_scaler).
REQUIRED_FIELDS = ("step", "best", "data")
# GradScaler.state_dict() of an fp16 run (empty when the scaler is disabled): the field and the check
# of its value, as paddle/amp/grad_scaler.py writes and reads them.
LOSS_SCALER_FIELDS = {
    "incr_ratio": lambda value: _is_number(value) and 1 <= value < math.inf,
    "decr_ratio": lambda value: _is_number(value) and 0 < value <= 1,
    "incr_every_n_steps": lambda value: _is_int(value) and value >= 1,
    "decr_every_n_nan_or_inf": lambda value: _is_int(value) and value >= 1,
    "incr_count": lambda value: _is_int(value) and value >= 0,
    "decr_count": lambda value: _is_int(value) and value >= 0,
    "use_dynamic_loss_scaling": lambda value: isinstance(value, bool),
    "scale": lambda value: (
        isinstance(value, np.ndarray)
        and value.shape == (1,)
        and value.dtype.kind == "f"
        and bool(np.isfinite(value).all() and (value > 0).all())
    ),
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value):
    return _is_number(value) and 0 <= value <= 100


def _saved_total_steps(saved):
    """The schedule.total_steps of the run that wrote trainer state `saved` (its stored config), or
    the largest a config allows when it stored none."""
    schedule = saved.get("config", {}).get("schedule") if isinstance(saved.get("config"), dict) else None
    total = schedule.get("total_steps") if isinstance(schedule, dict) else None
    return total if _is_int(total) and 0 < total <= config.MAX_INTEGER else config.MAX_INTEGER


def _best_problem(best, step):
    """Why `best` (the best selection metrics at checkpoint step `step`) is not what a run writes, or None."""
    problem = _best_metrics_problem(best, step)
    if problem is None:
        return None
    return (
        f'{problem} (copy the values from the run\'s {checkpoint.BEST_METRICS}, or set "best": null to let '
        f"the next evaluation choose the best weights anew, replacing {checkpoint.BEST_WEIGHTS})"
    )


def _best_metrics_problem(best, step):
    if best is None:
        return None
    if not isinstance(best, dict):
        return f"has 'best' {config.shown(best)}, which is neither null nor a mapping of metrics"
    if not (_is_int(best.get("step")) and 0 <= best["step"] <= step):
        return f"has best.step {config.shown(best.get('step'))}, which is not a whole number in [0, {step}]"
    if best.get("split") not in SPLITS:
        return f"has best.split {config.shown(best.get('split'))}, which is not one of {', '.join(SPLITS)}"
    for name in ("top1", "top5"):  # top5 and cross_entropy are not used, and older runs did not write them
        if (name == "top1" or name in best) and not _percent(best.get(name)):
            return f"has best.{name} {config.shown(best.get(name))}, which is not a percentage in [0, 100]"
    entropy = best.get("cross_entropy", 0.0)
    if not (_is_number(entropy) and 0 <= entropy < math.inf):
        return f"has best.cross_entropy {config.shown(entropy)}, which is not a finite number >= 0"
    return None


def _loss_scaler_problem(state):
    if not isinstance(state, dict):
        return f"has 'loss_scaler' {config.shown(state)}, which is not a mapping"
    if state and state.keys() != LOSS_SCALER_FIELDS.keys():
        return f"has a 'loss_scaler' with the fields {sorted(state)}, not those of Paddle's GradScaler"
    for name, valid in LOSS_SCALER_FIELDS.items():
        if state and not valid(state[name]):
            value = state[name].tolist() if isinstance(state[name], np.ndarray) else state[name]
            return f"has loss_scaler.{name} {config.shown(value)}, which a GradScaler never holds"
    return None


def _state_problem(saved, path):
    """Why `saved`, the trainer state of checkpoint folder `path`, is not what a run writes, or None:
    every field is checked for its type and range, since a run would use it unchecked."""
    if not isinstance(saved, dict):
        return "does not hold a mapping of fields"
    missing = [name for name in REQUIRED_FIELDS if name not in saved]
    if missing:
        return f"lacks the field(s) {', '.join(missing)}"
    step, total = saved["step"], _saved_total_steps(saved)
    if not (_is_int(step) and 0 <= step <= total):
        return (
            f"records step {config.shown(step)}, which is not a whole number in [0, {total}] (the "
            f"schedule.total_steps of the run that wrote it)"
        )
    named = checkpoint.STEP_FOLDER.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != step:
        return f"records step {step}, but its folder is named {named.group(0)}"
    if saved.get("config") is not None and not isinstance(saved["config"], dict):
        return f"has 'config' {config.shown(saved['config'])}, which is not a mapping of sections"
    if not isinstance(saved["data"], dict):
        return f"has 'data' {config.shown(saved['data'])}, which is not the data stream's position"
    return _best_problem(saved["best"], step) or _loss_scaler_problem(saved.get("loss_scaler", {}))


def check_state(saved, path):
    """`saved`, the trainer state read from checkpoint folder `path`, or a UserError naming its file."""
    problem = _state_problem(saved, path)
    if problem is not None:
        raise UserError(
            f"Checkpoint file '{os.path.join(path, checkpoint.STATE_FILE)}' {problem}. A run writes it "
            f"whole, so it was edited or damaged, and resuming from it would continue from a wrong "
            f"state. Undo the edit, or resume from another checkpoint with train.resume=PATH."
        )
    return saved


@dataclasses.dataclass
class RunState:
    config: dict
    step: int = 0
    best: dict | None = None  # the selection metrics of the best weights so far (best.json)
    data: dict | None = None  # the training stream's state_dict
    loss_scaler: dict | None = None
    resumed_from: str | None = None  # the checkpoint folder this session started from
    changes: list = dataclasses.field(default_factory=list)  # config changes against that checkpoint
    weights: Any = dataclasses.field(default=None, repr=False)  # of the checkpoint, until `restore`
    optimizer_state: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def start(cls, cfg, resume_from):
        """A fresh run, or the run resumed from checkpoint folder `resume_from` (the one all ranks agree
        on: `resume.resolve`)."""
        return cls(cfg) if resume_from is None else cls.load(resume_from, cfg)

    @classmethod
    def load(cls, path, cfg):
        """The run saved in checkpoint folder `path`, continued with config `cfg`."""
        weights, optimizer_state, saved = checkpoint.load(path)
        check_state(saved, path)
        changes = config.changes_on_resume(saved.get("config"), cfg, path)
        total_steps = cfg["schedule"]["total_steps"]
        if saved["step"] > total_steps:
            raise UserError(
                f"Checkpoint '{path}' is at step {saved['step']}, past schedule.total_steps={total_steps} "
                f"of this run, so resuming it would train nothing and its schedule has no such step. "
                f"Resume with a schedule.total_steps of at least {saved['step']} (and "
                f"-o train.resume_changes=[schedule.total_steps]), or evaluate the checkpoint with eval.py."
            )
        return cls(
            cfg,
            saved["step"],
            saved["best"],
            saved["data"],
            saved.get("loss_scaler"),
            path,
            changes,
            weights,
            optimizer_state,
        )

    def restore(self, model, optimizer, scaler):
        """Put a resumed checkpoint into the freshly built model, optimizer and loss scaler; nothing
        for a fresh run. Called by `build_trainer` before the distributed wrap broadcasts rank 0's
        parameters."""
        if self.resumed_from is None:
            return
        expected = {name: list(value.shape) for name, value in model.state_dict().items()}
        if {name: list(value.shape) for name, value in self.weights.items()} != expected:
            raise UserError(
                f"The weights in checkpoint '{self.resumed_from}' do not fit the model of the config (other "
                f"parameter names or shapes): a resume continues the checkpoint's model. Resume with its "
                f"model settings, or start a new run from its weights with model.pretrained: {self.resumed_from}."
            )
        model.set_state_dict(self.weights)
        optim.restore_optimizer(optimizer, model, self.optimizer_state)
        step.restore_loss_scaler(scaler, self.loss_scaler)
        self.weights = self.optimizer_state = None  # a copy of the model is memory the run needs

    def restore_stream(self, stream):
        if self.resumed_from is not None:
            stream.set_state_dict(self.data)
            logger.info("Resumed from %s at step %d", self.resumed_from, self.step)

    def save(self, trainer, stream_state):
        """Write checkpoint `step` into train.output_dir (rank 0 only) and return its folder."""
        train_cfg = self.config["train"]
        return checkpoint.save(
            train_cfg["output_dir"],
            self.step,
            trainer.model.state_dict(),
            optim.portable_optimizer_state(trainer.optimizer, trainer.model),
            {
                "data": stream_state,
                "best": self.best,
                "loss_scaler": trainer.scaler.state_dict(),
                "config": self.config,
            },
            keep=train_cfg["keep_checkpoints"],
        )
