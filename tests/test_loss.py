"""The R-Drop loss against values computed by hand or in float64 numpy, never by the code under test."""

import math

from rdrop import RDropLoss, rdrop_logits, symmetric_kl
from rdrop.loss import cross_entropy

import numpy as np
import paddle
import pytest
from vit_reference import symmetric_kl_rows


def tensor(values, dtype="float32"):
    return paddle.to_tensor(np.asarray(values), dtype=dtype)


def test_two_class_hand_calculation():
    # P_a = (1/2, 1/2); P_b = (3/4, 1/4) from logits (ln 3, 0).
    kl_ab = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_ba = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    value = symmetric_kl(tensor([[0.0, 0.0]]), tensor([[math.log(3.0), 0.0]]), "sum")
    assert float(value) == pytest.approx(kl_ab + kl_ba, rel=1e-6)


def test_reductions_relate_as_documented():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    total = symmetric_kl_rows(a, b).sum()
    assert float(symmetric_kl(tensor(a), tensor(b), "sum")) == pytest.approx(total, rel=1e-5)
    assert float(symmetric_kl(tensor(a), tensor(b), "batchmean")) == pytest.approx(total / 6, rel=1e-5)
    assert float(symmetric_kl(tensor(a), tensor(b), "mean")) == pytest.approx(total / 30, rel=1e-5)


def test_symmetric_and_non_negative():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = tensor(rng.normal(scale=3, size=(4, 7))), tensor(rng.normal(scale=3, size=(4, 7)))
        ab, ba = float(symmetric_kl(a, b, "sum")), float(symmetric_kl(b, a, "sum"))
        assert ab == pytest.approx(ba, rel=1e-6)
        assert ab > 0


def test_exactly_zero_on_identical_inputs():
    logits = tensor(np.random.default_rng(2).normal(scale=50, size=(3, 10)))
    assert float(symmetric_kl(logits, logits.clone(), "sum")) == 0.0


def test_finite_and_correct_for_huge_logits():
    a = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]])
    b = np.array([[-1e4, 1e4, 0.0], [1e4, -1e4, 5e3]])
    value = float(symmetric_kl(tensor(a), tensor(b), "sum"))
    assert math.isfinite(value)
    assert value == pytest.approx(symmetric_kl_rows(a, b).sum(), rel=1e-5)


def test_low_precision_logits_are_reduced_in_float32():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    for dtype in ("float16", "bfloat16"):
        value = symmetric_kl(tensor(a).astype(dtype), tensor(b).astype(dtype), "sum")
        assert value.dtype == paddle.float32
        loss = RDropLoss(0.3)(tensor(a).astype(dtype), tensor(b).astype(dtype), paddle.to_tensor([0, 1, 2, 3]))
        assert all(item.dtype == paddle.float32 for item in loss.values())


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    logits_a = paddle.to_tensor(a, dtype="float32", stop_gradient=False)
    symmetric_kl(logits_a, tensor(b), "sum").backward()
    numeric = np.zeros_like(a)
    step = 1e-6
    for index in np.ndindex(*a.shape):
        up, down = a.copy(), a.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (symmetric_kl_rows(up, b).sum() - symmetric_kl_rows(down, b).sum()) / (2 * step)
    np.testing.assert_allclose(logits_a.grad.numpy(), numeric, atol=1e-5)


def test_rdrop_objective_is_two_cross_entropies_plus_weighted_kl_and_logs_their_mean():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])

    def mean_nll(logits):
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -log_p[np.arange(4), labels].mean()

    expected_kl = symmetric_kl_rows(a, b).sum() / 4
    out = RDropLoss(alpha=0.7, kl_reduction="batchmean")(tensor(a), tensor(b), paddle.to_tensor(labels))
    assert float(out["objective"]) == pytest.approx(mean_nll(a) + mean_nll(b) + 0.7 * expected_kl, rel=1e-5)
    assert float(out["symmetric_kl"]) == pytest.approx(expected_kl, rel=1e-5)
    # The logged cross-entropy is per sample, so it reads the same as a single-sample run's.
    assert float(out["cross_entropy"]) == pytest.approx((mean_nll(a) + mean_nll(b)) / 2, rel=1e-5)
    single = RDropLoss(alpha=0.0)(tensor(a), None, paddle.to_tensor(labels))
    assert float(single["cross_entropy"]) == pytest.approx(mean_nll(a), rel=1e-5)


def test_single_pass_when_alpha_is_zero():
    calls = []

    def model(images):
        calls.append(images.shape[0])
        return images

    images = tensor(np.ones((5, 3)))
    logits_a, logits_b = rdrop_logits(model, images, two_samples=RDropLoss(0.0).needs_two_samples)
    assert calls == [5] and logits_b is None
    out = RDropLoss(0.0)(logits_a, None, paddle.to_tensor([0, 1, 2, 0, 1]))
    assert float(out["symmetric_kl"]) == 0.0
    assert float(out["objective"]) == pytest.approx(math.log(3), rel=1e-6)


def test_concatenated_and_two_pass_forwards_agree_without_dropout():
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(6, 8), paddle.nn.GELU(), paddle.nn.Linear(8, 4))
    images = tensor(np.random.default_rng(6).normal(size=(5, 6)))
    labels = paddle.to_tensor([0, 1, 2, 3, 0])
    criterion = RDropLoss(0.3, "sum")
    concatenated = criterion(*rdrop_logits(model, images, True, concat_batch=True), labels)
    two_pass = criterion(*rdrop_logits(model, images, True, concat_batch=False), labels)
    for name in ("objective", "cross_entropy", "symmetric_kl"):
        assert float(concatenated[name]) == pytest.approx(float(two_pass[name]), rel=1e-6, abs=1e-7)


def test_concatenated_halves_get_independent_dropout_masks():
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(6, 64), paddle.nn.Dropout(0.5), paddle.nn.Linear(64, 4))
    model.train()
    logits_a, logits_b = rdrop_logits(model, tensor(np.ones((3, 6))), True, concat_batch=True)
    assert not np.allclose(logits_a.numpy(), logits_b.numpy())
    assert float(symmetric_kl(logits_a, logits_b, "sum")) > 0


def test_cross_entropy_is_exact_where_paddles_kernel_caps_it():
    logits = np.array([[200.0, 0.0, -5.0], [1.0, 2.0, 3.0]])
    labels = np.array([1, 2])
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = log_z - logits[np.arange(2), labels]  # 200.0 for the first image
    assert float(cross_entropy(tensor(logits), paddle.to_tensor(labels), "sum")) == pytest.approx(
        expected.sum(), rel=1e-6
    )
    assert float(cross_entropy(tensor(logits), paddle.to_tensor(labels))) == pytest.approx(expected.mean(), rel=1e-6)
