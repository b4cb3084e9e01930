"""scripts/gpu_check.py: the command as the README writes it on a CPU machine, and the GPU checks
given the state a GPU would give them (an enabled loss scaler, several ranks, a GPU build)."""

import os
import re
import subprocess
import sys

import numpy as np
import paddle
import paddle.amp.grad_scaler
import pytest
from run_helpers import ROOT, load_script

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
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {match["name"]: match for match in map(ROW.match, result.stdout.splitlines()) if match}
    assert set(rows) == {"build", "attention", "bf16 steps", "fp16 resume", "accumulation", "speed"}
    assert {row["status"] for row in rows.values()} == {"SKIPPED"}
    assert "the CPU build, on a machine without NVIDIA GPUs" in rows["build"]["detail"]
    for name in ("attention", "bf16 steps", "fp16 resume", "speed"):
        assert rows[name]["detail"].startswith("needs a GPU"), name
    assert rows["accumulation"]["detail"].startswith("needs 2 GPUs (0 here)")
    assert "no check failed" in result.stdout


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


def test_attention_kernels_are_read_from_paddles_own_dispatch():
    cfg = small_config()
    cfg["model"]["cpu_kernels"] = False  # Paddle's SDPA, which picks the math kernel on a CPU
    model = gpu_check.models.build_model(cfg["model"])
    backends, logits = gpu_check.attention_backends(lambda: model(paddle.randn([2, 3, 32, 32])))
    assert backends == ["math"] * cfg["model"]["depth"] and logits.shape == [2, 10]


def test_attention_that_is_not_flash_fails(monkeypatch):
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *args: True)
    result = gpu_check.check_attention(small_config())
    assert result.status == "FAIL" and "not flash_attn" in result.detail


def test_bf16_steps_report_a_falling_loss(monkeypatch):
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *args: True)
    result = gpu_check.check_bf16_steps(small_config())
    assert result.status == "PASS", result.detail
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) ", result.detail).groups())
    assert last < first


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


def write_weights(folder, **arrays):
    os.makedirs(folder, exist_ok=True)
    for name, values in arrays.items():
        np.savez(os.path.join(folder, f"{name}.npz"), w=np.asarray(values, dtype="float32"))


def test_accumulation_comparison_fails_on_an_update_of_the_wrong_size(tmp_path):
    write_weights(tmp_path / "1", initial=[0.0, 1.0], final=[0.1, 0.9])
    write_weights(tmp_path / "right", final=[0.1 + 1e-6, 0.9])
    write_weights(tmp_path / "twice", final=[0.2, 0.8])
    assert gpu_check.compare_accumulation(str(tmp_path / "1"), str(tmp_path / "right")).status == "PASS"
    assert gpu_check.compare_accumulation(str(tmp_path / "1"), str(tmp_path / "twice")).status == "FAIL"


@pytest.mark.slow
def test_accumulation_check_passes_on_two_cpu_processes():
    result = gpu_check.check_accumulation(gpu=False)
    assert result.status == "PASS", result.detail
