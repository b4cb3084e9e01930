"""The R-Drop objective: cross-entropy of two dropout samples plus a symmetric KL between them.

objective = CE(a) + CE(b) + alpha * (KL(P_a || P_b) + KL(P_b || P_a)), each CE the mean over the batch and the
KL reduced by `kl_reduction` (`sum` is the public R-Drop ViT code's). All in float32, from
log-probabilities on both sides, so it is finite for any logits and exactly 0 when a == b.
The reductions, their relation to the paper's alpha and the usage: docs/loss.md.
"""

import paddle

KL_REDUCTIONS = ("sum", "batchmean", "mean")


def _log_softmax(logits):
    # Not F.log_softmax: Paddle's CPU kernel clamps log-probabilities at -64, which caps the KL
    # between confident predictions. x - logsumexp(x) is exact at any magnitude.
    logits = logits.astype("float32")
    return logits - paddle.logsumexp(logits, axis=-1, keepdim=True)


def cross_entropy(logits, labels, reduction="mean"):
    """Exact cross-entropy in float32, `mean` or `sum` over the batch of int64 `labels` [B].

    Not F.cross_entropy: Paddle's CPU kernel caps each image's loss at 64, which hides how wrong a
    confidently wrong model is (and its gradient).
    """
    negative_log_likelihood = -paddle.take_along_axis(_log_softmax(logits), labels.reshape([-1, 1]), axis=-1)
    return negative_log_likelihood.mean() if reduction == "mean" else negative_log_likelihood.sum()


def symmetric_kl(logits_a, logits_b, reduction="batchmean"):
    """KL(P_a||P_b) + KL(P_b||P_a) with P = softmax over the last axis, reduced as described above."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    log_p, log_q = _log_softmax(logits_a), _log_softmax(logits_b)
    total = ((paddle.exp(log_p) - paddle.exp(log_q)) * (log_p - log_q)).sum()
    if reduction == "batchmean":
        return total / logits_a.shape[0]
    if reduction == "mean":
        return total / logits_a.numel().astype("float32")
    return total


def rdrop_logits(model, images, two_samples, concat_batch=True):
    """Run `model` for R-Drop: two dropout samples of the logits, or one when `two_samples` is false.

    With `concat_batch` the two samples come from one pass over the batch concatenated with itself:
    dropout masks are drawn per element, so the two halves see independent masks, and one pass of 2B
    images keeps the matrix multiplies larger than two passes of B.
    """
    if not two_samples:
        return model(images), None
    if concat_batch:
        logits_a, logits_b = paddle.split(model(paddle.concat([images, images])), 2)
        return logits_a, logits_b
    return model(images), model(images)


class RDropLoss:
    """`criterion(logits_a, logits_b, labels)` -> {'objective', 'cross_entropy', 'symmetric_kl'};
    `logits_b=None` when alpha == 0.

    'objective' is what the optimizer minimises (CE(a) + CE(b) + alpha * KL_sym; CE(a) alone without a
    second sample); 'cross_entropy' is the cross-entropy per sample, the mean of CE(a) and CE(b), which
    means the same with one sample or two, so R-Drop and plain runs compare.
    """

    def __init__(self, alpha, kl_reduction="sum"):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        self.alpha = alpha
        self.kl_reduction = kl_reduction

    @property
    def needs_two_samples(self):
        return self.alpha > 0

    def __call__(self, logits_a, logits_b, labels):
        ce_a = cross_entropy(logits_a, labels)
        if logits_b is None:
            return {"objective": ce_a, "cross_entropy": ce_a, "symmetric_kl": paddle.zeros([], dtype="float32")}
        ce_b = cross_entropy(logits_b, labels)
        kl = symmetric_kl(logits_a, logits_b, self.kl_reduction)
        return {"objective": ce_a + ce_b + self.alpha * kl, "cross_entropy": (ce_a + ce_b) / 2, "symmetric_kl": kl}
