"""Contracts of the training step that speed depends on: no host reads per micro-step, none in
train.py's loop between logging points, activation recomputation that reproduces R-Drop's two
dropout samples, and a static-program model that computes what the eager one does."""

import contextlib

from rdrop import config, distributed, seeding
from rdrop.errors import UserError
from rdrop.loss import RDropLoss
from rdrop.step import TrainStep, build_trainer, compile_model

import numpy as np
import paddle
import pytest
from run_helpers import tiny_config
from vit_reference import TINY_MODEL

import models
import train

HOST_READS = (
    "numpy",
    "item",
    "tolist",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__array__",
    "__repr__",
    "__str__",
    "__format__",
)


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
    return config.validate(
        {
            "model": dict(TINY_MODEL, attn_dropout=0.1),
            "optimizer": {"name": "momentum", "lr": 0.1, "grad_clip": 1.0},
            "schedule": {"warmup_steps": 0, "total_steps": 10},
            "train": dict({"global_batch_size": 12, "micro_batch_size": 4}, **train),
        }
    )


def build_step(cfg):
    trainer = build_trainer(cfg, distributed.Context(0, 1), models.build_model(cfg["model"], seed=cfg["train"]["seed"]))
    trainer.ddp_model.train()
    return trainer.model, trainer.train_step, trainer.accumulation


def micro_batches(count, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")),
            paddle.to_tensor(rng.integers(0, 10, 4)),
        )
        for _ in range(count)
    ]


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


class _GpuPlace:
    def is_gpu_place(self):
        return True


def fp16_step(monkeypatch, optimizer):
    """An fp16 TrainStep whose loss scaler is enabled as on a GPU: GradScaler enables itself only where
    the tracer's place is a GPU, and then scales, unscales and updates its scale as there."""
    monkeypatch.setattr(
        paddle.amp.grad_scaler, "_dygraph_tracer", lambda: type("Tracer", (), {"_expected_place": _GpuPlace()})
    )
    cfg = tiny_cfg(amp="fp16", global_batch_size=8)
    cfg["optimizer"]["name"] = optimizer
    model, step, accumulation = build_step(cfg)
    assert step.scaler.is_enable()
    return model, step, accumulation


@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_fp16_steps_read_found_inf_once(monkeypatch, optimizer):
    """Paddle's GradScaler.step would read found_inf back inside the optimizer (Momentum twice): the
    step's one read is the control flag, which carries it."""
    _, step, accumulation = fp16_step(monkeypatch, optimizer)
    batches = micro_batches(accumulation)
    step(iter(batches))  # first call builds optimizer state
    with counting_host_reads() as counter:
        outcomes = [step(iter(batches)) for _ in range(3)]
    assert counter["reads"] == 3
    assert not any(outcome["nonfinite"] for outcome in outcomes)
    assert step.scaler.state_dict()["incr_count"] == 4  # every finite step counts towards raising the scale


def test_a_nonfinite_fp16_step_is_skipped_and_halves_the_loss_scale(monkeypatch):
    model, step, accumulation = fp16_step(monkeypatch, "adamw")
    step(iter(micro_batches(accumulation)))
    before = {name: p.numpy() for name, p in model.named_parameters()}
    scale = float(np.asarray(step.scaler.state_dict()["scale"]).reshape(-1)[0])
    images, labels = micro_batches(1)[0]
    images[0, 0, 0, 0] = float("inf")
    outcome = step(iter([(images, labels)] * accumulation))
    assert outcome["nonfinite"] is True
    for name, parameter in model.named_parameters():
        np.testing.assert_array_equal(parameter.numpy(), before[name], err_msg=name)
    state = step.scaler.state_dict()
    assert float(np.asarray(state["scale"]).reshape(-1)[0]) == scale / 2  # GradScaler's decr_ratio 0.5
    assert state["incr_count"] == 0 and state["decr_count"] == 0


def test_recompute_gives_the_same_losses_and_update_with_dropout_on():
    results = []
    for recompute in (False, True):
        model, step, accumulation = build_step(tiny_cfg(recompute=recompute))
        paddle.seed(123)
        step(iter(micro_batches(accumulation)))  # the head starts at zero: the second step has a KL
        outcome = step(iter(micro_batches(accumulation, seed=2)))
        results.append(
            (
                {name: float(value) for name, value in outcome["losses"].items()},
                {name: p.numpy() for name, p in model.named_parameters()},
            )
        )
    (losses, weights), (recomputed_losses, recomputed_weights) = results
    assert losses["symmetric_kl"] > 0  # the two dropout samples really differ
    for name in losses:
        assert recomputed_losses[name] == pytest.approx(losses[name], rel=1e-6, abs=1e-7)
    for name in weights:
        np.testing.assert_allclose(recomputed_weights[name], weights[name], atol=1e-6, err_msg=name)


def host_reads_in_train_loop(tmp_path, archive, monkeypatch):
    """Run train.main for 4 steps with logging, evaluation and saving only after the last, and return
    the host reads inside each TrainStep call and between consecutive calls."""
    marks = []

    class RecordingStep(TrainStep):
        def __call__(self, *args, **kwargs):
            marks.append(counter["reads"])
            outcome = super().__call__(*args, **kwargs)
            marks.append(counter["reads"])
            return outcome

    monkeypatch.setattr("rdrop.step.TrainStep", RecordingStep)
    path = tiny_config(
        tmp_path,
        archive,
        schedule={"warmup_steps": 1, "total_steps": 4},
        train={"log_every": 100, "eval_every": 0, "save_every": 0},
    )
    with counting_host_reads() as counter:
        train.main(["--config", path])
    starts, ends = marks[0::2], marks[1::2]
    assert len(starts) == 4
    inside = [end - start for start, end in zip(starts, ends)]
    between = [start - end for end, start in zip(ends[:-1], starts[1:])]
    return inside, between


def test_train_loop_reads_the_host_once_per_step_and_never_between_logging_points(tmp_path, archive, monkeypatch):
    inside, between = host_reads_in_train_loop(tmp_path, archive, monkeypatch)
    assert inside == [1, 1, 1, 1]  # the finite/stop flag; the 2 micro-batches are loaded inside the step
    assert between == [0, 0, 0]


def test_the_train_loop_count_catches_planted_reads(tmp_path, archive, monkeypatch):
    """The same measurement with a float(loss) planted in every micro-step and one in the loop."""
    criterion_call, seed_for_step = RDropLoss.__call__, seeding.paddle_seed

    def reading_criterion(self, *args):
        losses = criterion_call(self, *args)
        float(losses["objective"])
        return losses

    def reading_seed(*args):
        float(paddle.ones([]))
        return seed_for_step(*args)

    monkeypatch.setattr(RDropLoss, "__call__", reading_criterion)
    monkeypatch.setattr(seeding, "paddle_seed", reading_seed)
    inside, between = host_reads_in_train_loop(tmp_path, archive, monkeypatch)
    assert inside == [3, 3, 3, 3]
    assert between == [1, 1, 1]


def test_compile_model_leaves_the_model_eager_when_off():
    model = models.build_model(tiny_cfg()["model"])
    model.recompute = False
    assert compile_model(model, False) is model


def test_to_static_and_recompute_together_are_a_user_error():
    model = models.build_model(tiny_cfg()["model"])
    model.recompute = True
    with pytest.raises(UserError, match="to_static"):
        compile_model(model, True)


@pytest.mark.filterwarnings("ignore:Tensor do not have 'place' interface")  # raised inside Paddle's converter
def test_static_program_gives_the_eager_logits_and_gradients():
    rng = np.random.default_rng(5)
    images = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, 10, 4))
    results = []
    for to_static in (False, True):
        paddle.seed(0)
        model = models.build_model(dict(tiny_cfg()["model"], dropout=0.0, attn_dropout=0.0))
        model.recompute = False
        paddle.nn.initializer.Normal(std=0.5)(model.head.weight)  # the zero head would hide every gradient
        model = compile_model(model, to_static)
        model.train()
        logits = model(images)
        paddle.nn.functional.cross_entropy(logits, labels).backward()
        model.eval()
        with paddle.no_grad():
            evaluated = model(images).numpy()
        results.append((logits.numpy(), evaluated, {name: p.grad.numpy() for name, p in model.named_parameters()}))
    (logits, evaluated, gradients), (static_logits, static_evaluated, static_gradients) = results
    np.testing.assert_allclose(static_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(static_evaluated, evaluated, rtol=1e-5, atol=1e-5)
    for name, gradient in gradients.items():
        np.testing.assert_allclose(static_gradients[name], gradient, rtol=1e-4, atol=1e-5, err_msg=name)
