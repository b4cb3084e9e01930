"""Contracts of the training step that speed depends on: no host reads per micro-step, and
activation recomputation that reproduces R-Drop's two dropout samples exactly."""
import contextlib

import numpy as np
import paddle
import pytest

import models
from rdrop import config, distributed, optim, precision
from rdrop.step import TrainStep

HOST_READS = ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__array__",
              "__repr__", "__str__", "__format__")


@contextlib.contextmanager
def counting_host_reads():
    """Count every way a Paddle tensor's value can reach Python while the block runs."""
    counter = {"reads": 0, "depth": 0}
    originals = {name: getattr(paddle.Tensor, name) for name in HOST_READS if hasattr(paddle.Tensor, name)}

    def counted(original):
        def wrapper(*args, **kwargs):
            counter["reads"] += counter["depth"] == 0  # float() calls item() inside: one read, not two
            counter["depth"] += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter["depth"] -= 1
        return wrapper

    for name, original in originals.items():
        setattr(paddle.Tensor, name, counted(original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(paddle.Tensor, name, original)


def tiny_cfg(**train):
    cfg = config.validate({
        "model": {"name": "vit", "img_size": 16, "num_classes": 10, "patch_size": 4, "embed_dim": 16, "depth": 2,
                  "num_heads": 2, "mlp_dim": 32, "dropout": 0.1, "attn_dropout": 0.1},
        "optimizer": {"name": "momentum", "lr": 0.1, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 0, "total_steps": 10},
        "train": dict({"global_batch_size": 12, "micro_batch_size": 4}, **train),
    })
    return cfg


def build_step(cfg):
    paddle.seed(0)
    model = models.build_model(cfg["model"])
    model.recompute = cfg["train"]["recompute"]
    model.train()
    optimizer, scheduler = optim.build(cfg["optimizer"], cfg["schedule"], model)
    accumulation = cfg["train"]["global_batch_size"] // cfg["train"]["micro_batch_size"]
    step = TrainStep(cfg, model, model, optimizer, scheduler, precision.loss_scaler("none"),
                     distributed.Context(0, 1), accumulation)
    return model, step, accumulation


def micro_batches(count, seed=1):
    rng = np.random.default_rng(seed)
    return [(paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")),
             paddle.to_tensor(rng.integers(0, 10, 4))) for _ in range(count)]


def test_the_counter_catches_a_planted_host_read():
    loss = paddle.ones([])
    with counting_host_reads() as counter:
        float(loss)
        loss.numpy()
    assert counter["reads"] == 2


@pytest.mark.parametrize("accumulation", [1, 3])
def test_one_host_read_per_optimizer_step_and_none_per_micro_step(accumulation):
    _, step, _ = build_step(tiny_cfg(global_batch_size=4 * accumulation))
    batches = micro_batches(accumulation)
    step(iter(batches))  # first call builds optimizer state
    with counting_host_reads() as counter:
        outcome = step(iter(batches))
    assert counter["reads"] == 1  # the finite/stop flag, whatever the number of micro-batches
    assert outcome["nonfinite"] is False and outcome["stop"] is False


def test_recompute_gives_the_same_losses_and_update_with_dropout_on():
    results = []
    for recompute in (False, True):
        model, step, accumulation = build_step(tiny_cfg(recompute=recompute))
        paddle.seed(123)
        step(iter(micro_batches(accumulation)))  # the head starts at zero: the second step has a KL
        outcome = step(iter(micro_batches(accumulation, seed=2)))
        results.append(({name: float(value) for name, value in outcome["losses"].items()},
                        {name: p.numpy() for name, p in model.named_parameters()}))
    (losses, weights), (recomputed_losses, recomputed_weights) = results
    assert losses["kl"] > 0  # the two dropout samples really differ
    for name in losses:
        assert recomputed_losses[name] == pytest.approx(losses[name], rel=1e-6, abs=1e-7)
    for name in weights:
        np.testing.assert_allclose(recomputed_weights[name], weights[name], atol=1e-6, err_msg=name)
