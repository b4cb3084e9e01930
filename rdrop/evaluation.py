"""Metrics of a model over a whole split (top-1 / top-5 / cross-entropy / per-class accuracy, the worst
classes, dropout consistency), and the model selection of a training run on them.

Each rank sees a disjoint part of the set (the data package shards without padding), the sums are
all-reduced, so every image is counted exactly once and every rank reports the same numbers. All
accumulation stays on the device; the only copy to the host is of the final totals.
"""

import contextlib
import logging
import math
import os

from rdrop import checkpoint, distributed, logs, seeding
from rdrop.background_write import BackgroundWrite
from rdrop.loss import cross_entropy, symmetric_kl
from rdrop.step import autocast

import numpy as np
import paddle
import paddle.nn.functional as F

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _mode(model, training):
    was_training = model.training
    model.train() if training else model.eval()
    try:
        yield
    finally:
        model.train() if was_training else model.eval()


@paddle.no_grad()
def evaluate(model, loader, num_classes, context, amp="none"):
    """Returns {'top1', 'top5' (percent), 'cross_entropy' (mean), 'num_samples',
    'per_class' (top-1 percent per class, None for a class without images), 'per_class_count'}."""
    loss_sum = paddle.zeros([1], dtype="float64")
    top1_per_class = paddle.zeros([num_classes], dtype="float64")
    top5_sum = paddle.zeros([1], dtype="float64")
    count_per_class = paddle.zeros([num_classes], dtype="float64")
    k = min(5, num_classes)
    progress = logs.Progress("evaluating: batch", len(loader), show=context.is_main)
    with _mode(model, training=False):
        for batch, (images, labels) in enumerate(loader, 1):
            labels = labels.reshape([-1]).astype("int64")
            with autocast(amp):
                logits = model(images)
            logits = logits.astype("float32")
            loss_sum += cross_entropy(logits, labels, reduction="sum").astype("float64")
            ranked = paddle.topk(logits, k=k, axis=-1)[1]
            hits = (ranked == labels.unsqueeze(-1)).astype("float64")
            one_hot = F.one_hot(labels, num_classes).astype("float64")
            top1_per_class += (one_hot * hits[:, :1]).sum(0)
            top5_sum += hits.sum()
            count_per_class += one_hot.sum(0)
            progress.update(batch)
    totals = paddle.concat([loss_sum, top5_sum, top1_per_class, count_per_class])
    totals = distributed.all_reduce_sum(totals, context).numpy()
    loss, top5, top1_per_class = totals[0], totals[1], totals[2 : 2 + num_classes]
    count_per_class = totals[2 + num_classes :]
    num_samples = int(round(count_per_class.sum()))
    denominator = max(num_samples, 1)
    return {
        "top1": 100.0 * float(top1_per_class.sum()) / denominator,
        "top5": 100.0 * float(top5) / denominator,
        "cross_entropy": float(loss) / denominator,
        "num_samples": num_samples,
        "per_class": [100.0 * float(c) / n if n else None for c, n in zip(top1_per_class, count_per_class)],
        "per_class_count": [int(round(n)) for n in count_per_class],
    }


def worst_classes(metrics, class_names, count):
    """The `count` classes with the lowest top-1 (ties by class index), skipping classes without images."""
    scored = [(accuracy, index) for index, accuracy in enumerate(metrics["per_class"]) if accuracy is not None]
    return [
        {"class": index, "name": class_names[index], "top1": accuracy, "num_samples": metrics["per_class_count"][index]}
        for accuracy, index in sorted(scored)[:count]
    ]


@paddle.no_grad()
def dropout_consistency(model, loader, samples, seed, context, amp="none"):
    """How far `samples` stochastic passes stray from the deterministic prediction.

    This is the train/inference inconsistency R-Drop is meant to reduce. For every image, the
    deterministic (eval-mode) logits are compared with `samples` train-mode passes (dropout,
    attention dropout and stochastic depth on, as in training). Returns the mean symmetric KL per
    image and pass, and the percentage of (image, pass) pairs whose top-1 class differs from the
    deterministic one.

    `loader` goes over the whole split on every rank (not a shard) and rank r takes the batches
    r, r + world_size, ...; each pass is seeded from (seed, batch, sample). An
    image's dropout masks therefore depend on its batch of the split only, so the numbers are the
    same on any number of processes (a shard's batches would regroup images when it changes).
    """
    totals = paddle.zeros([3], dtype="float64")
    progress = logs.Progress("dropout consistency: batch", len(loader), show=context.is_main)
    for batch, (images, labels) in enumerate(loader):
        progress.update(batch + 1)
        if batch % context.world_size != context.rank:
            continue
        with _mode(model, training=False), autocast(amp):
            reference = model(images).astype("float32")
        with _mode(model, training=True):
            for sample in range(samples):
                paddle.seed(seeding.paddle_seed(seed, seeding.Purpose.CONSISTENCY_DROPOUT, batch, sample))
                with autocast(amp):
                    sampled = model(images).astype("float32")
                changed = (sampled.argmax(-1) != reference.argmax(-1)).astype("float64").sum()
                kl = symmetric_kl(sampled, reference, "sum").astype("float64")
                totals += paddle.stack([kl, changed, paddle.to_tensor(float(labels.shape[0]), dtype="float64")])
    kl, changed, passes = distributed.all_reduce_sum(totals, context).numpy()
    passes = max(passes, 1.0)
    return {"samples": samples, "symmetric_kl": float(kl / passes), "disagreement": 100.0 * float(changed / passes)}


def selection_split(cfg):
    """The split a training run selects its best weights on: held-out training images, if any."""
    return "val" if cfg["data"]["val_size"] else "test"


class Selection:
    """Model selection during training: evaluates on the selection split, logs the result and its
    scalars, and keeps the best weights so far (best.pdparams and best.json, written by rank 0 in the
    background: rdrop/background_write.py)."""

    def __init__(self, cfg, context, loader):
        self.split = selection_split(cfg)
        self.loader, self.context = loader, context
        self.num_classes, self.amp = cfg["model"]["num_classes"], cfg["train"]["amp"]
        self.output_dir = cfg["train"]["output_dir"]
        self.best_write = BackgroundWrite("writing the best weights")
        self.last_test = None  # (step, test metrics) of the newest weights tested, for the closing line
        held_out = "held out from training" if self.split == "val" else None
        logger.info(
            "Model selection on the %s split (%s)",
            self.split,
            held_out
            or "as the public code: the best test top-1 is an optimistic estimate, and the last step's is "
            "reported beside it; set data.val_size to select on held-out training images instead",
        )

    def evaluate(self, trainer, run, writer):
        """Evaluate the weights of step `run.step`; a better top-1 becomes `run.best`."""
        metrics = evaluate(trainer.ddp_model, self.loader, self.num_classes, self.context, self.amp)
        checksums = distributed.parameter_checksums(trainer.model, self.context)
        logger.info(
            "eval step %d on %s: top1 %.2f  top5 %.2f  cross_entropy %.4f  (%d images; parameter checksum "
            "%.6e, max drift across ranks %.3e)",
            run.step,
            self.split,
            metrics["top1"],
            metrics["top5"],
            metrics["cross_entropy"],
            metrics["num_samples"],
            checksums[0],
            float(np.max(np.abs(checksums - checksums[0]))),
        )
        writer.scalars(self.split, logs.eval_scalars(metrics), run.step)
        if self.split == "test":
            self.last_test = run.step, metrics
        if math.isfinite(metrics["cross_entropy"]) and (run.best is None or metrics["top1"] > run.best["top1"]):
            run.best = {"step": run.step, "split": self.split, **{k: metrics[k] for k in logs.EVAL_SCALARS}}
            if self.context.is_main:
                weights = checkpoint.host_copy(trainer.model.state_dict())
                self.best_write.start(checkpoint.save_best, self.output_dir, weights, dict(run.best))

    def wait_for_best_weights(self):
        """Block until best.pdparams and best.json are on disk: before a checkpoint, whose best metrics
        must describe the weights there, and before the run ends."""
        self.best_write.wait()

    def test_last_weights(self, trainer, loader, run):
        """Evaluate the last weights on the test split (when selection used val), and say how to test the best."""
        test = evaluate(trainer.ddp_model, loader, self.num_classes, self.context, self.amp)
        self.last_test = run.step, test
        best_weights = os.path.join(self.output_dir, checkpoint.BEST_WEIGHTS)
        if run.best is not None and run.best["step"] == run.step:
            which = f"which are also the best on val ({best_weights})"
        else:
            which = f"not the best-on-val weights; test those with: python eval.py --checkpoint {best_weights}"
        logger.info(
            "Test split, weights of the last step (%d): top1 %.2f  top5 %.2f; %s",
            run.step,
            test["top1"],
            test["top5"],
            which,
        )

    def report_best(self, run):
        """The closing line: the best weights, the split that selected them, and the test top-1 of the
        last step's weights, so that a best-on-test number never stands alone."""
        self.wait_for_best_weights()
        if run.best is None:
            return
        last = "the last step's weights were not tested in this session"
        if self.last_test is not None and self.last_test[0] == run.step:
            last = f"last step ({run.step}) test top1 {self.last_test[1]['top1']:.2f}"
        logger.info(
            "Done: best %s top1 %.2f at step %d (selected on the %s split%s); %s; weights in %s",
            run.best["split"],
            run.best["top1"],
            run.best["step"],
            run.best["split"],
            ", an optimistic estimate" if run.best["split"] == "test" else "",
            last,
            os.path.join(self.output_dir, checkpoint.BEST_WEIGHTS),
        )
