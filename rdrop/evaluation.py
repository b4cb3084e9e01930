"""Top-1 / top-5 / loss / per-class accuracy over a whole evaluation set, split over ranks.

Each rank sees a disjoint part of the set (the data package shards without padding), the sums are
all-reduced, so every image is counted exactly once and every rank reports the same numbers. All
accumulation stays on the device; the only copy to the host is of the final totals.
"""
import contextlib

import paddle
import paddle.nn.functional as F

from rdrop import distributed
from rdrop.loss import symmetric_kl
from rdrop.precision import autocast


@contextlib.contextmanager
def _mode(model, training):
    was_training = model.training
    model.train() if training else model.eval()
    try:
        yield
    finally:
        model.train() if was_training else model.eval()


@paddle.no_grad()
def evaluate(model, loader, batch_transform, num_classes, context, amp="none"):
    """Returns {'top1', 'top5' (percent), 'loss' (mean), 'num_samples', 'per_class' (percent per class)}."""
    loss_sum = paddle.zeros([1], dtype="float64")
    top1_per_class = paddle.zeros([num_classes], dtype="float64")
    top5_sum = paddle.zeros([1], dtype="float64")
    count_per_class = paddle.zeros([num_classes], dtype="float64")
    k = min(5, num_classes)
    with _mode(model, training=False):
        for images, labels in loader:
            labels = labels.reshape([-1]).astype("int64")
            with autocast(amp):
                logits = model(batch_transform(images))
            logits = logits.astype("float32")
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").astype("float64")
            ranked = paddle.topk(logits, k=k, axis=-1)[1]
            hits = (ranked == labels.unsqueeze(-1)).astype("float64")
            one_hot = F.one_hot(labels, num_classes).astype("float64")
            top1_per_class += (one_hot * hits[:, :1]).sum(0)
            top5_sum += hits.sum()
            count_per_class += one_hot.sum(0)
    totals = paddle.concat([loss_sum, top5_sum, top1_per_class, count_per_class])
    totals = distributed.all_reduce_sum(totals, context).numpy()
    loss, top5, top1_per_class = totals[0], totals[1], totals[2:2 + num_classes]
    count_per_class = totals[2 + num_classes:]
    num_samples = int(round(count_per_class.sum()))
    denominator = max(num_samples, 1)
    return {
        "top1": 100.0 * float(top1_per_class.sum()) / denominator,
        "top5": 100.0 * float(top5) / denominator,
        "loss": float(loss) / denominator,
        "num_samples": num_samples,
        "per_class": [100.0 * float(c) / n if n else None for c, n in zip(top1_per_class, count_per_class)],
    }


@paddle.no_grad()
def dropout_consistency(model, loader, batch_transform, samples, context):
    """How far `samples` dropout passes stray from the deterministic (dropout-off) prediction.

    This is the train/inference inconsistency R-Drop is meant to reduce: the mean symmetric KL per
    image between each dropout pass and the deterministic pass, and the percentage of dropout passes
    whose top-1 class differs from the deterministic one.
    """
    totals = paddle.zeros([3], dtype="float64")
    for images, labels in loader:
        images = batch_transform(images)
        with _mode(model, training=False):
            reference = model(images).astype("float32")
        with _mode(model, training=True):
            for _ in range(samples):
                sampled = model(images).astype("float32")
                changed = (sampled.argmax(-1) != reference.argmax(-1)).astype("float64").sum()
                kl = symmetric_kl(sampled, reference, "sum").astype("float64")
                totals += paddle.stack([kl, changed, paddle.to_tensor(float(len(labels)), dtype="float64")])
    kl, changed, passes = distributed.all_reduce_sum(totals, context).numpy()
    passes = max(passes, 1.0)
    return {"samples": samples, "symmetric_kl": float(kl / passes), "disagreement": 100.0 * float(changed / passes)}
