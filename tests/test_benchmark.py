"""scripts/benchmark.py end to end on a tiny model: its JSON is consistent with its own timings, it
runs the comparison script with the config's sizes, and it refuses what it cannot measure."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from run_helpers import ROOT as ROOT_PATH
from run_helpers import load_script
from vit_reference import TINY_MODEL

ROOT = pathlib.Path(ROOT_PATH)

TINY = {
    "model": TINY_MODEL,
    "rdrop": {"alpha": 0.3, "kl_reduction": "sum"},
    "optimizer": {"name": "momentum", "lr": 0.01, "grad_clip": 1.0},
    "train": {"global_batch_size": 4, "micro_batch_size": 4, "cpu_threads": 1},
    "eval": {"batch_size": 4},
}

# Stands in for the PyTorch reference: echoes its arguments with a fixed step time.
FAKE_REFERENCE = """
import json, sys
arguments = dict(argument[2:].split("=", 1) for argument in sys.argv[1:])
print(json.dumps({"framework": "fake", "version": "0", "threads": int(arguments["threads"]),
                  "img_per_s": int(arguments["batch"]) / 2.0, "step_time_s": 2.0, "arguments": arguments}))
"""


def run_benchmark(tmp_path, *arguments, config=TINY):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        str(path),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(tmp_path / "out.json"),
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_benchmark_reports_consistent_numbers_and_runs_the_reference_with_the_config(tmp_path):
    reference = tmp_path / "fake_reference.py"
    reference.write_text(FAKE_REFERENCE)
    completed = run_benchmark(tmp_path, "--recompute", "--torch-reference", str(reference))
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["modes"]) == {"rdrop", "plain", "eval", "rdrop_recompute"}
    for row in result["modes"].values():
        assert len(row["step_times_s"]) == 2
        assert row["step_time_s"] == pytest.approx(sum(row["step_times_s"]) / 2)
        assert row["img_per_s"] == pytest.approx(4 / row["step_time_s"])  # 4 distinct images per step or batch
        assert row["peak_memory_bytes"] > 0
    rows = result["modes"]
    assert result["rdrop_over_plain_step_time"] == pytest.approx(
        rows["rdrop"]["step_time_s"] / rows["plain"]["step_time_s"]
    )
    assert (
        rows["rdrop"]["flops_per_image"] == 2 * rows["plain"]["flops_per_image"] == 6 * rows["eval"]["flops_per_image"]
    )
    assert result["recompute_memory_saved_bytes"] == (
        rows["rdrop"]["peak_memory_bytes"] - rows["rdrop_recompute"]["peak_memory_bytes"]
    )

    torch_rows = result["torch_reference"]
    expected = {
        "img-size": str(TINY_MODEL["img_size"]),
        "patch": str(TINY_MODEL["patch_size"]),
        "dim": str(TINY_MODEL["embed_dim"]),
        "depth": str(TINY_MODEL["depth"]),
        "heads": str(TINY_MODEL["num_heads"]),
        "mlp": str(TINY_MODEL["mlp_dim"]),
        "classes": str(TINY_MODEL["num_classes"]),
        "batch": "4",
        "steps": "2",
        "warmup": "1",
        "threads": "1",
    }
    for mode, alpha in (("rdrop", 0.3), ("plain", 0.0)):
        assert torch_rows[mode]["arguments"] == dict(expected, alpha=str(alpha))
        assert result["paddle_over_torch_img_per_s"][mode] == pytest.approx(rows[mode]["img_per_s"] / 2.0)


def test_benchmark_refuses_rdrop_modes_without_rdrop(tmp_path):
    config = {**TINY, "rdrop": {"alpha": 0.0}}
    completed = run_benchmark(tmp_path, config=config)
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and "rdrop.alpha" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_benchmark_refuses_a_reference_comparison_it_cannot_match(tmp_path):
    config = {**TINY, "train": {**TINY["train"], "global_batch_size": 8}}
    completed = run_benchmark(tmp_path, "--torch-reference", "unused.py", config=config)
    assert completed.returncode == 2
    assert "micro_batch_size" in completed.stderr and "Traceback" not in completed.stderr


def test_every_gpu_in_the_peak_table_is_reachable_by_its_own_name():
    """An entry whose name an earlier, less specific entry also matches would never be used."""
    benchmark = load_script("benchmark")
    for words, (half_precision, tf32) in benchmark.GPU_PEAK_TFLOPS:
        name = "NVIDIA " + " ".join(words) + " 80GB"
        assert benchmark.default_peak_tflops(name, "bf16") == half_precision, name
        assert benchmark.default_peak_tflops(name, "none") == tf32, name
    assert benchmark.default_peak_tflops("cpu", "bf16") is None


def test_input_benchmark_on_jpegs_reports_every_rate_and_leaves_no_files(tmp_path):
    """scripts/benchmark_input.py --jpeg on a handful of generated JPEGs: every rate is a positive
    number, the loader rows are the worker counts asked for, and its temporary folder is gone."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark_input.py"),
        "--jpeg",
        "--images",
        "8",
        "--repeats",
        "1",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "1",
        "--loader-batches",
        "2",
        "--json",
        str(tmp_path / "out.json"),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(scratch)}
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == result
    assert (result["images"], result["img_size"], result["batch_size"]) == (8, 32, 4)
    assert result["jpeg_size"] == [500, 375] and result["jpeg_quality"] == 90
    assert 10_000 < result["jpeg_mean_bytes"] < 500 * 375 * 3  # compressed, but not a flat image
    assert result["target_img_per_s_per_worker"] == 150
    rates = [rate for row in result["per_worker"].values() for rate in row.values()]
    assert len(rates) == 8 and all(math.isfinite(rate) and rate > 0 for rate in rates)
    assert set(result["loader"]) == {"0", "1"}
    for workers, row in result["loader"].items():
        assert row["img_per_s"] > 0
        assert row["img_per_s_per_worker"] == pytest.approx(row["img_per_s"] / max(int(workers), 1))
    assert list(scratch.iterdir()) == []
