"""What a training run carries from one session to the next, saved in every checkpoint and restored
from it on resume: the step, the best selection metrics, the data stream's position, the loss
scaler, the config, and the weights and optimizer state of that step.
"""

import dataclasses
import logging
from typing import Any

from rdrop import checkpoint, config, optim, step
from rdrop.errors import UserError

logger = logging.getLogger(__name__)


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
        changes = config.changes_on_resume(saved.get("config"), cfg, path)
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
