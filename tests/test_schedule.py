"""The learning rate the optimizer actually uses, step by step, against the closed-form schedule."""
import math

import paddle
import pytest

from rdrop import optim


def used_learning_rates(schedule_cfg, peak_lr, steps):
    """Run real optimizer steps and read back the rate each update used (from the parameter change)."""
    model = paddle.nn.Linear(1, 1, bias_attr=False)
    optimizer, scheduler = optim.build({"name": "momentum", "lr": peak_lr, "momentum": 0.0, "weight_decay": 0.0,
                                        "grad_clip": None}, schedule_cfg, model)
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


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear", "constant"])
def test_rates_used_follow_the_formula_at_the_documented_points(name):
    warmup, total, peak = 10, 50, 0.8
    rates = used_learning_rates({"name": name, "warmup_steps": warmup, "total_steps": total}, peak, total)
    assert rates[0] == pytest.approx(0.0, abs=1e-7)
    assert rates[warmup // 2] == pytest.approx(peak * 0.5, rel=1e-5, abs=5e-6)
    assert rates[warmup] == pytest.approx(peak, rel=1e-5, abs=5e-6)
    later = 30
    progress = (later - warmup) / (total - warmup)
    expected_later = {"warmup_cosine": peak * 0.5 * (1 + math.cos(math.pi * progress)),
                      "warmup_linear": peak * (1 - progress), "constant": peak}[name]
    assert rates[later] == pytest.approx(expected_later, rel=1e-5, abs=5e-6)
    expected_last = {"warmup_cosine": peak * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))),
                     "warmup_linear": peak / (total - warmup), "constant": peak}[name]
    assert rates[-1] == pytest.approx(expected_last, abs=5e-6)


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
