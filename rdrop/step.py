"""The trainer train.py runs, built in one place so that scripts/benchmark.py and the tests run the same:
`build_trainer` takes the model (from `models.build_model`) and makes the optimizer, schedule, loss
scaler, distributed wrapper and the `TrainStep` that drives them. Also here: the mixed precision a
step runs in, and the guard that ends a run whose steps keep being skipped.

A step accumulates gradients over `accumulation` micro-batches (the all-reduce of the data-parallel
model runs only on the last one), unscales them (fp16), clips them to the global norm and applies
the update unless they are non-finite. Losses and the gradient norm stay on the device; the only
host read is one small tensor per step: whether the gradients were finite and whether any rank was
asked to stop, which every rank must agree on before it decides what to do next.
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from rdrop import distributed, optim
from rdrop.errors import UserError
from rdrop.loss import RDropLoss, rdrop_logits

import paddle

logger = logging.getLogger(__name__)

LOSS_NAMES = ("objective", "cross_entropy", "symmetric_kl")
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(amp):
    """The mixed-precision context of `train.amp`. Weights stay float32 (the master weights: level O1
    casts the inputs of matmuls and convolutions per op), so updates and checkpoints are float32."""
    if amp == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level="O1", dtype=AMP_DTYPES[amp])


class LossScaler(paddle.amp.GradScaler):
    """Paddle's GradScaler, told on the host whether the step's gradients were finite.

    `GradScaler.step` hands the device flag found_inf to the optimizer, whose `step` reads it back with
    `if found_inf:` (paddle/optimizer/optimizer.py; Momentum reads it once more): a second host read
    per step. TrainStep has that answer already (non-finite unscaled gradients are found_inf, agreed
    by every rank), so it applies or skips the update itself and passes the answer to `update_after`.
    """

    def update_after(self, nonfinite):
        """Move the scale after a step, as `GradScaler.update` does once `step` has set `_cache_found_inf`."""
        if self._enable:
            self._cache_found_inf = nonfinite
        self.update()

    def _update(self):
        """GradScaler._update without its print of the lowered scale: that print calls float() on the
        scale, a tensor of shape [1], which NumPy 2.4 (requirements/common.txt) refuses with a TypeError,
        so the first skipped fp16 step would end the run."""
        if not self._enable:
            return
        if self._cache_found_inf:
            self._incr_count = 0
            self._decr_count += 1
            if self._decr_count == self._decr_every_n_nan_or_inf:
                self._scale = self._scale * self._decr_ratio
                self._decr_count = 0
        else:
            self._decr_count = 0
            self._incr_count += 1
            if self._incr_count == self._incr_every_n_steps:
                self._scale = self._scale * self._incr_ratio
                self._incr_count = 0


def loss_scaler(amp):
    """Dynamic loss scaling for fp16 (bf16 needs none); a disabled scaler (a plain pass-through)
    otherwise. On CPU, Paddle's auto_cast and GradScaler do nothing, so the same code runs everywhere."""
    return LossScaler(enable=amp == "fp16", init_loss_scaling=2.0**15)


def restore_loss_scaler(scaler, state):
    """Put a checkpoint's loss-scaler `state` into `scaler`. A run without loss scaling (bf16, float32,
    or fp16 on a CPU) saves an empty state, which an enabled scaler refuses (Paddle's
    AmpScaler.load_state_dict raises on {}): a resume that switches to fp16 (train.resume_changes)
    starts from the fresh scale instead, and says so. A disabled scaler ignores any state."""
    if scaler.is_enable() and not state:
        logger.info(
            "The checkpoint holds no fp16 loss-scaler state (it was written without loss scaling): "
            "the loss scale starts fresh at %g",
            float(scaler.get_init_loss_scaling()),
        )
        return
    scaler.load_state_dict(state or {})


def accumulation_steps(train_cfg, world_size):
    """Micro-batches per optimizer step on each of `world_size` processes."""
    per_step = train_cfg["micro_batch_size"] * world_size
    if train_cfg["global_batch_size"] % per_step:
        raise UserError(
            f"train.global_batch_size ({train_cfg['global_batch_size']}) must be a multiple of "
            f"train.micro_batch_size x devices ({train_cfg['micro_batch_size']} x {world_size} = "
            f"{per_step}). Change one of them so the division is exact."
        )
    return train_cfg["global_batch_size"] // per_step


def compile_model(model, to_static):
    """`model`, with `to_static` converted in place to run its forward as a static program (same
    layer and parameters). The whole forward is converted (`full_graph`), so a construct the converter
    cannot handle fails at the first step instead of silently running eagerly."""
    if not to_static:
        return model
    if model.recompute:
        raise UserError(
            "train.to_static and train.recompute cannot be combined: recomputation runs the "
            "blocks eagerly. Turn one of them off in the config."
        )
    return paddle.jit.to_static(model, full_graph=True)


class TrainStep:
    def __init__(self, cfg, model, ddp_model, optimizer, scheduler, scaler, context, accumulation):
        self.model, self.ddp_model = model, ddp_model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.context = context
        self.accumulation = accumulation
        self.amp = cfg["train"]["amp"]
        self.grad_clip = cfg["optimizer"]["grad_clip"]
        self.concat_batch = cfg["rdrop"]["concat_batch"]
        self.criterion = RDropLoss(cfg["rdrop"]["alpha"], cfg["rdrop"]["kl_reduction"])
        self.parameters = [p for p in model.parameters() if not p.stop_gradient]

    def __call__(self, micro_batches, stop_requested=False):
        """Run one step over `accumulation` (images, labels) micro-batches, already on the device.

        Returns {'losses': {name: device scalar averaged over the micro-batches}, 'grad_norm': device
        scalar (before clipping), 'lr': the rate this update used, 'nonfinite': bool, 'stop': bool}.
        """
        losses = {name: paddle.zeros([], dtype="float32") for name in LOSS_NAMES}
        for index, (images, labels) in enumerate(micro_batches):
            last = index == self.accumulation - 1
            sync = contextlib.nullcontext() if last else distributed.no_sync(self.ddp_model, self.context)
            with sync, distributed.peers_expected(self.context):
                with autocast(self.amp):
                    logits_a, logits_b = rdrop_logits(
                        self.ddp_model, images, self.criterion.needs_two_samples, self.concat_batch
                    )
                micro_losses = self.criterion(logits_a, logits_b, labels)
                self.scaler.scale(micro_losses["objective"] / self.accumulation).backward()
            for name in LOSS_NAMES:
                losses[name] += micro_losses[name].detach() / self.accumulation
        self.scaler.unscale_(self.optimizer)
        grad_norm = optim.global_grad_norm(self.parameters)
        if self.grad_clip is not None:
            optim.clip_grads_(self.parameters, grad_norm, self.grad_clip)
        control = paddle.stack(
            [(~paddle.isfinite(grad_norm)).astype("float32"), paddle.full([], float(stop_requested), dtype="float32")]
        )
        nonfinite, stop = distributed.all_reduce_max(control, self.context).tolist()  # the step's one host read
        if not nonfinite:
            self.optimizer.step()
        self.scaler.update_after(bool(nonfinite))  # fp16: a skipped step lowers the scale
        self.optimizer.clear_grad()
        lr = self.scheduler.get_lr()
        self.scheduler.step()
        return {"losses": losses, "grad_norm": grad_norm, "lr": lr, "nonfinite": bool(nonfinite), "stop": bool(stop)}


class DivergenceGuard:
    """Ends a run whose steps keep being skipped: `max_bad_steps` consecutive non-finite steps."""

    def __init__(self, max_bad_steps):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0

    def check(self, nonfinite, step):
        if not nonfinite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        logger.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, self.bad_steps)
        if self.bad_steps >= self.max_bad_steps:
            raise UserError(
                f"Training diverged: {self.bad_steps} consecutive steps had a non-finite loss or "
                f"gradient (train.max_bad_steps). Lower optimizer.lr, keep optimizer.grad_clip "
                f"on, or use amp bf16 instead of fp16; resume from the last checkpoint."
            )


@dataclass(frozen=True)
class Trainer:
    """What `build_trainer` returns. `model` is the bare model (its state_dict is what checkpoints hold);
    `ddp_model` is what the step runs: the same model, wrapped for data parallelism on several processes;
    `optimizer` is the (wrapped) optimizer the step updates with."""

    model: paddle.nn.Layer
    ddp_model: paddle.nn.Layer
    optimizer: Any  # a paddle.optimizer.Optimizer, or fleet's wrapper of one
    scheduler: optim.WarmupDecay
    scaler: LossScaler
    accumulation: int
    train_step: TrainStep


def build_trainer(cfg, context, model, restore=None):
    """Build everything one optimizer step of `model` needs, for this process's place in the job
    (`context`). `model` is the bare model from `models.build_model`, the same on every rank.

    `restore(model, optimizer, scaler)` (`RunState.restore`), when given, runs after they are built and
    before the distributed wrap: that is where a resumed run puts its checkpoint in, because fleet
    broadcasts rank 0's parameters to every rank at the wrap.
    """
    train_cfg = cfg["train"]
    accumulation = accumulation_steps(train_cfg, context.world_size)
    model.recompute = train_cfg["recompute"]
    model = compile_model(model, train_cfg["to_static"])
    optimizer, scheduler = optim.build(cfg["optimizer"], cfg["schedule"], model)
    scaler = loss_scaler(train_cfg["amp"])
    if restore is not None:
        restore(model, optimizer, scaler)
    ddp_model, optimizer = distributed.wrap(model, optimizer, context)
    train_step = TrainStep(cfg, model, ddp_model, optimizer, scheduler, scaler, context, accumulation)
    return Trainer(model, ddp_model, optimizer, scheduler, scaler, accumulation, train_step)
