"""Speed and memory of the real training step and of evaluation on the current device, with random data.

    python scripts/benchmark.py --config configs/vit_b16_cifar100_rdrop.yaml --steps 20
    python scripts/benchmark.py --config configs/cpu_comparison.yaml --steps 5 --warmup 2 \
        --torch-reference scripts/torch_reference.py      # side by side with PyTorch (CPU)
    python scripts/benchmark.py --config CFG --recompute --json out.json   # + what recompute saves

The model, loss, optimizer, loss scaler, AMP and `train.to_static` settings are built from the config
by `rdrop.step.build_trainer`, the builder train.py uses, and every training step is a call of its
`TrainStep`, the step train.py runs. Random images and labels of the config's shape replace the data
(scripts/benchmark_input.py measures the input path), and `model.pretrained` is ignored: the weights
do not change the speed. One process on the current device (no launcher).

Modes, each measured in a fresh process so that its peak memory is its own (a process's peak RSS
cannot be reset, and Paddle's allocators keep freed blocks):

    rdrop            the training step with R-Drop at the config's rdrop.alpha
    plain            the same step without R-Drop (rdrop.alpha 0: one pass, cross-entropy only)
    eval             evaluation: a forward pass without gradients over eval.batch_size images
    rdrop_recompute  with --recompute: the R-Drop step with train.recompute on (the modes above
                     then run with it off, whatever the config says)

Reported per mode: img_per_s (distinct images per second; R-Drop sees each image twice and it is
counted once), step_time_s (mean seconds per optimizer step or evaluation batch), peak memory
(GPU: paddle.device.cuda.max_memory_allocated; CPU: peak RSS of the process), the analytic forward
FLOPs per image (models.forward_flops) and the achieved model FLOP/s: a training pass costs about
3x its forward (backward about 2x), so plain training counts 3x and R-Drop 6x forward FLOPs per
distinct image, evaluation 1x; recomputation's extra forward is not counted (model FLOPs, the MFU
convention). Utilisation is that rate over --peak-tflops, which defaults to the dense tensor-core
peak of known GPUs (16-bit with train.amp bf16/fp16, TF32 without) and to none on CPU.

--torch-reference PATH also times a PyTorch implementation of the same step (scripts/torch_reference.py,
or any script taking its arguments and printing its JSON line) with the config's model size, batch,
alpha and train.cpu_threads, R-Drop and plain, each right after the same Paddle mode, so both
frameworks see the same machine load. PyTorch is needed only for that, never by this repository:
`pip install torch==2.13.0` (a CPU build) to run it.

Prints a table, then one JSON object (also written to --json).
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys

from rdrop import atomic, benchmarking, config, distributed, runtime
from rdrop.errors import USER_ERROR_EXIT_CODE, UserError, exit_on_user_error
from rdrop.step import autocast, build_trainer

import paddle

import models

# Dense peak TFLOP/s by GPU name: (bf16/fp16 tensor cores with float32 accumulation, TF32 tensor
# cores), from NVIDIA's data sheets, which print the rates with structured sparsity, twice these:
# H100 and H200 (Hopper data sheets, SXM and PCIe/NVL), HGX B200 (per GPU: 36 PFLOP/s bf16 and
# 18 TF32 sparse over 8 GPUs), L40S and L40, A100, the Ada Lovelace architecture white paper for the
# GeForce RTX 4090, and the V100 data sheet (no bf16 and no TF32: its fp16 tensor-core and plain
# float32 rates). The first entry whose words all occur in the device name wins, so more specific
# names come first.
GPU_PEAK_TFLOPS = (
    (("H100", "PCIe"), (756.0, 378.0)),
    (("H100", "NVL"), (835.5, 417.5)),
    (("H100",), (989.0, 494.7)),
    (("H800",), (989.0, 494.7)),
    (("H200", "NVL"), (835.5, 417.5)),
    (("H200",), (989.5, 494.5)),
    (("B200",), (2250.0, 1125.0)),
    (("A100",), (312.0, 156.0)),
    (("A800",), (312.0, 156.0)),
    (("L40S",), (362.05, 183.0)),
    (("L40",), (181.05, 90.5)),
    (("RTX", "4090"), (165.2, 82.6)),
    (("V100S",), (130.0, 16.4)),
    (("V100", "PCIE"), (112.0, 14.0)),
    (("V100",), (125.0, 15.7)),
)

TRAIN_FLOPS_PER_FORWARD = {"rdrop": 6, "plain": 3, "rdrop_recompute": 6, "eval": 1}
MODES = ("rdrop", "plain", "eval")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, "YAML config (default: the config system's defaults, ViT-B/16 at 224 px)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (or evaluation batches) per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to measure")
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="also measure the R-Drop step with train.recompute on, for its memory saving",
    )
    parser.add_argument(
        "--torch-reference",
        metavar="PATH",
        help="also time this PyTorch reference script, e.g. scripts/torch_reference.py (R-Drop and plain), "
        "interleaved; needs pip install torch==2.13.0",
    )
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for the utilisation column")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument(
        "--only",
        choices=(*MODES, "rdrop_recompute"),
        help="measure this one mode in this process and print its JSON (used per mode)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def load_config(args):
    if args.config:
        return config.load(args.config, args.override)
    return config.validate(config.apply_overrides(config.defaults(), args.override), source="the default config")


def mode_config(cfg, mode, compare_recompute):
    cfg = copy.deepcopy(cfg)
    cfg["model"]["pretrained"] = None
    if mode == "plain":
        cfg["rdrop"]["alpha"] = 0.0
    elif mode in ("rdrop", "rdrop_recompute") and cfg["rdrop"]["alpha"] == 0:
        raise UserError(
            "The rdrop mode measures R-Drop but rdrop.alpha is 0 in the config; set -o rdrop.alpha=0.3 "
            "(or measure only the other modes with --modes plain eval)."
        )
    if compare_recompute:
        cfg["train"]["recompute"] = mode == "rdrop_recompute"
    return cfg


def peak_memory():
    """(bytes, what they measure) for this process so far."""
    if paddle.get_device().startswith("gpu"):
        return paddle.device.cuda.max_memory_allocated(), "max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "peak RSS"


def measure(cfg, mode, steps, warmup):
    """One mode in this process: the durations and peak memory, as a dict."""
    train_cfg = cfg["train"]
    threads = runtime.configure_cpu(train_cfg["cpu_threads"])
    model = models.build_model(cfg["model"], seed=train_cfg["seed"])
    trainer = build_trainer(cfg, distributed.init(), model)
    load_before = os.getloadavg()
    if mode == "eval":
        images, _ = benchmarking.random_batch(cfg, cfg["eval"]["batch_size"])
        trainer.ddp_model.eval()

        @paddle.no_grad()
        def run():
            with autocast(train_cfg["amp"]):
                trainer.ddp_model(images)

        images_per_step = cfg["eval"]["batch_size"]
    else:
        micro_batches = [benchmarking.random_batch(cfg, train_cfg["micro_batch_size"])] * trainer.accumulation
        trainer.ddp_model.train()

        def run():
            trainer.train_step(micro_batches)

        images_per_step = train_cfg["global_batch_size"]
    durations = benchmarking.time_calls(run, steps, warmup)
    memory, memory_measure = peak_memory()
    return {
        "mode": mode,
        "images_per_step": images_per_step,
        "step_times_s": durations,
        "peak_memory_bytes": memory,
        "memory_measure": memory_measure,
        "recompute": bool(train_cfg["recompute"]) and mode != "eval",
        "cpu_threads": threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def device_description():
    if paddle.get_device().startswith("gpu"):
        return paddle.device.cuda.get_device_name()
    return "cpu"


def default_peak_tflops(device_name, amp):
    for words, (half_precision, tf32) in GPU_PEAK_TFLOPS:
        if all(word.lower() in device_name.lower() for word in words):
            return half_precision if amp in ("bf16", "fp16") else tf32
    return None


def run_isolated(args, mode):
    """Measure `mode` in a child process running this script with --only; returns its dict."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--only",
        mode,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.config:
        command += ["--config", args.config]
    for override in args.override:
        command += ["-o", override]
    if args.recompute:
        command.append("--recompute")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == USER_ERROR_EXIT_CODE:
        raise UserError(result.stderr.strip().removeprefix("error:").strip())
    if result.returncode != 0:
        raise RuntimeError(f"measuring mode {mode} failed (exit code {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(cfg, measurement, peak_tflops):
    mode = measurement["mode"]
    durations = measurement["step_times_s"]
    step_time = statistics.fmean(durations)  # the mean, as the PyTorch reference reports
    img_per_s = measurement["images_per_step"] / step_time
    forward_flops = models.forward_flops(cfg["model"])
    achieved = TRAIN_FLOPS_PER_FORWARD[mode] * forward_flops * img_per_s
    return dict(
        measurement,
        step_time_s=step_time,
        step_time_min_s=min(durations),
        img_per_s=img_per_s,
        forward_flops_per_image=forward_flops,
        flops_per_image=TRAIN_FLOPS_PER_FORWARD[mode] * forward_flops,
        achieved_tflops=achieved / 1e12,
        utilisation=achieved / (peak_tflops * 1e12) if peak_tflops else None,
    )


def torch_reference_arguments(cfg, steps, warmup):
    """The reference script's arguments for the config's model, batch and threads (alpha added per mode)."""
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    if cfg["rdrop"]["kl_reduction"] != "sum" or train_cfg["global_batch_size"] != train_cfg["micro_batch_size"]:
        raise UserError(
            "--torch-reference compares one micro-batch with the KL summed over it, as the reference "
            "script computes: use rdrop.kl_reduction sum and equal train.global_batch_size and "
            "train.micro_batch_size (configs/cpu_comparison.yaml does)."
        )
    architecture = models.resolve_architecture(model_cfg)
    return dict(
        img_size=model_cfg["img_size"],
        patch=architecture.patch_size,
        dim=architecture.embed_dim,
        depth=architecture.depth,
        heads=architecture.num_heads,
        mlp=architecture.mlp_dim,
        classes=model_cfg["num_classes"],
        batch=train_cfg["micro_batch_size"],
        steps=steps,
        warmup=warmup,
        threads=train_cfg["cpu_threads"] or 0,
    )


def run_torch_reference(path, arguments, alpha):
    """The reference script's JSON line; alpha 0 is its plain step."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in dict(arguments, alpha=alpha).items()]
    result = subprocess.run([sys.executable, path, *options], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(
            f"The PyTorch reference {path} failed (exit code {result.returncode}); is torch installed? "
            f"Its last output: {result.stderr.strip()[-1000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(result):
    print(
        f"device {result['device']}, Paddle {result['paddle_version']}, amp {result['amp']}, "
        f"{'static program' if result['to_static'] else 'eager'}, peak {result['peak_tflops'] or '-'} TFLOP/s; "
        f"{result['steps']} timed steps after {result['warmup']} (s/step: mean; min beside it)"
    )
    print(
        f"{'mode':16s} {'img/s':>9s} {'s/step':>9s} {'min s':>8s} {'peak MiB':>9s} {'fwd GFLOP/img':>14s} "
        f"{'TFLOP/s':>9s} {'util':>7s} {'load avg':>9s}"
    )
    for mode, row in result["modes"].items():
        utilisation = f"{100 * row['utilisation']:6.1f}%" if row["utilisation"] is not None else "      -"
        load = f"{row['load_average_before'][0]:.1f}-{row['load_average_after'][0]:.1f}"
        print(
            f"{mode:16s} {row['img_per_s']:9.2f} {row['step_time_s']:9.3f} {row['step_time_min_s']:8.3f} "
            f"{row['peak_memory_bytes'] / 2**20:9.0f} {row['forward_flops_per_image'] / 1e9:14.3f} "
            f"{row['achieved_tflops']:9.4f} {utilisation} {load:>9s}"
        )
    for mode, row in result.get("torch_reference", {}).items():
        print(
            f"{'torch ' + mode:16s} {row['img_per_s']:9.2f} {row['step_time_s']:9.3f}   "
            f"(PyTorch {row['version']}, {row['threads']} threads)"
        )
    if result.get("rdrop_over_plain_step_time"):
        print(
            f"R-Drop step / plain step: {result['rdrop_over_plain_step_time']:.2f} "
            f"(the R-Drop step runs the model on twice the images)"
        )
    for mode, ratio in result.get("paddle_over_torch_img_per_s", {}).items():
        print(f"{mode}: img/s of this repository / of the PyTorch reference: {ratio:.2f}")
    if result.get("recompute_memory_saved_bytes") is not None:
        print(
            f"train.recompute saves {result['recompute_memory_saved_bytes'] / 2**20:.0f} MiB of peak memory "
            f"({100 * result['recompute_memory_saved_fraction']:.0f}%) and costs "
            f"{result['recompute_step_time_ratio']:.2f}x the step time"
        )


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.json:
        atomic.check_writable(args.json, "--json")
    cfg = load_config(args)
    if args.only:
        print(json.dumps(measure(mode_config(cfg, args.only, args.recompute), args.only, args.steps, args.warmup)))
        return
    modes = list(args.modes) + (["rdrop_recompute"] if args.recompute else [])
    for mode in modes:
        mode_config(cfg, mode, args.recompute)  # a config problem stops here, before any measurement
    device_name = device_description()
    peak_tflops = args.peak_tflops or default_peak_tflops(device_name, cfg["train"]["amp"])
    torch_alphas, torch_arguments = {}, None
    if args.torch_reference:
        torch_alphas = {"rdrop": cfg["rdrop"]["alpha"], "plain": 0.0}
        torch_arguments = torch_reference_arguments(cfg, args.steps, args.warmup)
    rows, torch_rows = {}, {}
    for mode in modes:
        rows[mode] = summarise(mode_config(cfg, mode, args.recompute), run_isolated(args, mode), peak_tflops)
        if mode in torch_alphas:
            torch_rows[mode] = run_torch_reference(args.torch_reference, torch_arguments, torch_alphas[mode])
    result = {
        "device": device_name,
        "paddle_version": paddle.__version__,
        "amp": cfg["train"]["amp"],
        "to_static": cfg["train"]["to_static"],
        "peak_tflops": peak_tflops,
        "steps": args.steps,
        "warmup": args.warmup,
        "config": cfg,
        "modes": rows,
    }
    if torch_rows:
        result["torch_reference"] = torch_rows
        result["paddle_over_torch_img_per_s"] = {
            mode: rows[mode]["img_per_s"] / row["img_per_s"] for mode, row in torch_rows.items()
        }
    if "rdrop" in rows and "plain" in rows:
        result["rdrop_over_plain_step_time"] = rows["rdrop"]["step_time_s"] / rows["plain"]["step_time_s"]
    if "rdrop" in rows and "rdrop_recompute" in rows:
        without, with_recompute = rows["rdrop"], rows["rdrop_recompute"]
        saved = without["peak_memory_bytes"] - with_recompute["peak_memory_bytes"]
        result["recompute_memory_saved_bytes"] = saved
        result["recompute_memory_saved_fraction"] = saved / without["peak_memory_bytes"]
        result["recompute_step_time_ratio"] = with_recompute["step_time_s"] / without["step_time_s"]
    print_table(result)
    print(json.dumps(result))
    if args.json:
        try:
            atomic.write_json(args.json, result)
        except OSError as error:
            raise atomic.write_error("the result to --json", args.json, error) from None


if __name__ == "__main__":
    main()
