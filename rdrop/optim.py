"""The optimizer, its learning-rate schedule, global-norm gradient clipping, and the optimizer state
under names that survive a restart.

Clipping is done here rather than by Paddle's `grad_clip=` so that the training loop gets the
gradient norm as a tensor: it is logged, and a non-finite norm marks a step to skip.

The schedule is the public R-Drop ViT code's: linear warmup from 0 to the peak over `warmup_steps`,
then cosine or linear decay to 0 at `total_steps` (or `constant`). That code steps its scheduler
before the optimizer, so the update of optimizer step k (0-based) uses the schedule at t = k + 1: the
first update already has peak / warmup_steps and the last has rate 0. `WarmupDecay` returns the
absolute rate, so the optimizer, the checkpoint and the logs all see the same value.
"""

import logging
import math

import paddle
from paddle.optimizer.lr import LRScheduler

logger = logging.getLogger(__name__)


def learning_rate(schedule_cfg, peak_lr, step):
    warmup, total = schedule_cfg["warmup_steps"], schedule_cfg["total_steps"]
    if step < warmup:
        return peak_lr * step / warmup
    if schedule_cfg["name"] == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule_cfg["name"] == "warmup_cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (1.0 - progress)


class WarmupDecay(LRScheduler):
    """Paddle scheduler over `learning_rate`; `step()` once per optimizer step, after the update.

    `last_epoch` counts the updates done, so the next update is step k = last_epoch and uses t = k + 1.
    """

    def __init__(self, schedule_cfg, peak_lr):
        self.schedule_cfg = dict(schedule_cfg)
        self.peak_lr = peak_lr
        warmup, total = schedule_cfg["warmup_steps"], schedule_cfg["total_steps"]
        if warmup > total:
            logger.warning(
                "schedule.warmup_steps (%d) is larger than schedule.total_steps (%d): the run ends during "
                "warmup, at a learning rate of at most %.3g (%.0f%% of optimizer.lr). Lower warmup_steps.",
                warmup,
                total,
                learning_rate(schedule_cfg, peak_lr, total),
                100 * total / warmup,
            )
        super().__init__(learning_rate=peak_lr, last_epoch=-1)

    def get_lr(self):
        return learning_rate(self.schedule_cfg, self.peak_lr, self.last_epoch + 1)


def _decayed_parameter_names(model):
    """AdamW decays matrices and kernels only: not biases, norms, the class token or position embedding."""
    return {
        parameter.name
        for name, parameter in model.named_parameters()
        if len(parameter.shape) >= 2 and name.split(".")[-1] not in ("cls_token", "pos_embed")
    }


def build(optimizer_cfg, schedule_cfg, model):
    """(optimizer, scheduler) for `model`; the scheduler's value is the absolute learning rate."""
    scheduler = WarmupDecay(schedule_cfg, optimizer_cfg["lr"])
    parameters = model.parameters()
    if optimizer_cfg["name"] == "momentum":
        optimizer = paddle.optimizer.Momentum(
            learning_rate=scheduler,
            momentum=optimizer_cfg["momentum"],
            parameters=parameters,
            weight_decay=optimizer_cfg["weight_decay"] or None,
            use_multi_tensor=True,
        )
    else:
        decayed = _decayed_parameter_names(model)
        optimizer = paddle.optimizer.AdamW(
            learning_rate=scheduler,
            parameters=parameters,
            weight_decay=optimizer_cfg["weight_decay"],
            apply_decay_param_fun=decayed.__contains__,
        )
    return optimizer, scheduler


@paddle.no_grad()
def global_grad_norm(parameters):
    """sqrt of the sum of squared gradients over all parameters, in float32, as a 0-d tensor."""
    squares = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in parameters if p.grad is not None]
    return paddle.sqrt(paddle.add_n(squares))


@paddle.no_grad()
def clip_grads_(parameters, grad_norm, max_norm):
    """Scale all gradients in place so that their global norm is at most `max_norm`."""
    scale = paddle.clip(max_norm / (grad_norm + 1e-6), max=1.0)
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.multiply_(scale.astype(parameter.grad.dtype))


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
    """Load a `portable_optimizer_state` into `optimizer` of `model`."""
    optimizer.set_state_dict(_rename_keys(portable_state, {path: p.name for path, p in model.named_parameters()}))
