"""Learning-rate schedules as functions of the optimizer step, scaled to the configured peak.

`learning_rate(schedule_cfg, peak_lr, t)` is the public R-Drop ViT code's schedule: linear warmup to
the peak, then cosine or linear decay to 0 (or `constant`). Like that code, the update of optimizer
step k (0-based) uses t = k + 1, so the first update already has peak / warmup_steps and the last has
0. `WarmupDecay` wraps it as a Paddle LRScheduler that returns the absolute rate, not the multiplier,
so the optimizer, the checkpoint and the logs all see the configured value.
"""

import logging
import math

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
