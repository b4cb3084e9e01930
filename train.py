"""Fine-tune a Vision Transformer with R-Drop.

    python train.py --config configs/quickstart.yaml [-o section.key=value ...]
    python -m paddle.distributed.launch --devices 0,1,2,3 train.py --config configs/vit_b16_cifar100_rdrop.yaml
    python -m paddle.distributed.launch --nproc_per_node 2 train.py --config ...    (several CPU processes)

Each optimizer step sees `train.global_batch_size` images however many devices run: every rank
accumulates gradients over micro-batches of `train.micro_batch_size` and the ranks' gradients are
averaged. Each micro-batch goes through the model twice with independent dropout masks (one pass over
the doubled batch) and the loss is CE + CE + alpha * symmetric KL (see rdrop/loss.py).
"""

import argparse
import itertools
import logging
import math
import os
import time

from rdrop import checkpoint, config, distributed, evaluation, logs, runtime, seeding
from rdrop.errors import UserError, exit_on_user_error
from rdrop.preemption import STOPPED_EXIT_CODE, StopRequest, exit_stopped, exit_when_stopped
from rdrop.step import LOSS_NAMES, accumulation_steps, build_trainer

import numpy as np
import paddle

import data
import models

logger = logging.getLogger("train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, "YAML file in configs/ (or your own)", required=True)
    return parser.parse_args(argv)


def hyperparameters(cfg):
    """Flat section_key -> scalar view of the config for VisualDL's hyper-parameter table (its table
    leaves a name with a dot blank, so `model.name` is shown as `model_name`)."""
    flat = {}
    for section, keys in cfg.items():
        for name, value in keys.items():
            scalar = isinstance(value, (int, float, str)) and not isinstance(value, bool)
            flat[f"{section}_{name}"] = value if scalar else str(value)
    return flat


@exit_on_user_error
@exit_when_stopped
def main(argv=None):
    stop = StopRequest().install()  # before anything slow: a signal at any moment ends the run cleanly
    args = parse_args(argv)
    cfg = config.load(args.config, args.override)
    train_cfg = cfg["train"]
    cpu_threads = runtime.configure_cpu(train_cfg["cpu_threads"])
    # Checked before anything is written, and before joining the job, so that under the launcher the
    # paragraph is not buried in the collective set-up's output (the console shows a failed worker's
    # last lines).
    accumulation = accumulation_steps(train_cfg, paddle.distributed.get_world_size())
    context = distributed.init()
    output_dir = train_cfg["output_dir"]
    resume_from = checkpoint.resolve_resume(train_cfg, context)
    resumed = checkpoint.load(resume_from) if resume_from is not None else None  # (optimizer, trainer state)
    changes = config.changes_on_resume(resumed[1].get("config"), cfg, resume_from) if resumed else []
    if context.is_main:
        checkpoint.claim_output_dir(train_cfg, resume_from)
        config.save(cfg, os.path.join(output_dir, checkpoint.RUN_CONFIG))
    logs.setup(context, output_dir if context.is_main else None)
    logger.info(
        "%d process(es) x %d micro-batch(es) of %d = %d images per step%s",
        context.world_size,
        accumulation,
        train_cfg["micro_batch_size"],
        train_cfg["global_batch_size"],
        f"; {cpu_threads} CPU threads per process" if cpu_threads else "",
    )
    if changes:
        logger.info("Resuming with changes to the checkpoint's config: %s", "; ".join(changes))

    # Model, optimizer, loss scaler and the step that runs them (rdrop/step.py). A resumed run's
    # checkpoint goes into them through `restore`, which build_trainer calls before the distributed wrap.
    def restore(model, optimizer, scaler):
        optimizer_state, trainer_state = resumed
        models.load_weights(model, resume_from, "train.resume")
        checkpoint.restore_optimizer(optimizer, model, optimizer_state)
        scaler.load_state_dict(trainer_state["loss_scaler"])

    model = models.build_model(cfg["model"], seed=train_cfg["seed"])
    trainer = build_trainer(cfg, context, model, restore if resumed is not None else None)

    # Data: an endless, sharded, resumable stream of model-ready training micro-batches, and the
    # selection split.
    if context.is_node_main:
        data.prepare_dataset(cfg)  # one download per machine, not one per process into the same file
    distributed.barrier(context)
    stream = data.TrainStream(cfg, context.rank, context.world_size)
    if train_cfg["global_batch_size"] > stream.num_images:
        raise UserError(
            f"train.global_batch_size ({train_cfg['global_batch_size']}) is larger than the training set "
            f"({stream.num_images} images): one optimizer step would go over it more than once. Choose at "
            f"most {stream.num_images} (the recipes use 512)."
        )
    selection_split = "val" if cfg["data"]["val_size"] else "test"
    selection_loader = data.build_eval_loader(cfg, selection_split, context.rank, context.world_size)
    # Built now, used after the last step: a test split that cannot be read fails the run before training.
    test_loader = (
        data.build_eval_loader(cfg, "test", context.rank, context.world_size) if selection_split == "val" else None
    )
    logger.info(
        "Model selection on the %s split (%s)",
        selection_split,
        "held out from training"
        if selection_split == "val"
        else "set data.val_size to select on held-out training images instead",
    )

    step, best, bad_steps = 0, None, 0
    if resumed is not None:
        _, trainer_state = resumed
        stream.set_state_dict(trainer_state["data"])
        step, best = trainer_state["step"], trainer_state["best"]
        logger.info("Resumed from %s at step %d", resume_from, step)
    metric_tags = [f"{selection_split}/{name}" for name in logs.EVAL_SCALARS]
    writer = logs.MetricsWriter(context, output_dir, step, hyperparameters(cfg), metric_tags)
    watchdog = distributed.RankWatchdog(context, os.path.join(output_dir, logs.LOG_FILE))

    def save_checkpoint():
        if context.is_main:
            checkpoint.save(
                output_dir,
                step,
                trainer.model.state_dict(),
                checkpoint.portable_optimizer_state(trainer.optimizer, trainer.model),
                {"data": stream.state_dict(), "best": best, "loss_scaler": trainer.scaler.state_dict(), "config": cfg},
                keep=train_cfg["keep_checkpoints"],
            )

    def evaluate_and_select():
        nonlocal best
        metrics = evaluation.evaluate(
            trainer.ddp_model, selection_loader, cfg["model"]["num_classes"], context, train_cfg["amp"]
        )
        checksums = distributed.parameter_checksums(trainer.model, context)
        drift = float(np.max(np.abs(checksums - checksums[0])))
        logger.info(
            "eval step %d on %s: top1 %.2f  top5 %.2f  cross_entropy %.4f  (%d images; parameter checksum "
            "%.6e, max drift across ranks %.3e)",
            step,
            selection_split,
            metrics["top1"],
            metrics["top5"],
            metrics["loss"],
            metrics["num_samples"],
            checksums[0],
            drift,
        )
        writer.scalars(selection_split, logs.eval_scalars(metrics), step)
        improved = math.isfinite(metrics["loss"]) and (best is None or metrics["top1"] > best["top1"])
        if improved:
            best = {"step": step, "split": selection_split, **{k: metrics[k] for k in ("top1", "top5", "loss")}}
            if context.is_main:
                checkpoint.save_best(output_dir, trainer.model.state_dict(), best)
        return metrics

    # The loop: one optimizer step over `accumulation` micro-batches, then logging, evaluation, saving.
    total_steps = cfg["schedule"]["total_steps"]
    window = {name: paddle.zeros([], dtype="float32") for name in LOSS_NAMES}
    window_start, window_steps = time.perf_counter(), 0
    stop_requested = False
    stop.defer()
    trainer.ddp_model.train()
    while step < total_steps:
        paddle.seed(seeding.paddle_seed(train_cfg["seed"], seeding.Purpose.TRAINING_DROPOUT, context.rank, step))
        outcome = trainer.train_step(itertools.islice(stream, accumulation), stop.requested)
        nonfinite = outcome["nonfinite"]
        for name in window:
            window[name] += outcome["losses"][name]
        step += 1
        stop_requested = outcome["stop"] and step < total_steps  # a stop during the last step changes nothing
        window_steps += 1
        if nonfinite:
            bad_steps += 1
            logger.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, bad_steps)
            if bad_steps >= train_cfg["max_bad_steps"]:
                raise UserError(
                    f"Training diverged: {bad_steps} consecutive steps had a non-finite loss or "
                    f"gradient (train.max_bad_steps). Lower optimizer.lr, keep optimizer.grad_clip "
                    f"on, or use amp bf16 instead of fp16; resume from the last checkpoint."
                )
        else:
            bad_steps = 0

        if step % train_cfg["log_every"] == 0 or step == total_steps:
            losses = {name: float(total) / window_steps for name, total in window.items()}
            values = logs.train_scalars(losses, trainer.train_step.criterion.needs_two_samples)
            values.update(lr=outcome["lr"], grad_norm=float(outcome["grad_norm"]))
            elapsed = time.perf_counter() - window_start
            img_per_s = window_steps * train_cfg["global_batch_size"] / elapsed
            eta = (total_steps - step) * elapsed / window_steps
            logger.info(logs.progress_line(step, total_steps, values, img_per_s, eta))
            writer.scalars("train", dict(values, img_per_s=img_per_s), step)
            window = {name: paddle.zeros([], dtype="float32") for name in window}
            window_start, window_steps = time.perf_counter(), 0
        if (train_cfg["eval_every"] and step % train_cfg["eval_every"] == 0) or step == total_steps:
            evaluate_and_select()
        if (train_cfg["save_every"] and step % train_cfg["save_every"] == 0) or step == total_steps or stop_requested:
            save_checkpoint()
        if stop_requested:
            logger.info(
                "Stopped by %s at step %d of %d; checkpoint saved. Resume with -o train.resume=auto "
                "(exit code %d: stopped before the end, resumable).",
                stop.signal_name or "a signal on another rank",
                step,
                total_steps,
                STOPPED_EXIT_CODE,
            )
            break

    stream.close()
    if selection_split == "val" and not stop_requested:
        test = evaluation.evaluate(
            trainer.ddp_model, test_loader, cfg["model"]["num_classes"], context, train_cfg["amp"]
        )
        best_weights = os.path.join(output_dir, checkpoint.BEST_WEIGHTS)
        if best is not None and best["step"] == step:
            which = f"which are also the best on val ({best_weights})"
        else:
            which = f"not the best-on-val weights; test those with: python eval.py --checkpoint {best_weights}"
        logger.info(
            "Test split, weights of the last step (%d): top1 %.2f  top5 %.2f; %s",
            step,
            test["top1"],
            test["top5"],
            which,
        )
    watchdog.stop()  # from here on a rank that is done may exit before the others
    distributed.barrier(context)
    writer.close()
    if stop_requested:
        exit_stopped()
    if best is not None:
        logger.info(
            "Done: best %s top1 %.2f at step %d, weights in %s",
            best["split"],
            best["top1"],
            best["step"],
            os.path.join(output_dir, checkpoint.BEST_WEIGHTS),
        )


if __name__ == "__main__":
    main()
