"""Helpers for the tests that run train.py and eval.py: tiny configs, launching, comparing weights."""

import importlib.util
import os
import subprocess
import sys

from rdrop import checkpoint

import numpy as np
import paddle
import yaml
from vit_reference import TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    """scripts/<name>.py as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path, archive, name="run", **sections):
    """A config file for a few steps of the tiny model on `archive`; `sections` update its sections."""
    cfg = {
        "model": dict(TINY_MODEL, num_classes=100),  # the archive's labels span CIFAR-100's classes
        "rdrop": {"alpha": 0.3, "kl_reduction": "sum"},
        "data": {"dataset": "cifar100", "data_file": str(archive), "download": False, "num_workers": 0},
        "optimizer": {"name": "momentum", "lr": 0.05, "grad_clip": 1.0},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 2, "total_steps": 6},
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "eval_every": 3,
            "save_every": 3,
            "log_every": 2,
            "output_dir": str(tmp_path / name),
            "cpu_threads": 1,
        },
        "eval": {"batch_size": 16},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def final_weights(output_dir):
    step, path = checkpoint.list_checkpoints(str(output_dir))[-1]
    return step, {name: value.numpy() for name, value in paddle.load(os.path.join(path, "model.pdparams")).items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def launch_command(args, log_dir, processes=2, script="train.py"):
    return [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        str(processes),
        "--log_dir",
        str(log_dir),
        script,
    ] + args


def launch(args, log_dir, processes=2, script="train.py", timeout=600):
    """Run `script` under Paddle's launcher on CPU processes and wait for it."""
    return subprocess.run(
        launch_command(args, log_dir, processes, script), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
