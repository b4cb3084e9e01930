"""Evaluate trained weights on the test set: top-1, top-5, cross-entropy, per-class accuracy, worst classes.

    python eval.py --checkpoint output/run/best.pdparams
    python eval.py --checkpoint output/run/checkpoints/step_20000 --output metrics.json
    python eval.py --checkpoint ViT-B_16_cifar100.npz --config configs/vit_b16_cifar100_rdrop.yaml
    python eval.py --checkpoint output/run/best.pdparams --consistency 8
    python -m paddle.distributed.launch --nproc_per_node 2 eval.py --checkpoint ...

The checkpoint is a training checkpoint folder, a `.pdparams` file or a Google `.npz` (or an http(s)
URL to a file, downloaded once); its weights must fit the model of the config exactly. Without
--config, the `config.yaml` of the run the checkpoint belongs to is used (next to best.pdparams, or
in the run folder above checkpoints/step_<N>); a .npz or a URL always needs --config. Every image of
the split is counted exactly once, however many processes share the work.

--consistency K also measures how much predictions change between dropout samples: the mean
symmetric KL and the disagreement rate of K train-mode passes against the deterministic one.

--output writes JSON with: top1, top5 (percent), cross_entropy (mean), num_samples,
class_names, per_class (top-1 percent per class as a list indexed by label, aligned with
class_names; null for a class without images in the split), per_class_count (images per class),
worst_classes (list of {class, name, top1, num_samples}), consistency (with --consistency),
checkpoint, config, split (the one evaluated), selected_on and selection. selected_on is the split
that selected the weights: "val" or "test" for a run's best.pdparams (from its best.json), null for
a checkpoint folder (the weights of one step) and for weights from elsewhere; selection says that
in words, and it is also printed. The path is checked for writability before the evaluation, and
the file is replaced atomically (rdrop/atomic.py): a full disk never leaves a truncated file.
"""

import argparse
import logging
import os

from rdrop import atomic, checkpoint, config, distributed, evaluation, logs, runtime
from rdrop.errors import UserError, exit_on_user_error

import data
import models

logger = logging.getLogger("eval")

WORST_CLASSES_SHOWN = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, .pdparams or Google .npz")
    config.add_arguments(parser, "YAML config; default: the config.yaml of the checkpoint's run")
    parser.add_argument("--output", help="write all metrics to this JSON file")
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="which split to evaluate (val needs data.val_size > 0)"
    )
    parser.add_argument(
        "--consistency",
        type=int,
        default=0,
        metavar="K",
        help="also measure how K dropout samples disagree with the deterministic prediction",
    )
    return parser.parse_args(argv)


def format_report(report):
    lines = [
        f"{report['split']} split of {report['num_samples']} images, weights {report['checkpoint']}",
        f"  weights        {report['selection']}",
        f"  top-1          {report['top1']:7.2f} %",
        f"  top-5          {report['top5']:7.2f} %",
        f"  cross-entropy  {report['cross_entropy']:7.4f}",
    ]
    if report["worst_classes"]:
        lines.append("  worst classes (top-1, images):")
        width = max(len(worst["name"]) for worst in report["worst_classes"])
        lines += [
            f"    {worst['name']:<{width}}  {worst['top1']:6.2f} %  {worst['num_samples']:5d}"
            for worst in report["worst_classes"]
        ]
    if "consistency" in report:
        consistency = report["consistency"]
        lines.append(
            f"  dropout consistency over {consistency['samples']} samples: mean symmetric KL "
            f"{consistency['symmetric_kl']:.4g}, top-1 disagreement {consistency['disagreement']:.2f} %"
        )
    return "\n".join(lines)


def write_json(report, path):
    try:
        atomic.write_json(path, report)
    except OSError as error:
        raise atomic.write_error("the metrics to --output", path, error) from None
    logger.info("Wrote the metrics to %s", os.path.abspath(path))


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.consistency < 0:
        raise UserError(f"--consistency must be a number of dropout samples >= 0, got {args.consistency}.")
    if args.output:
        atomic.check_writable(args.output, "--output")  # now, not after an evaluation that may take an hour
    config_path = args.config or checkpoint.run_config_path(args.checkpoint)
    cfg = config.load(config_path, args.override)
    models.resolve_architecture(cfg["model"])  # the model section's checks, before anything is written
    runtime.configure_cpu(cfg["train"]["cpu_threads"])
    context = distributed.init(use_fleet=False)
    logs.setup(context)
    logger.info("Evaluating %s with config %s", args.checkpoint, config_path)

    model = models.load_trained(args.checkpoint, cfg)
    if context.is_node_main:
        data.prepare_dataset(cfg)  # one download per machine, not one per process into the same file
    distributed.barrier(context)
    loader = data.build_eval_loader(cfg, args.split, context.rank, context.world_size)
    metrics = evaluation.evaluate(model, loader, cfg["model"]["num_classes"], context, cfg["train"]["amp"])
    if args.consistency:
        if not any(cfg["model"][rate] for rate in ("dropout", "attn_dropout", "drop_path")):
            logger.warning(
                "model.dropout, attn_dropout and drop_path are all 0: every sample equals the deterministic prediction"
            )
        whole_split = data.build_eval_loader(cfg, args.split, rank=0, world_size=1)  # see dropout_consistency
        metrics["consistency"] = evaluation.dropout_consistency(
            model, whole_split, args.consistency, cfg["train"]["seed"], context, cfg["train"]["amp"]
        )

    class_names = list(data.class_names(cfg))
    selected_on, selection = checkpoint.selection_of(args.checkpoint)
    report = {
        **metrics,
        "class_names": class_names,
        "worst_classes": evaluation.worst_classes(metrics, class_names, WORST_CLASSES_SHOWN),
        "checkpoint": os.path.abspath(args.checkpoint),
        "config": os.path.abspath(config_path),
        "split": args.split,
        "selected_on": selected_on,
        "selection": selection,
    }
    if context.is_main:
        logger.info(format_report(report))
        if args.output:
            write_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
