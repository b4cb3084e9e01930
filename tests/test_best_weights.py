"""The best weights are written by rank 0 in the background (rdrop/background_write.py): the
evaluation returns before the write ends, the file holds the weights of the evaluated step, and a
write that fails or is killed half-way leaves the previous best complete and loadable."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import types

from rdrop import checkpoint, config, distributed, evaluation
from rdrop.errors import UserError

import numpy as np
import paddle
import pytest
from run_helpers import ROOT, tiny_config
from vit_reference import TINY_MODEL

import models
import train


class _NoScalars:
    def scalars(self, *args):
        pass


def selection_setup(tmp_path):
    cfg = config.validate(
        {"model": dict(TINY_MODEL), "data": {"val_size": 8}, "train": {"output_dir": str(tmp_path / "run")}}
    )
    model = models.build_model(cfg["model"], seed=0)
    paddle.nn.initializer.Normal(std=1.0)(model.head.weight)  # the zero head would score every class alike
    rng = np.random.default_rng(0)
    loader = [
        (
            paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")),
            paddle.to_tensor(rng.integers(0, 10, 4)),
        )
    ]
    selection = evaluation.Selection(cfg, distributed.Context(0, 1), loader)
    trainer = types.SimpleNamespace(model=model, ddp_model=model)
    return selection, trainer, types.SimpleNamespace(step=1, best=None), tmp_path / "run"


def weights_of(model):
    return {name: value.numpy() for name, value in model.state_dict().items()}


def best_on_disk(folder):
    weights = {name: value.numpy() for name, value in paddle.load(str(folder / "best.pdparams")).items()}
    return weights, json.loads((folder / "best.json").read_text())


def test_the_evaluation_returns_while_the_best_weights_are_written_and_they_are_the_evaluated_ones(
    tmp_path, monkeypatch
):
    selection, trainer, run, folder = selection_setup(tmp_path)
    release, real_save_best = threading.Event(), checkpoint.save_best

    def held_save_best(*args):
        assert release.wait(timeout=60)
        real_save_best(*args)

    monkeypatch.setattr(checkpoint, "save_best", held_save_best)
    evaluated = weights_of(trainer.model)
    selection.evaluate(trainer, run, _NoScalars())  # returns although the write cannot go on yet
    assert not (folder / "best.pdparams").exists()
    with paddle.no_grad():
        for parameter in trainer.model.parameters():
            parameter.set_value(parameter + 1.0)  # the next optimizer steps change the model in place
    release.set()
    selection.wait_for_best_weights()
    weights, metrics = best_on_disk(folder)
    assert metrics["step"] == 1 and metrics["split"] == "val"
    for name in evaluated:
        np.testing.assert_array_equal(weights[name], evaluated[name], err_msg=name)


def test_a_write_failing_half_way_keeps_the_previous_best_and_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    selection, trainer, run, folder = selection_setup(tmp_path)
    selection.evaluate(trainer, run, _NoScalars())
    selection.wait_for_best_weights()
    previous_weights, previous_metrics = best_on_disk(folder)
    real_save = paddle.save

    def half_then_disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paddle, "save", half_then_disk_full)
    with paddle.no_grad():
        trainer.model.head.weight.set_value(trainer.model.head.weight * -1.0)
    run.step, run.best = 2, dict(run.best, top1=-1.0)  # so that step 2's weights count as better
    selection.evaluate(trainer, run, _NoScalars())
    with pytest.raises(UserError, match="Could not write the best weights.*No space left on device"):
        selection.wait_for_best_weights()
    weights, metrics = best_on_disk(folder)
    assert metrics == previous_metrics and metrics["step"] == 1
    for name in previous_weights:
        np.testing.assert_array_equal(weights[name], previous_weights[name], err_msg=name)
    selection.wait_for_best_weights()  # the error is raised once


def test_a_process_killed_in_the_middle_of_the_write_leaves_the_previous_best_loadable(tmp_path):
    checkpoint.save_best(str(tmp_path), {"w": paddle.ones([1000])}, {"step": 1, "top1": 50.0})
    script = textwrap.dedent(f"""
        import os, paddle
        from rdrop import checkpoint
        from rdrop.background_write import BackgroundWrite
        real_save = paddle.save
        def dying_save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            with open(path, "r+b") as stream:
                stream.truncate(os.path.getsize(path) // 2)
            os._exit(9)  # as if SIGKILLed with half of the new file written
        paddle.save = dying_save
        write = BackgroundWrite("writing the best weights")
        write.start(checkpoint.save_best, {str(tmp_path)!r}, {{"w": paddle.full([1000], 2.0)}}, {{"step": 2}})
        write.wait()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == 9
    assert os.path.getsize(tmp_path / ".best.pdparams.partial") > 0  # the write was under way
    np.testing.assert_array_equal(paddle.load(str(tmp_path / "best.pdparams"))["w"].numpy(), np.ones(1000))
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 1, "top1": 50.0}


def test_a_failed_write_that_nothing_waited_for_is_reported_at_exit(tmp_path):
    script = textwrap.dedent("""
        import sys
        from rdrop.background_write import BackgroundWrite
        from rdrop.errors import UserError
        def full_disk():
            raise UserError("Could not write the best weights (No space left on device).")
        BackgroundWrite("writing the best weights").start(full_disk)
        sys.exit(3)  # another error ends the process before the next wait
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stderr.strip().endswith(
        "error: writing the best weights failed: Could not write the best weights (No space left on device)."
    )


def test_training_ends_with_the_paragraph_when_the_best_weights_cannot_be_written(
    tmp_path, archive, monkeypatch, capsys
):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paddle, "save", disk_full)
    path = tiny_config(tmp_path, archive, schedule={"warmup_steps": 1, "total_steps": 4}, train={"eval_every": 2})
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", path])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: Could not write the best weights" in error and "No space left on device" in error
    assert "Traceback" not in error
