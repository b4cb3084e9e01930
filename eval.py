"""Evaluate a checkpoint on the test set: top-1, top-5, loss, per-class accuracy.

    python eval.py --checkpoint output/run/best.pdparams
    python eval.py --checkpoint output/run/checkpoints/step_20000 --output metrics.json
    python eval.py --checkpoint ViT-B_16_cifar100.npz --config configs/vit_b16_cifar100_rdrop.yaml
    python -m paddle.distributed.launch --nproc_per_node 2 eval.py --checkpoint ...

The checkpoint may be a training checkpoint folder, a `.pdparams` file or a Google `.npz`. Without
--config, the `config.yaml` of the run the checkpoint belongs to is used. Every test image is counted
exactly once, however many processes share the work.
"""
import argparse
import json
import logging
import os

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Paddle's C++ info lines out of the console

import data  # noqa: E402
import models  # noqa: E402
from rdrop import checkpoint, config, distributed, evaluation, logs, runtime  # noqa: E402
from rdrop.errors import UserError, exit_on_user_error  # noqa: E402

logger = logging.getLogger("eval")

WORST_CLASSES_SHOWN = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, .pdparams or Google .npz")
    parser.add_argument("--config", help="YAML config; default: the config.yaml of the checkpoint's run")
    parser.add_argument("--output", help="write all metrics to this JSON file")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    parser.add_argument("--consistency", type=int, default=0, metavar="K",
                        help="also measure how K dropout samples disagree with the deterministic prediction")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; the value is parsed as YAML; repeatable")
    return parser.parse_args(argv)


def run_config_of(checkpoint_path):
    """The config.yaml of the training run a checkpoint file or folder was written by, if any."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path.rstrip("/")))
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return os.path.join(candidate, "config.yaml")
    raise UserError(f"No --config given and no config.yaml found next to '{checkpoint_path}' or in its run folder. "
                    f"Pass the config the weights were trained with, e.g. --config configs/quickstart.yaml.")


def format_report(metrics, class_names, split):
    lines = [f"{split}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
             f"({metrics['num_samples']} images)"]
    scored = [(accuracy, name) for accuracy, name in zip(metrics["per_class"], class_names) if accuracy is not None]
    if scored:
        lines.append("worst classes: " + ", ".join(f"{name} {accuracy:.1f}%"
                                                   for accuracy, name in sorted(scored)[:WORST_CLASSES_SHOWN]))
    if "consistency" in metrics:
        consistency = metrics["consistency"]
        lines.append(f"dropout consistency over {consistency['samples']} samples: mean symmetric KL "
                     f"{consistency['symmetric_kl']:.4f}, disagreement {consistency['disagreement']:.2f}%")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.consistency < 0:
        raise UserError(f"--consistency must be a number of dropout samples >= 0, got {args.consistency}.")
    cfg = config.load(args.config or run_config_of(args.checkpoint), args.override)
    cfg["model"]["pretrained"] = None
    runtime.configure_cpu(cfg["train"]["cpu_threads"])
    context = distributed.init()
    logs.setup(context)

    model = models.build_model(cfg["model"])
    models.load_weights_exactly(model, args.checkpoint)
    loader = data.build_eval_loader(cfg, args.split, context.rank, context.world_size)
    transform = data.build_batch_transform(cfg, train=False)
    num_classes = cfg["model"]["num_classes"]
    metrics = evaluation.evaluate(model, loader, transform, num_classes, context, cfg["train"]["amp"])
    if args.consistency:
        metrics["consistency"] = evaluation.dropout_consistency(model, loader, transform, args.consistency, context)

    class_names = data.class_names(cfg)
    metrics["class_names"] = class_names
    metrics["checkpoint"] = os.path.abspath(args.checkpoint)
    metrics["split"] = args.split
    if context.is_main:
        logger.info(format_report(metrics, class_names, args.split))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as stream:
                json.dump(metrics, stream, indent=2)
    return metrics


if __name__ == "__main__":
    main()
