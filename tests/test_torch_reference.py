"""scripts/torch_reference.py computes train.py's step for configs/cpu_comparison.yaml, and
scripts/benchmark.py runs it. Skipped where torch is not installed (it is not a dependency)."""

import json

from rdrop import config
from rdrop.loss import RDropLoss, rdrop_logits

import numpy as np
import paddle
import pytest
from run_helpers import ROOT, load_script
from test_benchmark import TINY, run_benchmark

import models

torch = pytest.importorskip("torch")
torch_reference = load_script("torch_reference")

SIZES = dict(img_size=16, patch=4, dim=16, depth=2, heads=2, mlp=32, classes=10)


def test_the_comparison_config_is_the_scripts_default_step():
    cfg = config.load(f"{ROOT}/configs/cpu_comparison.yaml")
    model, train_cfg = cfg["model"], cfg["train"]
    defaults = torch_reference.parse_args([])
    assert (defaults.img_size, defaults.patch, defaults.dim, defaults.depth) == (
        model["img_size"],
        model["patch_size"],
        model["embed_dim"],
        model["depth"],
    )
    assert (defaults.heads, defaults.mlp, defaults.classes) == (
        model["num_heads"],
        model["mlp_dim"],
        model["num_classes"],
    )
    assert (defaults.dropout, defaults.alpha, defaults.batch) == (
        model["dropout"],
        cfg["rdrop"]["alpha"],
        train_cfg["micro_batch_size"],
    )
    assert model["attn_dropout"] == model["drop_path"] == 0 and cfg["rdrop"]["kl_reduction"] == "sum"
    optimizer = cfg["optimizer"]
    assert (optimizer["name"], optimizer["momentum"], optimizer["weight_decay"], optimizer["grad_clip"]) == (
        "momentum",
        torch_reference.MOMENTUM,
        0.0,
        torch_reference.GRAD_CLIP,
    )


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_loss_and_gradients_equal_the_paddle_steps_for_the_same_weights(alpha):
    """Without dropout the two frameworks must compute the same objective and gradients."""
    paddle.seed(0)
    paddle_model = models.build_model(
        dict(
            config.defaults()["model"],
            name="vit",
            img_size=SIZES["img_size"],
            patch_size=SIZES["patch"],
            embed_dim=SIZES["dim"],
            depth=SIZES["depth"],
            num_heads=SIZES["heads"],
            mlp_dim=SIZES["mlp"],
            num_classes=SIZES["classes"],
            dropout=0.0,
        )
    )
    rng = np.random.default_rng(0)
    state = {
        name: 0.3 * rng.standard_normal(value.shape).astype(np.float32)
        for name, value in paddle_model.state_dict().items()
    }
    paddle_model.set_state_dict(state)
    torch_model = torch_reference.VisionTransformer(**SIZES, dropout=0.0)
    linear = {name for name, module in torch_model.named_modules() if isinstance(module, torch.nn.Linear)}
    torch_model.load_state_dict(
        {
            name: torch.from_numpy(value.T.copy() if name.rsplit(".", 1)[0] in linear and value.ndim == 2 else value)
            for name, value in state.items()
        }
    )
    images = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    labels = np.array([1, 7, 3, 1])

    paddle_model.train()
    criterion = RDropLoss(alpha, "sum")
    paddle_images = paddle.to_tensor(images)
    paddle_loss = criterion(
        *rdrop_logits(paddle_model, paddle_images, criterion.needs_two_samples), paddle.to_tensor(labels)
    )["objective"]
    paddle_loss.backward()
    torch_loss = torch_reference.rdrop_loss(torch_model, torch.from_numpy(images), torch.from_numpy(labels), alpha)
    torch_loss.backward()

    assert torch_loss.item() == pytest.approx(float(paddle_loss), rel=1e-5)
    torch_grads = dict(torch_model.named_parameters())
    for name, parameter in paddle_model.named_parameters():
        torch_grad = torch_grads[name].grad.numpy()
        torch_grad = torch_grad.T if torch_grad.ndim == 2 and name.rsplit(".", 1)[0] in linear else torch_grad
        np.testing.assert_allclose(torch_grad, parameter.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_benchmark_runs_the_shipped_reference(tmp_path):
    completed = run_benchmark(
        tmp_path, "--modes", "rdrop", "plain", "--torch-reference", f"{ROOT}/scripts/torch_reference.py"
    )
    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "out.json").read_text())["torch_reference"]
    for mode, alpha in (("rdrop", 0.3), ("plain", 0.0)):
        row = rows[mode]
        assert row["framework"] == "torch" and row["alpha"] == alpha and row["threads"] == 1
        assert row["batch"] == TINY["train"]["micro_batch_size"]
        assert row["img_per_s"] == pytest.approx(row["batch"] / row["step_time_s"])
