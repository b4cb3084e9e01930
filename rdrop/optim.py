"""The optimizer, its learning-rate schedule, and global-norm gradient clipping.

Clipping is done here rather than by Paddle's `grad_clip=` so that the training loop gets the
gradient norm as a tensor: it is logged, and a non-finite norm marks a step to skip.
"""

from rdrop.schedule import WarmupDecay

import paddle


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
