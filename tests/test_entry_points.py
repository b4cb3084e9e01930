"""The entry points as installed commands: each runs from any folder (here one outside the repository),
and a script whose optional package is missing says which one and how to install it, in one line, and
exits with 2 instead of a traceback (a None in sys.modules makes the package's import fail)."""

import os
import subprocess
import sys

import pytest
from run_helpers import ROOT

ENTRY_POINTS = ["train.py", "eval.py"] + [
    os.path.join("scripts", name) for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))) if name.endswith(".py")
]
WITHOUT = (
    "import runpy, sys; sys.modules[{package!r}] = None; sys.argv = {argv!r}; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_without(package, script, *args, cwd):
    argv = [os.path.join(ROOT, "scripts", script), *map(str, args)]
    command = [sys.executable, "-c", WITHOUT.format(package=package, argv=argv)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line_naming(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("entry_point", [name for name in ENTRY_POINTS if name != "scripts/torch_reference.py"])
def test_every_entry_point_runs_from_another_folder(tmp_path, entry_point):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, entry_point), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


def test_torch_reference_help_without_torch(tmp_path):
    assert_one_line_naming(run_without("torch", "torch_reference.py", "--help", cwd=tmp_path), "torch", "pip install")


@pytest.mark.parametrize("script", ["plot_curves.py", "compare.py"])
def test_plot_scripts_without_matplotlib(tmp_path, script):
    result = run_without("matplotlib", script, "--help", cwd=tmp_path)
    assert_one_line_naming(result, script, "'matplotlib'", "requirements.txt")


def test_onnx_export_without_paddle2onnx(tmp_path):
    args = ["--checkpoint", tmp_path / "run" / "best.pdparams", "--output", tmp_path / "exported", "--onnx"]
    result = run_without("paddle2onnx", "export.py", *args, cwd=tmp_path)
    assert_one_line_naming(result, "--onnx", "paddle2onnx", "requirements/export.txt")
    assert not (tmp_path / "exported").exists()


def test_onnx_predict_without_onnxruntime(tmp_path):
    result = run_without("onnxruntime", "predict.py", "--model", tmp_path, "--runtime", "onnx", "x.png", cwd=tmp_path)
    assert_one_line_naming(result, "--runtime onnx", "onnxruntime", "requirements/export.txt")
