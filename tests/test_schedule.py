"""The learning rate the optimizer actually uses, step by step, against the closed-form schedule."""

import math

from rdrop import optim

import paddle
import pytest


def used_learning_rates(schedule_cfg, peak_lr, steps):
    """Run real optimizer steps and read back the rate each update used (from the parameter change)."""
    model = paddle.nn.Linear(1, 1, bias_attr=False)
    optimizer, scheduler = optim.build(
        {"name": "momentum", "lr": peak_lr, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": None},
        schedule_cfg,
        model,
    )
    rates = []
    for _ in range(steps):
        before = float(model.weight.numpy()[0, 0])
        model.weight.grad = None
        (model.weight.sum() * 1.0).backward()  # gradient exactly 1, so the update equals the rate
        optimizer.step()
        optimizer.clear_grad()
        scheduler.step()
        rates.append(before - float(model.weight.numpy()[0, 0]))
    return rates


def public_code_rate(name, warmup, total, peak, t):
    """The public R-Drop ViT code's LambdaLR multiplier at scheduler step t, times the peak."""
    if t < warmup:
        return peak * t / max(1, warmup)
    if name == "constant":
        return peak
    progress = (t - warmup) / max(1, total - warmup)
    if name == "warmup_cosine":
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2 * 0.5 * progress)))
    return peak * max(0.0, 1.0 - progress)


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear", "constant"])
def test_rates_used_follow_the_public_code_which_steps_its_scheduler_before_the_optimizer(name):
    warmup, total, peak = 10, 50, 0.8
    rates = used_learning_rates({"name": name, "warmup_steps": warmup, "total_steps": total}, peak, total)
    assert rates[0] == pytest.approx(peak / warmup, rel=1e-5)  # not 0: scheduler.step() came first
    assert rates[warmup - 1] == pytest.approx(peak, rel=1e-5)
    assert rates[-1] == pytest.approx({"constant": peak}.get(name, 0.0), abs=5e-6)
    for update, rate in enumerate(rates):
        assert rate == pytest.approx(public_code_rate(name, warmup, total, peak, update + 1), rel=1e-5, abs=5e-6)


def test_configured_peak_is_not_replaced_by_the_multiplier():
    rates = used_learning_rates({"name": "constant", "warmup_steps": 0, "total_steps": 5}, 0.003, 3)
    assert rates == pytest.approx([0.003] * 3, rel=1e-5, abs=5e-6)


def test_scheduler_state_round_trips_through_the_optimizer_state():
    schedule_cfg = {"name": "warmup_cosine", "warmup_steps": 4, "total_steps": 20}
    model = paddle.nn.Linear(2, 2)
    cfg = {"name": "momentum", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "grad_clip": None}
    optimizer, scheduler = optim.build(cfg, schedule_cfg, model)
    for _ in range(7):
        scheduler.step()
    restored_optimizer, restored_scheduler = optim.build(cfg, schedule_cfg, paddle.nn.Linear(2, 2))
    restored_optimizer.set_state_dict(optimizer.state_dict())
    assert restored_scheduler.last_epoch == 7
    assert restored_scheduler.get_lr() == pytest.approx(scheduler.get_lr())


def test_clipping_scales_to_the_global_norm():
    layer = paddle.nn.Linear(3, 2)
    layer.weight.grad = paddle.full([3, 2], 2.0)
    layer.bias.grad = paddle.full([2], 2.0)
    parameters = [layer.weight, layer.bias]
    norm = optim.global_grad_norm(parameters)
    assert float(norm) == pytest.approx(math.sqrt(8 * 4.0), rel=1e-6)
    optim.clip_grads_(parameters, norm, 1.0)
    assert float(optim.global_grad_norm(parameters)) == pytest.approx(1.0, rel=1e-5, abs=5e-6)
    optim.clip_grads_(parameters, optim.global_grad_norm(parameters), 10.0)
    assert float(optim.global_grad_norm(parameters)) == pytest.approx(1.0, rel=1e-5, abs=5e-6)
