"""Preflight for GPU users: checks, in about two minutes on one GPU, everything that only a GPU run
takes, before the paper configs spend GPU-hours on it.

    python scripts/gpu_check.py [--config configs/vit_b16_cifar100_rdrop.yaml] [-o section.key=value ...]

Prints one row per check, PASS, FAIL or SKIPPED with the reason, and exits with 1 if any failed:

    build          the Paddle package is the CUDA build (not the CPU package, not both), its CUDA and
                   cuDNN versions, and the GPUs it sees
    attention      under bf16 autocast, attention at the config's shapes takes the flash kernel, and the
                   logits agree with float32 logits of the same random weights (relative error below
                   BF16_LOGITS_TOLERANCE)
    bf16 steps     30 R-Drop steps in bf16 of the config's model at its micro-batch, on one random batch:
                   every loss and gradient finite, and the loss falls
    fp16 resume    an fp16 run saves a checkpoint as train.py does and resumes with its loss scale and
                   counters intact, then steps on
    accumulation   with 2 or more GPUs: 2 processes x 2 micro-batches end with the weights of 1 process
                   x 4 micro-batches (gradients all-reduced over NCCL)
    speed          images/s, peak memory and utilisation of the config's training step, with and without
                   train.recompute (scripts/benchmark.py, each in a fresh process)

Everything is built by rdrop.step.build_trainer, as train.py builds it, and resumed through its
`restore` hook, as train.py resumes. The model is the config's with random weights
(`model.pretrained` is not downloaded) and the data are random. On a machine without a GPU the build
row says so and the GPU rows are SKIPPED, with the test that covers the same code on CPU processes
where there is one.
"""

import argparse
import copy
import importlib.metadata
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback
from typing import NamedTuple

from rdrop import benchmarking, config, distributed
from rdrop.errors import exit_on_user_error
from rdrop.run_state import RunState
from rdrop.step import autocast, build_trainer

import numpy as np
import paddle

import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "scripts" / "benchmark.py"
DEFAULT_CONFIG = "configs/vit_b16_cifar100_rdrop.yaml"
# bf16 keeps 8 significant bits (a relative rounding error of 2**-9 per operation): this allows the
# logits about 25 such errors' worth of drift through the encoder, while a broken kernel or layout
# errs by order 1. Not calibrated on a GPU yet: a FAIL just above it deserves a look, not alarm.
BF16_LOGITS_TOLERANCE = 0.05
BF16_STEPS = 30
# Weights after the accumulation runs: the two may differ by rounding (order of the sums, TF32), not
# by this fraction of how far the updates moved them (a wrong 1/accumulation moves them twice as far).
ACCUMULATION_TOLERANCE = 1e-2
PADDLE_PACKAGES = ("paddlepaddle", "paddlepaddle-gpu")


class Result(NamedTuple):
    status: str  # PASS, FAIL or SKIPPED
    detail: str


def passed(detail):
    return Result("PASS", detail)


def failed(detail):
    return Result("FAIL", detail)


def skipped(detail):
    return Result("SKIPPED", detail)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = str(ROOT / DEFAULT_CONFIG)  # the repository's, from whatever folder the script runs in
    config.add_arguments(parser, f"the run to check (default: {DEFAULT_CONFIG})", default=default)
    parser.add_argument("--accumulation-worker", metavar="DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the Paddle build --------------------------------------------------------------------------------


def installed_paddle_packages():
    """{distribution name: version} of the Paddle packages pip installed."""
    found = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name in PADDLE_PACKAGES:
            found[name] = distribution.version
    return found


def nvidia_gpus_on_machine():
    """Whether the NVIDIA driver sees a GPU, whatever Paddle build is installed."""
    folder = "/proc/driver/nvidia/gpus"
    return os.path.isdir(folder) and bool(os.listdir(folder))


def build_result(packages, cuda_build, gpus_on_machine, devices, cuda_version, cudnn_version):
    """The verdict on the Paddle install; `devices` are the names of the GPUs Paddle sees."""
    described = ", ".join(f"{name} {version}" for name, version in sorted(packages.items())) or "no pip package"
    if len(packages) > 1:
        return failed(
            f"both {described} are installed; they share the module `paddle` and break each other. Run "
            f"`pip uninstall -y paddlepaddle paddlepaddle-gpu` and `pip install -r requirements/gpu.txt`."
        )
    if not cuda_build:
        if gpus_on_machine:
            return failed(
                f"{described} is the CPU build but this machine has NVIDIA GPUs. Install the GPU build: "
                f"`pip uninstall -y paddlepaddle` and `pip install -r requirements/gpu.txt`."
            )
        return skipped(f"{described}, the CPU build, on a machine without NVIDIA GPUs")
    if not devices:
        return failed(
            f"{described} is built with CUDA {cuda_version} but sees no GPU: check the driver "
            f"(`nvidia-smi`) and CUDA_VISIBLE_DEVICES."
        )
    return passed(
        f"{described}, CUDA {cuda_version}, cuDNN {cudnn_version}, {len(devices)} GPU(s): {', '.join(devices)}"
    )


def check_build():
    cuda_build = paddle.is_compiled_with_cuda()
    devices = []
    if cuda_build:
        devices = [paddle.device.cuda.get_device_name(index) for index in range(paddle.device.cuda.device_count())]
    return build_result(
        installed_paddle_packages(),
        cuda_build,
        nvidia_gpus_on_machine(),
        devices,
        paddle.version.cuda(),
        paddle.version.cudnn(),
    )


# --- the checks that run on one GPU ------------------------------------------------------------------


def random_weights_config(cfg, **train_changes):
    """`cfg` with random weights (no download) and the given train.* values."""
    changed = copy.deepcopy(cfg)
    changed["model"]["pretrained"] = None
    changed["train"].update(train_changes)
    return changed


class _BackendRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.backends = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Selected backend:"):
            self.backends.append(message.split(":", 1)[1].strip())


def attention_backends(run):
    """The kernels Paddle's scaled_dot_product_attention chose (it logs each choice at debug level)
    while `run()` ran, and what `run()` returned."""
    logger = logging.getLogger("paddle.nn.functional.sdpa")
    recorder, handlers, level = _BackendRecorder(), logger.handlers, logger.level
    logger.handlers, logger.level = [recorder], logging.DEBUG  # only to the recorder, not the console
    try:
        return recorder.backends, run()
    finally:
        logger.handlers, logger.level = handlers, level


def relative_error(values, reference):
    return float(np.linalg.norm(values - reference) / np.linalg.norm(reference))


def bf16_unsupported():
    """Why bf16 autocast would silently run in float32 here, or None."""
    if paddle.amp.is_bfloat16_supported():
        return None
    major, minor = paddle.device.cuda.get_device_capability()
    return (
        f"{paddle.device.cuda.get_device_name()} (compute capability {major}.{minor}) has no bf16: "
        f"Paddle would train the config in float32. Use -o train.amp=fp16"
    )


def check_attention(cfg):
    if bf16_unsupported():
        return failed(bf16_unsupported())
    cfg = random_weights_config(cfg)
    model = models.build_model(cfg["model"], seed=cfg["train"]["seed"])
    paddle.nn.initializer.Normal(std=model.embed_dim**-0.5)(model.head.weight)  # the zero head gives zero logits
    model.eval()
    images, _ = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])

    def bf16_logits():
        with paddle.no_grad(), autocast("bf16"):
            return model(images)

    backends, logits = attention_backends(bf16_logits)
    with paddle.no_grad():
        reference = model(images).numpy()
    error = relative_error(logits.numpy(), reference)
    heads = f"{model.num_heads} heads of {model.embed_dim // model.num_heads}"
    shape = f"batch {images.shape[0]}, {model.grid_size**2 + 1} tokens, {heads}"
    if set(backends) != {"flash_attn"}:
        return failed(f"attention ({shape}) in bf16 ran {sorted(set(backends)) or 'no SDPA kernel'}, not flash_attn")
    if logits.dtype != paddle.float32 or not error < BF16_LOGITS_TOLERANCE:
        return failed(
            f"bf16 logits ({logits.dtype}) differ from float32 ones by {error:.2e} of their norm "
            f"(tolerance {BF16_LOGITS_TOLERANCE})"
        )
    return passed(
        f"flash_attn in all {len(backends)} layers ({shape}); float32 logits under bf16 within {error:.1e} "
        f"of float32 (tolerance {BF16_LOGITS_TOLERANCE})"
    )


def build(cfg, context, restore=None):
    """The trainer train.py builds for `cfg` on `context`; `restore` puts a checkpoint in."""
    return build_trainer(cfg, context, models.build_model(cfg["model"], seed=cfg["train"]["seed"]), restore)


def run_steps(trainer, micro_batch, steps):
    """`steps` optimizer steps on the same micro-batch; the losses and whether each step was finite."""
    losses, finite = [], []
    trainer.ddp_model.train()
    for step in range(steps):
        paddle.seed(step)
        outcome = trainer.train_step([micro_batch])
        losses.append(float(outcome["losses"]["objective"]))
        finite.append(not outcome["nonfinite"])
    return losses, finite


def one_micro_batch_per_step(cfg, amp, steps):
    """`cfg` with random weights, one micro-batch per step, `amp`, and a schedule `steps` long."""
    micro = cfg["train"]["micro_batch_size"]
    cfg = random_weights_config(cfg, amp=amp, global_batch_size=micro)
    cfg["schedule"].update(warmup_steps=min(cfg["schedule"]["warmup_steps"], steps // 6), total_steps=steps)
    return cfg


def check_bf16_steps(cfg):
    if bf16_unsupported():
        return failed(bf16_unsupported())
    cfg = one_micro_batch_per_step(cfg, "bf16", BF16_STEPS)
    trainer = build(cfg, distributed.Context(0, 1))
    micro_batch = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])
    losses, finite = run_steps(trainer, micro_batch, BF16_STEPS)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    summary = (
        f"{BF16_STEPS} steps of {cfg['train']['micro_batch_size']} images: loss {first:.3f} -> {last:.3f} (means of 5)"
    )
    if not all(finite) or not np.all(np.isfinite(losses)):
        return failed(
            f"{summary}; non-finite loss or gradients at steps {[i for i, ok in enumerate(finite) if not ok]}"
        )
    if not last < first:
        return failed(f"{summary}: the loss did not fall on a batch it sees every step")
    return passed(summary)


def check_fp16_resume(cfg):
    cfg = one_micro_batch_per_step(cfg, "fp16", 8)
    micro_batch = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])
    trainer = build(cfg, distributed.Context(0, 1))
    run_steps(trainer, micro_batch, 3)
    saved = trainer.scaler.state_dict()
    with tempfile.TemporaryDirectory() as output_dir:
        run_cfg = dict(cfg, train=dict(cfg["train"], output_dir=output_dir))
        path = RunState(run_cfg, step=3).save(trainer, stream_state={})
        resumed = build(cfg, distributed.Context(0, 1), RunState.load(path, run_cfg).restore)
    restored = resumed.scaler.state_dict()
    if not saved or restored.keys() != saved.keys():
        return failed(f"the loss scaler's state was {saved} when saved and {restored} after resuming")
    different = [key for key in saved if not np.array_equal(np.asarray(saved[key]), np.asarray(restored[key]))]
    if different:
        return failed(f"resumed loss scaler differs in {different}: saved {saved}, resumed {restored}")
    _, finite = run_steps(resumed, micro_batch, 1)
    scale = float(np.asarray(saved["scale"]).reshape(-1)[0])
    return passed(
        f"loss scale {scale:g} and counters (incr_count {saved['incr_count']}) restored; "
        f"the next step was {'finite' if finite[0] else 'skipped by the scaler (overflow)'}"
    )


# --- gradient accumulation across processes ----------------------------------------------------------

ACCUMULATION_IMAGES = 8
ACCUMULATION_STEPS = 4


def accumulation_config():
    """A small ViT without dropout, R-Drop on, no clipping: 8 images per step in micro-batches of 2."""
    overrides = [
        "model.name=vit",
        "model.img_size=32",
        "model.num_classes=10",
        "model.patch_size=8",
        "model.embed_dim=64",
        "model.depth=2",
        "model.num_heads=4",
        "model.mlp_dim=128",
        "model.dropout=0.0",
        "model.pretrained=null",
        "rdrop.alpha=0.3",
        "rdrop.kl_reduction=sum",
        "optimizer.name=momentum",
        "optimizer.lr=0.05",
        "optimizer.grad_clip=null",
        "schedule.warmup_steps=1",
        f"schedule.total_steps={ACCUMULATION_STEPS}",
        f"train.global_batch_size={ACCUMULATION_IMAGES}",
        "train.micro_batch_size=2",
    ]
    return config.validate(config.apply_overrides(config.defaults(), overrides), source="the accumulation check")


def accumulation_worker(output_dir):
    """Run under the launcher (or alone): the ranks train on disjoint quarters or halves of the same
    random 8 images per step; rank 0 writes the weights before and after to `output_dir`."""
    context = distributed.init()
    cfg = accumulation_config()
    trainer = build(cfg, context)
    initial = {name: value.numpy() for name, value in trainer.model.state_dict().items()}
    micro, per_rank = cfg["train"]["micro_batch_size"], ACCUMULATION_IMAGES // context.world_size
    trainer.ddp_model.train()
    for step in range(ACCUMULATION_STEPS):
        rng = np.random.default_rng(step)
        images = rng.standard_normal((ACCUMULATION_IMAGES, 3, 32, 32)).astype("float32")
        labels = rng.integers(0, 10, ACCUMULATION_IMAGES)
        mine = slice(context.rank * per_rank, (context.rank + 1) * per_rank)
        micro_batches = [
            (
                paddle.to_tensor(images[mine][start : start + micro]),
                paddle.to_tensor(labels[mine][start : start + micro]),
            )
            for start in range(0, per_rank, micro)
        ]
        trainer.train_step(micro_batches)
    if context.is_main:
        final = {name: value.numpy() for name, value in trainer.model.state_dict().items()}
        np.savez(os.path.join(output_dir, "initial.npz"), **initial)
        np.savez(os.path.join(output_dir, "final.npz"), **final)


def accumulation_command(output_dir, processes, gpu):
    """This script as an accumulation worker, on `processes` GPUs or CPU processes."""
    worker = [str(pathlib.Path(__file__).resolve()), "--accumulation-worker", output_dir]
    if processes == 1:
        return [sys.executable, *worker]
    devices = ["--devices", ",".join(map(str, range(processes)))] if gpu else ["--nproc_per_node", str(processes)]
    log_dir = ["--log_dir", os.path.join(output_dir, "logs")]
    return [sys.executable, "-m", "paddle.distributed.launch", *devices, *log_dir, *worker]


def compare_accumulation(single_dir, ranks_dir):
    initial = np.load(os.path.join(single_dir, "initial.npz"))
    single = np.load(os.path.join(single_dir, "final.npz"))
    ranks = np.load(os.path.join(ranks_dir, "final.npz"))
    moved = max(float(np.max(np.abs(single[name] - initial[name]))) for name in single.files)
    difference = max(float(np.max(np.abs(single[name] - ranks[name]))) for name in single.files)
    summary = (
        f"{ACCUMULATION_STEPS} steps, 2 processes x 2 micro-batches vs 1 x 4: weights differ by {difference:.2e}, "
        f"the updates moved them {moved:.2e} (tolerance {ACCUMULATION_TOLERANCE} of that)"
    )
    return passed(summary) if difference <= ACCUMULATION_TOLERANCE * moved else failed(summary)


def check_accumulation(gpu=True):
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for processes in (1, 2):
            runs[processes] = os.path.join(folder, f"{processes}_processes")
            os.makedirs(runs[processes])
            result = subprocess.run(
                accumulation_command(runs[processes], processes, gpu), capture_output=True, text=True, timeout=600
            )
            if result.returncode != 0:
                logs = pathlib.Path(runs[processes], "logs")
                output = result.stderr + "".join(path.read_text() for path in sorted(logs.glob("workerlog.*")))
                return failed(f"the {processes}-process run failed (exit code {result.returncode}): {output[-1500:]}")
        return compare_accumulation(runs[1], runs[2])


# --- speed --------------------------------------------------------------------------------------------


def check_speed(args, cfg):
    """scripts/benchmark.py's R-Drop step with and without train.recompute, each in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "benchmark.json")
        command = [sys.executable, str(BENCHMARK), "--config", args.config, "--modes", "rdrop", "--recompute"]
        command += [*(word for override in args.override for word in ("-o", override)), "--steps", "3"]
        result = subprocess.run([*command, "--warmup", "1", "--json", output], capture_output=True, text=True)
        if result.returncode != 0:
            return failed(f"scripts/benchmark.py failed (exit code {result.returncode}): {result.stderr[-1500:]}")
        with open(output, encoding="utf-8") as stream:
            measured = json.load(stream)
    peak = measured["peak_tflops"]
    parts = []
    for mode, row in measured["modes"].items():
        utilisation = f"{100 * row['utilisation']:.0f}% of {peak:g} TFLOP/s" if peak else "peak unknown"
        parts.append(
            f"{'with' if mode == 'rdrop_recompute' else 'without'} recompute {row['img_per_s']:.0f} img/s, "
            f"{row['peak_memory_bytes'] / 2**30:.1f} GiB, {utilisation}"
        )
    return passed(f"{measured['device']}, amp {cfg['train']['amp']}: " + "; ".join(parts))


# --- the table -------------------------------------------------------------------------------------------


def guarded(check, *arguments):
    """The check's result, or a FAIL naming the exception it raised."""
    try:
        return check(*arguments)
    except Exception as error:  # one broken check must not hide the others' results
        where = traceback.extract_tb(error.__traceback__)[-1]
        return failed(f"raised {type(error).__name__}: {error} ({os.path.basename(where.filename)}:{where.lineno})")


def run_checks(args, cfg):
    results = {"build": check_build()}
    gpus = paddle.device.cuda.device_count() if results["build"].status == "PASS" else 0
    no_gpu = "needs a GPU" + ("" if results["build"].status == "PASS" else " (see build)")
    if gpus:
        paddle.set_device("gpu:0")
        results["attention"] = guarded(check_attention, cfg)
        results["bf16 steps"] = guarded(check_bf16_steps, cfg)
        results["fp16 resume"] = guarded(check_fp16_resume, cfg)
    else:
        results["attention"] = skipped(
            f"{no_gpu}: autocast and flash attention do nothing on a CPU; tests/test_models.py checks that "
            f"the final norm and head leave autocast"
        )
        results["bf16 steps"] = skipped(f"{no_gpu}: bf16 autocast does nothing on a CPU")
        results["fp16 resume"] = skipped(
            f"{no_gpu}: Paddle disables the loss scaler on a CPU; tests/test_checkpoint.py resumes a GPU-shaped "
            f"scaler state"
        )
    if gpus >= 2:
        results["accumulation"] = guarded(check_accumulation)
    else:
        results["accumulation"] = skipped(
            f"needs 2 GPUs ({gpus} here); tests/test_train.py checks it on 2 CPU processes (gloo)"
        )
    results["speed"] = guarded(check_speed, args, cfg) if gpus else skipped(f"{no_gpu}: measures the GPU step")
    return results


def print_table(results):
    width = max(map(len, results))
    for name, (status, detail) in results.items():
        print(f"{name:{width}s}  {status:7s}  {detail}")
    failures = sum(result.status == "FAIL" for result in results.values())
    print(f"{failures} check(s) failed" if failures else "no check failed")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.accumulation_worker:
        accumulation_worker(args.accumulation_worker)
        return 0
    cfg = config.load(args.config, args.override)
    results = run_checks(args, cfg)
    print_table(results)
    return 1 if any(result.status == "FAIL" for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
