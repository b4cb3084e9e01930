"""Fine-tune a Vision Transformer with R-Drop.

    python train.py --config configs/quickstart.yaml [-o section.key=value ...]
    python -m paddle.distributed.launch --devices 0,1,2,3 train.py --config configs/vit_b16_cifar100_rdrop.yaml
    python -m paddle.distributed.launch --nproc_per_node 2 train.py --config ...    (several CPU processes)

Each optimizer step sees `train.global_batch_size` images however many devices run: every rank
accumulates gradients over micro-batches of `train.micro_batch_size` and the ranks' gradients are
averaged. Each micro-batch goes through the model twice with independent dropout masks (one pass over
the doubled batch) and the objective is CE + CE + alpha * symmetric KL (see rdrop/loss.py).
"""

import argparse
import itertools
import logging
import os

from rdrop import preemption

if __name__ == "__main__":
    preemption.hold_stop_signals()  # until main() takes them: Paddle's import installs its own handler

from rdrop import config, distributed, evaluation, job_watch, logs, output_folder, resume, runtime, seeding  # noqa: E402
from rdrop.errors import exit_on_user_error  # noqa: E402
from rdrop.run_state import RunState  # noqa: E402
from rdrop.step import DivergenceGuard, accumulation_steps, build_trainer  # noqa: E402

import paddle  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402

logger = logging.getLogger("train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, "YAML file in configs/ (or your own)", required=True)
    return parser.parse_args(argv)


def due(every, step, total_steps):
    """Whether a periodic action (every `every` steps; 0: only at the end) runs after `step`."""
    return (every and step % every == 0) or step == total_steps


def configure(argv):
    """The run's settings, read and checked on this rank alone: (config, micro-batches per step, CPU threads)."""
    args = parse_args(argv)
    cfg = config.load(args.config, args.override)
    # Checked before anything is written, so that a config naming an unknown model writes nothing.
    models.resolve_architecture(cfg["model"])
    accumulation = accumulation_steps(cfg["train"], paddle.distributed.get_world_size())
    return cfg, accumulation, runtime.configure_cpu(cfg["train"]["cpu_threads"])


@exit_on_user_error
@preemption.exit_when_stopped
@job_watch.announce_failures
def main(argv=None):
    stop = preemption.StopRequest().install()  # before anything slow: a signal at any moment ends the run cleanly
    logs.forget_log_file()
    # Every rank joins the job even when its settings failed, and then every rank ends with the reason
    # (rdrop/job_watch.py): on several machines, one that left alone would keep the others waiting.
    (cfg, accumulation, cpu_threads), context = job_watch.join(lambda: configure(argv))
    train_cfg, total_steps = cfg["train"], cfg["schedule"]["total_steps"]
    output_dir = train_cfg["output_dir"]
    job_watch.start(context, os.path.join(output_dir, logs.LOG_FILE))  # a failure on any rank ends every rank
    resume_from = resume.resolve(train_cfg, context)  # the checkpoint every rank agrees on, or None
    with job_watch.all_or_none(context):
        run = RunState.start(cfg, resume_from)  # fresh, or resumed from that checkpoint
        if context.is_main:
            output_folder.claim(cfg, run.resumed_from)
        logs.setup(context, output_dir if context.is_main else None)  # from here on rank 0 writes train.log
    logger.info(
        "%d process(es) x %d micro-batch(es) of %d = %d images per step%s",
        context.world_size,
        accumulation,
        train_cfg["micro_batch_size"],
        train_cfg["global_batch_size"],
        f"; {cpu_threads} CPU threads per process" if cpu_threads else "",
    )
    if run.changes:
        logger.info("Resuming with changes to the checkpoint's config: %s", "; ".join(run.changes))

    # Model, optimizer, loss scaler and the step that runs them (rdrop/step.py); a resumed run's
    # checkpoint goes into them before the distributed wrap.
    model = models.build_model(cfg["model"], seed=train_cfg["seed"])
    trainer = build_trainer(cfg, context, model, run.restore)

    # Data: an endless, sharded, resumable stream of model-ready training micro-batches, and the
    # evaluation splits.
    with job_watch.all_or_none(context):
        if context.is_node_main:
            data.prepare_dataset(cfg)  # one download per machine, not one per process into the same file
    stream = data.TrainStream(cfg, context.rank, context.world_size)
    stream.check_same_files_everywhere(lambda value: distributed.gather(value, context))
    run.restore_stream(stream)
    split = evaluation.selection_split(cfg)
    selection = evaluation.Selection(cfg, context, data.build_eval_loader(cfg, split, context.rank, context.world_size))
    # Built now, used after the last step: a test split that cannot be read fails the run before training.
    test_loader = data.build_eval_loader(cfg, "test", context.rank, context.world_size) if split == "val" else None

    writer = logs.MetricsWriter(context, output_dir, run.step, config.run_definition(cfg), logs.eval_tags(split))
    progress = logs.TrainingProgress(cfg, trainer.train_step.criterion.needs_two_samples, writer)
    guard = DivergenceGuard(train_cfg["max_bad_steps"])

    # The loop: one optimizer step over `accumulation` micro-batches, then logging, evaluation, saving.
    stop.defer()
    trainer.ddp_model.train()
    while run.step < total_steps and not stop.stopping:
        paddle.seed(seeding.paddle_seed(train_cfg["seed"], seeding.Purpose.TRAINING_DROPOUT, context.rank, run.step))
        outcome = trainer.train_step(itertools.islice(stream, accumulation), stop.requested)
        run.step += 1
        stop.after_step(outcome["stop"], run.step, total_steps)
        guard.check(outcome["nonfinite"], run.step)
        progress.add(outcome, run.step)
        if stream.reads_files and due(train_cfg["log_every"], run.step, total_steps):  # see data/loader.py
            unreadable = sum(distributed.gather(stream.take_unreadable_count(), context))
            writer.scalars("train", {"unreadable_images": unreadable}, run.step)
        if due(train_cfg["eval_every"], run.step, total_steps):
            selection.evaluate(trainer, run, writer)
        if (due(train_cfg["save_every"], run.step, total_steps) or stop.stopping) and context.is_main:
            selection.wait_for_best_weights()  # the checkpoint's best metrics describe best.pdparams
            run.save(trainer, stream.state_dict())

    stream.close()
    if test_loader is not None and not stop.stopping:
        with stop.interruptible("the final test evaluation"):
            selection.test_last_weights(trainer, test_loader, run)
    job_watch.stop()  # from here on a rank that is done may exit before the others
    distributed.barrier(context)
    writer.close()
    stop.exit_if_stopping(run.step, total_steps)
    selection.report_best(run)


if __name__ == "__main__":
    main()
