"""scripts/gpu_check.py: the command as the README writes it on a CPU machine, and the GPU checks
given the state a GPU would give them (an enabled loss scaler, several ranks, a GPU build)."""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

from rdrop import config
from rdrop.step import TrainStep

import numpy as np
import paddle
import paddle.amp.grad_scaler
import pytest
from run_helpers import ROOT, load_script, tiny_config

import data
import data.loader

gpu_check = load_script("gpu_check")

README_COMMAND = "python scripts/gpu_check.py"
ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<status>PASS|FAIL|SKIPPED)\s+(?P<detail>.+)$")


def small_config(dropout=0.1):
    cfg = gpu_check.accumulation_config()
    cfg["model"]["dropout"] = dropout
    return cfg


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="the report of a machine without a GPU")
def test_the_readme_command_runs_on_a_cpu_and_says_what_it_skipped():
    readme = open(os.path.join(ROOT, "README.md")).read()
    gpu_section = readme[readme.index("## Reproducing the paper on GPUs") :]
    assert README_COMMAND in gpu_section.split("\n1.")[0]  # before the first step
    result = subprocess.run(
        [sys.executable, *README_COMMAND.split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == gpu_check.NOTHING_CHECKED == 3, result.stdout + result.stderr
    rows = {match["name"]: match for match in map(ROW.match, result.stdout.splitlines()) if match}
    assert set(rows) == {"build", "attention", "bf16 step", "fp16 resume", "accumulation", "speed"}
    assert {row["status"] for row in rows.values()} == {"SKIPPED"}
    assert "the CPU build, on a machine without NVIDIA GPUs" in rows["build"]["detail"]
    for name in ("attention", "bf16 step", "fp16 resume", "speed"):
        assert rows[name]["detail"].startswith("needs a GPU"), name
    assert rows["accumulation"]["detail"].startswith("needs 2 GPUs (0 here)")
    assert result.stdout.splitlines()[-1] == "nothing was checked: all 6 rows were skipped (exit code 3, not a pass)"


@pytest.mark.parametrize(
    "statuses, code, closing",
    [
        (["SKIPPED", "SKIPPED"], 3, "nothing was checked"),
        (["PASS", "SKIPPED"], 0, "no check failed (1 skipped)"),
        (["PASS", "PASS"], 0, "no check failed"),
        (["FAIL", "SKIPPED"], 1, "1 check(s) failed"),
    ],
)
def test_the_closing_line_and_exit_code(capsys, statuses, code, closing):
    results = {f"row {index}": gpu_check.Result(status, "why") for index, status in enumerate(statuses)}
    gpu_check.print_table(results)
    assert capsys.readouterr().out.splitlines()[-1].startswith(closing)
    assert gpu_check.exit_code(results) == code


@pytest.mark.parametrize(
    "packages, cuda_build, gpus_on_machine, devices, status, words",
    [
        ({"paddlepaddle": "3.3.1", "paddlepaddle-gpu": "3.3.1"}, True, True, ["H100"], "FAIL", "both"),
        ({"paddlepaddle": "3.3.1"}, False, True, [], "FAIL", "CPU build but this machine has NVIDIA GPUs"),
        ({"paddlepaddle": "3.3.1"}, False, False, [], "SKIPPED", "the CPU build"),
        ({"paddlepaddle-gpu": "3.3.1"}, True, True, [], "FAIL", "sees no GPU"),
        ({"paddlepaddle-gpu": "3.3.1"}, True, True, ["NVIDIA H200", "NVIDIA H200"], "PASS", "2 GPU(s): NVIDIA H200"),
    ],
)
def test_the_build_verdict(packages, cuda_build, gpus_on_machine, devices, status, words):
    result = gpu_check.build_result(packages, cuda_build, gpus_on_machine, devices, "12.6", "9.5.0")
    assert result.status == status and words in result.detail


def sdpa_model(cfg=None):
    cfg = cfg or small_config()
    cfg["model"]["cpu_kernels"] = False  # Paddle's SDPA, which picks the math kernel on a CPU
    return gpu_check.models.build_model(cfg["model"]), cfg["model"]["depth"]


def test_attention_kernels_are_read_from_paddles_own_dispatch():
    model, depth = sdpa_model()
    backends, logits = gpu_check.attention_backends(lambda: model(paddle.randn([2, 3, 32, 32])))
    assert backends == ["math"] * depth and logits.shape == [2, 10]


def test_attention_kernels_are_read_after_sdpa_ran_and_the_logger_is_left_as_it_was(capfd):
    """An SDPA call before the check caches that the logger does not emit debug records: the check
    still records every layer, and afterwards SDPA prints no debug line."""
    model, depth = sdpa_model()
    images = paddle.randn([2, 3, 32, 32])
    logger = logging.getLogger("paddle.nn.functional.sdpa")
    before = logger.level, logger.propagate, list(logger.handlers)
    model(images)
    backends, _ = gpu_check.attention_backends(lambda: model(images))
    assert backends == ["math"] * depth
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert not logger.isEnabledFor(logging.DEBUG)
    capfd.readouterr()
    model(images)
    printed = capfd.readouterr()
    assert "Selected backend" not in printed.out + printed.err


def test_attention_that_is_not_flash_fails(monkeypatch):
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *args: True)
    result = gpu_check.check_attention(small_config())
    assert result.status == "FAIL" and "not flash_attn" in result.detail


def test_bf16_step_passes_when_its_gradients_are_the_float32_ones(monkeypatch):
    """On a CPU bf16 autocast does nothing, so the two gradients are equal: every block is compared."""
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *args: True)
    result = gpu_check.check_bf16_step(small_config())
    assert result.status == "PASS", result.detail
    assert "over 5 blocks" in result.detail  # embedding, block 0, block 1, norm, head


def bf16_gradients_changed(monkeypatch, change):
    """check_bf16_step with `change(name, gradient)` applied to the bf16 step's gradients only."""
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *args: True)
    real_step_gradients = gpu_check.step_gradients

    def changed_step_gradients(model, micro_batch, cfg, amp):
        gradients = real_step_gradients(model, micro_batch, cfg, amp)
        if amp == "bf16":
            gradients = {name: change(name, gradient) for name, gradient in gradients.items()}
        return gradients

    monkeypatch.setattr(gpu_check, "step_gradients", changed_step_gradients)
    return gpu_check.check_bf16_step(small_config())


def test_bf16_step_fails_when_every_gradient_but_the_heads_is_zero(monkeypatch):
    result = bf16_gradients_changed(monkeypatch, lambda name, g: g if name.startswith("head.") else 0 * g)
    assert result.status == "FAIL"
    for group in ("embedding", "block 0", "block 1", "norm"):
        assert f"{group} 1" in result.detail, group  # a zeroed gradient errs by exactly its norm
    assert "head" not in result.detail.split("beyond the tolerance")[1]


def test_bf16_step_fails_on_one_wrong_block_and_names_it(monkeypatch):
    rng = np.random.default_rng(0)

    def wrong_block_1(name, gradient):
        if not name.startswith("blocks.1."):
            return gradient
        return gradient + 0.3 * np.linalg.norm(gradient) * rng.standard_normal(gradient.shape) / np.sqrt(gradient.size)

    result = bf16_gradients_changed(monkeypatch, wrong_block_1)
    assert result.status == "FAIL"
    assert result.detail.split("beyond the tolerance 0.1: ")[1].startswith("block 1 0.3")


def test_bf16_step_fails_on_a_nonfinite_gradient(monkeypatch):
    result = bf16_gradients_changed(monkeypatch, lambda name, g: g * np.inf if name == "norm.weight" else g)
    assert result.status == "FAIL" and "non-finite bf16 gradients in ['norm']" in result.detail


def test_bf16_gradient_comparison_allows_rounding_below_the_tolerance():
    rng = np.random.default_rng(1)
    reference = {"blocks.0.w": rng.standard_normal(1000), "head.weight": rng.standard_normal(10)}
    rounded = {name: value * (1 + 0.02 * rng.standard_normal(value.shape)) for name, value in reference.items()}
    assert gpu_check.compare_gradients(rounded, reference).status == "PASS"
    assert gpu_check.compare_gradients({"head.weight": reference["head.weight"]}, reference).status == "FAIL"


class _GpuPlace:
    def is_gpu_place(self):
        return True


def test_fp16_run_resumes_with_its_loss_scale(monkeypatch):
    """GradScaler enables itself only where the tracer's place is a GPU: give it one, and the scaler
    scales, unscales and saves its state (the scale as a float32 array) as on a GPU."""
    monkeypatch.setattr(
        paddle.amp.grad_scaler, "_dygraph_tracer", lambda: type("Tracer", (), {"_expected_place": _GpuPlace()})
    )
    result = gpu_check.check_fp16_resume(small_config())
    assert result.status == "PASS", result.detail
    assert "loss scale 32768" in result.detail and "incr_count 3" in result.detail


def write_weights(folder, collectives=None, **arrays):
    os.makedirs(folder, exist_ok=True)
    for name, values in arrays.items():
        np.savez(os.path.join(folder, f"{name}.npz"), w=np.asarray(values, dtype="float32"))
    steps = [{"gradient rounds": 1, "other all-reduces": 1}] * gpu_check.ACCUMULATION_STEPS
    with open(os.path.join(folder, gpu_check.COLLECTIVES_FILE), "w") as stream:
        json.dump(collectives or steps, stream)


def test_accumulation_comparison_fails_on_an_update_of_the_wrong_size(tmp_path):
    write_weights(tmp_path / "1", initial=[0.0, 1.0], final=[0.1, 0.9])
    write_weights(tmp_path / "right", final=[0.1 + 1e-6, 0.9])
    write_weights(tmp_path / "twice", final=[0.2, 0.8])
    assert gpu_check.compare_accumulation(str(tmp_path / "1"), str(tmp_path / "right")).status == "PASS"
    assert gpu_check.compare_accumulation(str(tmp_path / "1"), str(tmp_path / "twice")).status == "FAIL"


@pytest.mark.parametrize(
    "counts, words",
    [
        ({"gradient rounds": 2, "other all-reduces": 1}, "step 2: 2 gradient rounds, 1 other all-reduces"),
        ({"gradient rounds": 1, "other all-reduces": 2}, "step 2: 1 gradient rounds, 2 other all-reduces"),
        ({"gradient rounds": 0, "other all-reduces": 1}, "step 2: 0 gradient rounds"),
    ],
)
def test_accumulation_comparison_fails_on_a_step_with_other_collectives(tmp_path, counts, words):
    write_weights(tmp_path / "1", initial=[0.0, 1.0], final=[0.1, 0.9])
    steps = [{"gradient rounds": 1, "other all-reduces": 1}] * gpu_check.ACCUMULATION_STEPS
    write_weights(tmp_path / "ranks", collectives=[steps[0], counts, *steps[2:]], final=[0.1, 0.9])
    result = gpu_check.compare_accumulation(str(tmp_path / "1"), str(tmp_path / "ranks"))
    assert result.status == "FAIL" and words in result.detail


@pytest.mark.slow
def test_accumulation_check_passes_on_two_cpu_processes():
    result = gpu_check.check_accumulation(gpu=False)
    assert result.status == "PASS", result.detail
    assert "each step all-reduced the gradients once and the finite/stop flag once" in result.detail


INJECTED_FAULTS = {
    "no_sync removed": "rdrop.distributed.no_sync = lambda model, context: contextlib.nullcontext()",
    "an extra all-reduce": textwrap.dedent("""
        norm = rdrop.optim.global_grad_norm
        def all_reduced_norm(parameters):
            value = norm(parameters)
            paddle.distributed.all_reduce(value)
            return value
        rdrop.optim.global_grad_norm = all_reduced_norm
    """),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault, words", [("no_sync removed", "2 gradient rounds"), ("an extra all-reduce", "2 other")])
def test_accumulation_check_fails_on_two_cpu_processes_with_the_fault_injected(tmp_path, monkeypatch, fault, words):
    """The 2-process worker runs with the fault planted before gpu_check's worker starts."""
    worker = tmp_path / "faulty_worker.py"
    worker.write_text(
        "import contextlib, sys\nimport paddle, rdrop.distributed, rdrop.optim\n"
        + INJECTED_FAULTS[fault]
        + f"\nsys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})\nimport gpu_check\n"
        + "sys.exit(gpu_check.main(['--accumulation-worker', sys.argv[1]]))\n"
    )
    real_command = gpu_check.accumulation_command

    def faulty_command(output_dir, processes, gpu):
        command = real_command(output_dir, processes, gpu)
        if processes == 2:
            script = command.index(str(pathlib.Path(gpu_check.__file__).resolve()))
            command[script : script + 2] = [str(worker)]
        return command

    monkeypatch.setattr(gpu_check, "accumulation_command", faulty_command)
    result = gpu_check.check_accumulation(gpu=False)
    assert result.status == "FAIL" and words in result.detail, result.detail


def speed_config(tmp_path, archive):
    """16 images per step in micro-batches of 2: on 2 devices, each takes 8 in 4 micro-batches."""
    path = tiny_config(
        tmp_path, archive, data={"device_augment": True}, train={"global_batch_size": 16, "micro_batch_size": 2}
    )
    return config.load(path)


def test_speed_is_measured_at_the_launchs_world_size_through_the_training_stream(tmp_path, archive, monkeypatch):
    drawn, crops, next_batch, crop = [], [], data.TrainStream.__next__, data.loader.resized_crop_batch

    def counted_next(stream):
        drawn.append(stream)
        return next_batch(stream)

    def counted_crop(*args):
        crops.append(args)
        return crop(*args)

    monkeypatch.setattr(data.TrainStream, "__next__", counted_next)
    monkeypatch.setattr(data.loader, "resized_crop_batch", counted_crop)
    cfg = speed_config(tmp_path, archive)
    result = gpu_check.check_speed(cfg, world_size=2, peak_tflops=1e-12, steps=2, warmup=1)
    assert result.status == "PASS", result.detail  # the floor of a 1e-12 TFLOP/s device is ~0 img/s
    assert "2 device(s) x 4 micro-batch(es) of 2 per step, through the training loader and the crop" in result.detail
    assert len(drawn) == len(crops) == (2 + 1) * 16 // (2 * 2)  # (steps + warmup) x micro-batches per step


def test_speed_below_the_floor_fails(tmp_path, archive, monkeypatch):
    """Every step made to last at least a second: at most 8 images/s per device, under a floor of 9."""
    real_call = TrainStep.__call__

    def slow_call(self, *args, **kwargs):
        time.sleep(1.0)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", slow_call)
    cfg = speed_config(tmp_path, archive)
    passes = 6  # R-Drop (rdrop.alpha > 0): 6 forward passes per distinct image
    peak_tflops = (
        9.0 * passes * gpu_check.models.forward_flops(cfg["model"]) / (gpu_check.SPEED_FLOOR_UTILISATION * 1e12)
    )
    result = gpu_check.check_speed(cfg, world_size=2, peak_tflops=peak_tflops, steps=2, warmup=0)
    assert result.status == "FAIL" and "floor 9 img/s" in result.detail, result.detail


def test_speed_without_a_known_peak_measures_but_has_no_floor(tmp_path, archive):
    result = gpu_check.check_speed(speed_config(tmp_path, archive), world_size=1, peak_tflops=None, steps=1, warmup=0)
    assert result.status == "SKIPPED" and "no floor" in result.detail
    assert "1 device(s) x 8 micro-batch(es) of 2" in result.detail
