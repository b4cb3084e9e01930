"""Commands as the README writes them: -c for --config, --help that points to the key reference,
and the quickstart config on one or two processes."""

import os
import subprocess
import sys

from rdrop import config
from rdrop.step import accumulation_steps

import pytest
from run_helpers import ROOT, launch_command, load_script

import data
import eval as eval_script
import train


@pytest.mark.parametrize(
    "parse_args, required",
    [
        (train.parse_args, []),
        (eval_script.parse_args, ["--checkpoint", "w.pdparams"]),
        (load_script("benchmark").parse_args, []),
        (load_script("export").parse_args, ["--checkpoint", "w.pdparams", "--output", "out"]),
        (load_script("gpu_check").parse_args, []),
        (load_script("compare").parse_args, ["--output-dir", "out"]),
    ],
    ids=["train", "eval", "benchmark", "export", "gpu_check", "compare"],
)
def test_dash_c_is_accepted_as_config(parse_args, required):
    assert parse_args(["-c", "configs/quickstart.yaml"] + required).config == "configs/quickstart.yaml"


def test_help_lists_the_config_sections_and_where_keys_are_documented():
    help_text = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "docs/configuration.md" in help_text
    for section in config.SCHEMA:
        assert section in help_text
    assert os.path.isfile(os.path.join(ROOT, "docs", "configuration.md"))


def test_config_module_help_is_help_not_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "rdrop.config", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("usage:") and "| key |" not in result.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_quickstart_batches_divide_on_one_and_two_processes(processes):
    cfg = config.load(os.path.join(ROOT, "configs", "quickstart.yaml"))
    train_cfg = cfg["train"]
    accumulation = accumulation_steps(train_cfg, processes)
    assert accumulation * train_cfg["micro_batch_size"] * processes == train_cfg["global_batch_size"]
    for rank in range(processes):
        stream = data.TrainStream(cfg, rank, processes)
        images, labels = next(stream)
        assert images.shape[0] == labels.shape[0] == train_cfg["micro_batch_size"]
        stream.close()


@pytest.mark.slow
def test_a_batch_size_error_under_the_launcher_is_the_last_thing_the_worker_said(tmp_path):
    command = launch_command(
        ["-c", "configs/quickstart.yaml", "-o", "train.micro_batch_size=48", "-o", f"train.output_dir={tmp_path}/run"],
        tmp_path / "logs",
    )
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    console = result.stdout  # as a terminal interleaves the launcher's and the workers' streams
    paragraph = (
        "error: train.global_batch_size (64) must be a multiple of train.micro_batch_size x devices (48 x 2 = 96)"
    )
    assert result.returncode != 0
    # The launcher ends with the failed worker's last lines: the paragraph, and nothing of fleet's set-up.
    failed_worker_detail = console.split("ERROR LOG DETAIL")[-1]
    assert paragraph in failed_worker_detail
    assert "HybridParallelInfo" not in failed_worker_detail and "Traceback" not in console
