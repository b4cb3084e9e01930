"""The fast CPU paths of models/layers.py (the compiled kernels of models/cpu_kernels.cc, and
Linear's bias gradient): the functions and gradients they compute, checked against float64 NumPy
written here (gradients by central differences), the dropout mask's statistics, independence from the
thread count, and the fallback to Paddle's kernels."""

import logging
import math
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from run_helpers import ROOT
from vit_reference import tiny_model_cfg

import models
from models import cpu_kernels, layers


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.kernels() is not None, "the CPU kernels must build on the test machine"


def tensor(array, requires_grad=True):
    result = paddle.to_tensor(np.asarray(array, dtype=np.float32))
    result.stop_gradient = not requires_grad
    return result


def run_layer(layer, x, upstream, requires_grad=True):
    """Output and input gradient of sum(layer(x) * upstream)."""
    inputs = tensor(x, requires_grad)
    out = layer(inputs)
    (out * tensor(upstream, requires_grad=False)).sum().backward()
    return out.numpy(), None if inputs.grad is None else inputs.grad.numpy()


def numerical_gradient(function, x, step=1e-6):
    """d sum(function(x)) / dx by central differences in float64."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        shifted = x.copy()
        shifted[index] += step
        above = function(shifted).sum()
        shifted[index] -= 2 * step
        gradient[index] = (above - function(shifted).sum()) / (2 * step)
    return gradient


def layer_norm_reference(x, weight, bias, epsilon=1e-6):
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * weight + bias


def gelu_reference(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.mark.parametrize("offset", [0.0, 1000.0])  # 1000: a large mean must not cost precision
@pytest.mark.parametrize("requires_grad", [True, False])
def test_layer_norm_kernel_matches_float64_values_and_gradients(offset, requires_grad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 12)) * 2 + offset
    weight, bias, upstream = rng.standard_normal(12), rng.standard_normal(12), rng.standard_normal((3, 5, 12))
    layer = layers.FastCpuLayerNorm(12, epsilon=1e-6)
    layer.weight.set_value(weight.astype(np.float32))
    layer.bias.set_value(bias.astype(np.float32))
    x = x.astype(np.float32).astype(np.float64)  # the values the kernel sees
    out, x_grad = run_layer(layer, x, upstream, requires_grad)

    np.testing.assert_allclose(out, layer_norm_reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    expected_weight_grad = numerical_gradient(lambda w: layer_norm_reference(x, w, bias) * upstream, weight)
    np.testing.assert_allclose(layer.weight.grad.numpy(), expected_weight_grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad.numpy(), upstream.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    if requires_grad:
        expected_x_grad = numerical_gradient(lambda v: layer_norm_reference(v, weight, bias) * upstream, x)
        np.testing.assert_allclose(x_grad, expected_x_grad, rtol=1e-3, atol=1e-4 * np.abs(expected_x_grad).max())
    else:
        assert x_grad is None


def test_gelu_kernel_matches_the_exact_erf_gelu_and_its_derivative():
    # The whole range: tails where Phi is 0 or 1 in float32, both sides of 0, and exact zero.
    x = np.concatenate([np.linspace(-12, 12, 2401), [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0]]).astype(np.float32)
    x = x.astype(np.float64)
    upstream = np.random.default_rng(1).standard_normal(x.shape)
    out, x_grad = run_layer(layers.FastCpuGELU(), x, upstream)
    expected = gelu_reference(x)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-7)
    step = 1e-5
    derivative = (gelu_reference(x + step) - gelu_reference(x - step)) / (2 * step)
    np.testing.assert_allclose(x_grad, upstream * derivative, rtol=2e-5, atol=1e-6)


def test_linear_with_matvec_bias_gradient_matches_the_affine_map():
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((3, 5, 4)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    upstream = rng.standard_normal((3, 5, 6))
    layer = layers.FastCpuLinear(4, 6)
    layer.weight.set_value(w.astype(np.float32))
    layer.bias.set_value(b.astype(np.float32))
    out, x_grad = run_layer(layer, x, upstream)
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_grad, upstream @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.weight.grad.numpy(), x.reshape(-1, 4).T @ upstream.reshape(-1, 6), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(layer.bias.grad.numpy(), upstream.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_kernel_keeps_one_minus_rate_rescales_and_masks_the_gradient_alike(rate):
    dropout = layers.FastCpuDropout(rate)
    x = np.random.default_rng(3).uniform(1.0, 2.0, size=(64, 65, 191))  # never 0; an odd width
    upstream = np.random.default_rng(4).standard_normal(x.shape)
    paddle.seed(5)
    out, x_grad = run_layer(dropout, x, upstream)
    kept = out != 0
    bound = 5 * np.sqrt(rate * (1 - rate) / kept.size)  # binomial: five standard deviations
    assert abs(kept.mean() - (1 - rate)) < bound
    np.testing.assert_allclose(out[kept], x.astype(np.float32)[kept] / (1 - rate), rtol=1e-6)
    # The backward pass regenerates the same mask from the seed.
    np.testing.assert_allclose(x_grad, np.where(kept, upstream.astype(np.float32) / (1 - rate), 0), rtol=1e-6)
    # No structure along the features (even and odd positions take different halves of each draw).
    per_feature = kept.reshape(-1, 191).mean(axis=0)
    assert np.abs(per_feature - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / (64 * 65))


def test_dropout_masks_follow_paddle_seed_and_differ_between_the_two_rdrop_halves():
    dropout = layers.FastCpuDropout(0.3)
    half = np.ones((256, 192), dtype=np.float32)
    inputs = paddle.to_tensor(np.concatenate([half, half]))  # R-Drop's batch concatenated with itself
    masks = []
    for seed in (7, 7, 8):
        paddle.seed(seed)
        masks.append(dropout(inputs).numpy() != 0)
    assert np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])
    both = (masks[0][:256] & masks[0][256:]).mean()  # independent halves: kept together 0.7 * 0.7
    assert abs(both - 0.49) < 0.01


def test_dropout_is_the_identity_in_evaluation_and_at_rate_zero():
    inputs = paddle.randn([8, 16])
    evaluating = layers.FastCpuDropout(0.5)
    evaluating.eval()
    assert evaluating(inputs) is inputs
    assert layers.FastCpuDropout(0.0)(inputs) is inputs


def test_kernel_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((37, 65, 64))  # rows and elements not divisible by the thread counts
    upstream = rng.standard_normal(x.shape)
    results = []
    for threads in (1, 2, 3):
        paddle.base.core.set_num_threads(threads)
        paddle.seed(9)
        norm = layers.FastCpuLayerNorm(64)
        outputs = [
            run_layer(norm, x, upstream),
            run_layer(layers.FastCpuGELU(), x, upstream),
            run_layer(layers.FastCpuDropout(0.2), x, upstream),
            (norm.weight.grad.numpy(), norm.bias.grad.numpy()),
        ]
        results.append([array for pair in outputs for array in pair])
    paddle.base.core.set_num_threads(1)
    for other in results[1:]:
        for first, second in zip(results[0], other):
            np.testing.assert_array_equal(first, second)


def test_other_dtypes_use_paddles_kernels():
    x = np.linspace(-3, 3, 13)
    out = layers.FastCpuGELU()(paddle.to_tensor(x))  # float64
    assert out.dtype == paddle.float64
    np.testing.assert_allclose(out.numpy(), gelu_reference(x), rtol=1e-12)


def model_outputs(cpu_kernels_on, images, labels):
    paddle.seed(0)
    model = models.build_model(tiny_model_cfg(dropout=0.0, cpu_kernels=cpu_kernels_on))
    paddle.nn.initializer.Normal(std=0.5)(model.head.weight)  # the zero head would hide every gradient
    model.train()
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.numpy(), {name: parameter.grad.numpy() for name, parameter in model.named_parameters()}


def test_model_with_cpu_kernels_matches_the_model_on_paddles_kernels():
    rng = np.random.default_rng(4)
    images = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, 10, 4))
    logits, gradients = model_outputs(True, images, labels)
    reference_logits, reference_gradients = model_outputs(False, images, labels)
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == reference_gradients.keys()
    for name, gradient in reference_gradients.items():
        scale = max(np.abs(gradient).max(), 1e-3)
        np.testing.assert_allclose(gradients[name], gradient, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_a_failed_build_warns_once_and_falls_back_to_paddles_kernels(monkeypatch, caplog):
    def no_compiler(name):
        raise RuntimeError("g++: command not found")

    loaded = cpu_kernels.kernels()
    monkeypatch.setattr(cpu_kernels, "_build_and_load", no_compiler)
    cpu_kernels.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="models.cpu_kernels"):
            assert cpu_kernels.kernels() is None
            x = np.random.default_rng(7).standard_normal((4, 12))
            out = layers.FastCpuLayerNorm(12)(tensor(x)).numpy()
            assert cpu_kernels.kernels() is None
        warnings = [record.getMessage() for record in caplog.records]
        assert len(warnings) == 1 and "g++: command not found" in warnings[0]
        np.testing.assert_allclose(out, layer_norm_reference(x, 1.0, 0.0), rtol=1e-5, atol=1e-5)
    finally:  # Paddle registers the operators once per process: put the loaded module back
        monkeypatch.setattr(cpu_kernels, "_build_and_load", lambda name: loaded)
        cpu_kernels.kernels.cache_clear()
        assert cpu_kernels.kernels() is loaded


def test_the_first_build_is_announced_on_the_console(tmp_path):
    """The compiler's output is hidden while it runs; the line saying why the console is silent is not."""
    script = """
import paddle.utils.cpp_extension
from rdrop import distributed, logs
from models import cpu_kernels
paddle.utils.cpp_extension.load = lambda **kwargs: print("compiler chatter") or "built"
logs.setup(distributed.Context(0, 1))
assert cpu_kernels._build_and_load("rdrop_test_kernels") == "built"
"""
    environment = dict(os.environ, PADDLE_EXTENSION_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Compiling the CPU kernels" in result.stdout and "compiler chatter" not in result.stdout
