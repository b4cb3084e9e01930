"""Checkpoints: atomic writes, pruning, resume resolution, broken folders, edited trainer state and
the output-folder guard."""

import copy
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

from rdrop import checkpoint, config, distributed, optim, output_folder, resume
from rdrop import step as train_step
from rdrop.errors import UserError
from rdrop.run_state import RunState

import numpy as np
import paddle
import pytest
from run_helpers import ROOT, launch, tiny_config


def small_states(value):
    model_state = {"w": paddle.full([2, 3], float(value))}
    optimizer_state = {"velocity": paddle.full([2, 3], float(value) / 10)}
    return model_state, optimizer_state


SINGLE_PROCESS = distributed.Context(0, 1)


def train_cfg(output_dir, **changes):
    cfg = {"output_dir": str(output_dir), "resume": None, "overwrite": False}
    cfg.update(changes)
    return cfg


def test_save_load_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(str(tmp_path), step, *small_states(step), {"data": {"epoch": step}}, keep=2)
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [20, 30]
    folder = tmp_path / "checkpoints" / "step_30"
    model_state, optimizer_state, trainer_state = checkpoint.load(str(folder))
    np.testing.assert_array_equal(model_state["w"].numpy(), np.full([2, 3], 30.0))
    np.testing.assert_allclose(optimizer_state["velocity"].numpy(), np.full([2, 3], 3.0))
    assert trainer_state == {"data": {"epoch": 30}, "step": 30}


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    checkpoint.save(str(tmp_path), 5, *small_states(5), {}, keep=3)
    checkpoint.save(str(tmp_path), 7, *small_states(7), {}, keep=3)
    (tmp_path / "checkpoints" / ".step_9.partial").mkdir()
    (tmp_path / "checkpoints" / "step_11").mkdir()  # no trainer_state.json: not complete
    assert resume.resolve(train_cfg(tmp_path, resume="auto"), SINGLE_PROCESS).endswith("step_7")
    assert resume.resolve(train_cfg(tmp_path / "empty", resume="auto"), SINGLE_PROCESS) is None


def test_failure_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(str(tmp_path), 1, *small_states(1), {}, keep=2)
    real_save, calls = paddle.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", failing_save)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoints are intact"):
        checkpoint.save(str(tmp_path), 2, *small_states(2), {}, keep=2)
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1"]


def test_process_killed_halfway_through_a_save_leaves_no_complete_looking_checkpoint(tmp_path):
    checkpoint.save(str(tmp_path), 1, *small_states(1), {}, keep=2)
    script = textwrap.dedent(f"""
        import os, paddle
        from rdrop import checkpoint, distributed
        real_save = paddle.save
        def dying_save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            os._exit(9)  # as if SIGKILLed right after the first file of the new checkpoint
        paddle.save = dying_save
        checkpoint.save({str(tmp_path)!r}, 2, {{"w": paddle.ones([2])}}, {{}}, {{}}, keep=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 9
    assert resume.resolve(train_cfg(tmp_path, resume="auto"), SINGLE_PROCESS).endswith("step_1")
    checkpoint.save(str(tmp_path), 2, *small_states(2), {}, keep=2)  # the leftover partial folder is replaced
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [1, 2]


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(UserError, match="Could not write checkpoint"):
        checkpoint.save(str(blocker), 1, *small_states(1), {}, keep=1)


def test_best_weights_are_replaced_atomically(tmp_path):
    checkpoint.save_best(str(tmp_path), {"w": paddle.ones([2])}, {"top1": 50.0})
    checkpoint.save_best(str(tmp_path), {"w": paddle.full([2], 2.0)}, {"top1": 60.0})
    assert json.loads((tmp_path / "best.json").read_text()) == {"top1": 60.0}
    np.testing.assert_array_equal(paddle.load(str(tmp_path / "best.pdparams"))["w"].numpy(), [2.0, 2.0])
    assert sorted(os.listdir(tmp_path)) == ["best.json", "best.pdparams"]


@pytest.mark.parametrize(
    "name, breakage, expected",
    [
        ("trainer_state.json", "removed", "trainer_state.json' is missing"),
        ("model.pdparams", "removed", "model.pdparams' is missing"),
        ("optimizer.pdopt", "corrupt", "optimizer.pdopt' cannot be read"),
    ],
)
def test_broken_checkpoints_are_user_errors(tmp_path, name, breakage, expected):
    path = checkpoint.save(str(tmp_path), 3, *small_states(3), {}, keep=1)
    if breakage == "removed":
        os.remove(os.path.join(path, name))
    else:
        with open(os.path.join(path, name), "wb") as stream:
            stream.write(b"\x00garbage")
    with pytest.raises(UserError, match=expected):
        checkpoint.load(path)


def test_not_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        checkpoint.load(str(tmp_path / "nothing"))


def claim_as_train_does(output_dir, **changes):
    cfg = config.defaults()
    cfg["train"].update(train_cfg(output_dir, **changes))
    output_folder.claim(cfg, resume.resolve(cfg["train"], distributed.Context(0, 1)))


def test_lock_output_dir_false_claims_the_folder_without_flock(tmp_path, monkeypatch, caplog):
    def no_locks(stream, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("rdrop.output_folder.fcntl.flock", no_locks)
    with pytest.raises(UserError, match="does not support file locks"):
        claim_as_train_does(tmp_path / "locked")
    claim_as_train_does(tmp_path / "unlocked", lock_output_dir=False)
    assert (tmp_path / "unlocked" / checkpoint.RUN_CONFIG).is_file()
    assert not (tmp_path / "unlocked" / output_folder.LOCK_FILE).exists()
    assert "nothing keeps another run out" in caplog.text


@pytest.mark.parametrize("left_behind", ["checkpoint", "best_weights_only", "best_metrics_only"])
def test_a_fresh_run_never_overwrites_what_a_previous_run_left(tmp_path, left_behind):
    run = tmp_path / "run"
    if left_behind == "checkpoint":
        checkpoint.save(str(run), 4, *small_states(4), {}, keep=1)
    elif left_behind == "best_weights_only":  # e.g. stopped after an evaluation, before its first save
        checkpoint.save_best(str(run), small_states(1)[0], {"top1": 1.0})
        os.remove(run / "best.json")
    else:
        run.mkdir()
        (run / "best.json").write_text("{}")
    before = {name: (run / name).stat().st_mtime_ns for name in os.listdir(run)}
    for setting in (None, "auto"):
        if left_behind != "checkpoint" or setting is None:  # auto resumes a checkpoint: nothing is overwritten
            with pytest.raises(UserError, match="already holds results of another run"):
                claim_as_train_does(run, resume=setting)
    elsewhere = tmp_path / "other"
    checkpoint.save(str(elsewhere), 2, *small_states(2), {}, keep=1)
    with pytest.raises(UserError, match="already holds results"):  # resuming another folder's checkpoint
        claim_as_train_does(run, resume=str(elsewhere / "checkpoints" / "step_2"))
    assert {name: (run / name).stat().st_mtime_ns for name in os.listdir(run) if name != ".lock"} == before


def test_only_partial_leftovers_and_foreign_files_do_not_block_a_fresh_run(tmp_path):
    (tmp_path / "checkpoints" / ".step_3.partial").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    claim_as_train_does(tmp_path)
    claim_as_train_does(tmp_path, resume="auto")


def test_overwrite_deletes_only_what_runs_write(tmp_path):
    checkpoint.save(str(tmp_path), 4, *small_states(4), {}, keep=1)
    checkpoint.save_best(str(tmp_path), small_states(4)[0], {"top1": 1.0})
    (tmp_path / "checkpoints" / ".step_5.partial").mkdir()
    (tmp_path / ".best.pdparams.partial").write_bytes(b"half")
    foreign = ["notes.txt", "checkpoints/README", "checkpoints/analysis/plot.png", "checkpoints/step_x/keep.txt"]
    for name in foreign:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    claim_as_train_does(tmp_path, overwrite=True)
    remaining = sorted(
        os.path.relpath(os.path.join(folder, name), tmp_path)
        for folder, _, names in os.walk(tmp_path)
        for name in names
        if name != ".lock"
    )
    assert remaining == sorted(foreign + [checkpoint.RUN_CONFIG])  # the new run's config
    assert checkpoint.list_checkpoints(str(tmp_path)) == []


# GradScaler.state_dict() of an enabled (GPU) fp16 scaler, with a scale it reached in training.
GPU_LOSS_SCALER = {
    "scale": np.array([4096.0], dtype=np.float32),
    "incr_ratio": 2.0,
    "decr_ratio": 0.5,
    "incr_every_n_steps": 1000,
    "decr_every_n_nan_or_inf": 1,
    "incr_count": 37,
    "decr_count": 0,
    "use_dynamic_loss_scaling": True,
}


def test_an_fp16_loss_scaler_state_survives_save_and_resume(tmp_path):
    """On a GPU, GradScaler.state_dict() holds the scale as a float32 array of shape [1]
    (paddle/amp/grad_scaler.py: `"scale": self._scale.numpy()`) next to its counters."""
    checkpoint.save(str(tmp_path), 3, *small_states(3), {"loss_scaler": GPU_LOSS_SCALER}, keep=1)
    _, _, trainer_state = checkpoint.load(str(tmp_path / "checkpoints" / "step_3"))

    scaler = paddle.amp.GradScaler(enable=False)
    scaler._enable = True  # as on a GPU: on a CPU, Paddle disables the scaler when it is built
    scaler.load_state_dict(trainer_state["loss_scaler"])
    restored = scaler.state_dict()
    assert restored.keys() == GPU_LOSS_SCALER.keys()
    assert restored["scale"].dtype == np.float32 and restored["scale"].shape == (1,)
    np.testing.assert_array_equal(restored["scale"], GPU_LOSS_SCALER["scale"])
    assert {k: v for k, v in restored.items() if k != "scale"} == {
        k: v for k, v in GPU_LOSS_SCALER.items() if k != "scale"
    }


class _GpuPlace:
    def is_gpu_place(self):
        return True


@pytest.mark.parametrize("saved_scaler", ["empty", "missing"])
def test_a_bf16_checkpoint_resumes_as_fp16_with_a_fresh_loss_scale(tmp_path, monkeypatch, caplog, saved_scaler):
    """A bf16 (or float32, or CPU) run saves the disabled scaler's state, {}; an older checkpoint may
    hold none. Resumed with train.amp=fp16 on a GPU, the enabled scaler would refuse {} (Paddle raises
    RuntimeError): the run starts from the fresh scale instead and says so."""
    monkeypatch.setattr(  # GradScaler enables itself only where the tracer's place is a GPU
        paddle.amp.grad_scaler, "_dygraph_tracer", lambda: type("Tracer", (), {"_expected_place": _GpuPlace()})
    )
    paddle.seed(0)
    model = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.Momentum(parameters=model.parameters())
    model(paddle.ones([4, 3])).sum().backward()
    optimizer.step()  # a velocity to save
    bf16 = config.defaults()
    bf16["train"]["amp"] = "bf16"
    extra = {"config": bf16, "best": None, "data": {}, "step": 4}
    if saved_scaler == "empty":
        extra["loss_scaler"] = train_step.loss_scaler("bf16").state_dict()
        assert extra["loss_scaler"] == {}
    saved = {name: value.numpy() for name, value in model.state_dict().items()}
    checkpoint.save(
        str(tmp_path), 4, model.state_dict(), optim.portable_optimizer_state(optimizer, model), extra, keep=1
    )

    fp16 = config.defaults()
    fp16["train"].update(amp="fp16", resume_changes=["train.amp"])
    run = RunState.load(str(tmp_path / "checkpoints" / "step_4"), fp16)
    assert "train.amp: 'bf16' -> 'fp16'" in run.changes
    paddle.seed(1)
    fresh_model = paddle.nn.Linear(3, 2)
    scaler = train_step.loss_scaler("fp16")
    assert scaler.is_enable()
    with caplog.at_level(logging.INFO):
        run.restore(fresh_model, paddle.optimizer.Momentum(parameters=fresh_model.parameters()), scaler)
    assert "no fp16 loss-scaler state" in caplog.text and "starts fresh at 32768" in caplog.text
    assert scaler.state_dict()["scale"].tolist() == [2.0**15]
    for name, value in fresh_model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name])


def reports(*per_rank):
    return [(step, f"host{rank}", problem) for rank, (step, problem) in enumerate(per_rank)]


def test_ranks_resume_only_when_every_one_reads_rank_0s_checkpoint_at_its_step():
    path = "/runs/a/checkpoints/step_3"
    assert resume.agree(path, reports((3, None), (3, None))) == path
    assert resume.agree(None, reports((None, None), (None, None))) is None
    with pytest.raises(UserError) as missing:
        resume.agree(path, reports((3, None), (None, "no such folder")))
    message = str(missing.value)
    assert "Rank 1 on host host1" in message and path in message and "no such folder" in message
    assert "storage all machines share" in message
    with pytest.raises(UserError, match="Rank 2 on host host2 .*records step 2, rank 0 reads step 3"):
        resume.agree(path, reports((3, None), (3, None), (2, None)))
    with pytest.raises(UserError, match="Cannot resume from .*trainer_state.json is missing"):
        resume.agree(path, reports((None, "trainer_state.json is missing"), (3, None)))


# Runs train.py with its working directory in machine<rank>/: with a relative train.output_dir, each
# rank sees its own folder, as two machines with output_dir on their local disks do.
OWN_DISK_PER_RANK = """
import os, sys
sys.path.insert(0, {root!r})
os.chdir(os.path.join({base!r}, "machine" + os.environ["PADDLE_TRAINER_ID"]))
import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_resume_stops_at_start_when_another_rank_cannot_read_rank_0s_checkpoint(tmp_path, archive):
    script = tmp_path / "own_disk_per_rank.py"
    script.write_text(OWN_DISK_PER_RANK.format(root=ROOT, base=str(tmp_path)))
    checkpoint.save(str(tmp_path / "machine0" / "run"), 3, *small_states(3), {}, keep=1)
    (tmp_path / "machine1").mkdir()
    arguments = ["--config", tiny_config(tmp_path, archive), "-o", "train.output_dir=run", "-o", "train.resume=auto"]
    result = launch(arguments, tmp_path / "logs", script=str(script), timeout=300)
    logs = {rank: (tmp_path / "logs" / f"workerlog.{rank}").read_text() for rank in (0, 1)}
    assert result.returncode != 0
    for log in logs.values():
        assert "Rank 1 on host" in log and "'run/checkpoints/step_3'" in log and "no such folder" in log, log
        assert "Traceback" not in log


def test_every_rank_checks_the_checkpoint_rank_0_chose_rather_than_its_own_newest(tmp_path, monkeypatch):
    """Rank 1 of 2, whose own output_dir holds an older checkpoint than the one rank 0 chose."""
    checkpoint.save(str(tmp_path / "rank1_view"), 5, *small_states(5), {}, keep=1)
    chosen = str(tmp_path / "shared" / "checkpoints" / "step_7")
    reports_seen = []

    def gather(report, context):
        reports_seen.append(report)
        return [(7, "host0", None), report]

    monkeypatch.setattr(distributed, "broadcast_from_main", lambda value, context: chosen)
    monkeypatch.setattr(distributed, "gather", gather)
    rank_1 = distributed.Context(1, 2, local_rank=0)
    with pytest.raises(UserError, match=f"Rank 1 on host .*'{chosen}'.*no such folder"):
        resume.resolve(train_cfg(tmp_path / "rank1_view", resume="auto"), rank_1)
    checkpoint.save(str(tmp_path / "shared"), 7, *small_states(7), {}, keep=1)
    assert resume.resolve(train_cfg(tmp_path / "rank1_view", resume="auto"), rank_1) == chosen
    assert [report[0] for report in reports_seen] == [None, 7]


HOLD_LOCK = """
import sys
from rdrop import output_folder
output_folder.lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as error:
            claim_as_train_does(tmp_path, resume="auto")
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(error.value)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the operating system drops the lock
        holder.wait()
    claim_as_train_does(tmp_path, resume="auto")
    assert f"pid {os.getpid()}" in (tmp_path / output_folder.LOCK_FILE).read_text()


@pytest.mark.parametrize("bomb", ["[" * 100_000 + "]" * 100_000, "7" * 5000], ids=["deep", "huge integer"])
def test_a_bomb_in_trainer_state_json_is_a_paragraph_naming_the_file(tmp_path, bomb):
    folder = checkpoint.save(str(tmp_path), 3, *small_states(3), {}, keep=1)
    state = os.path.join(folder, checkpoint.STATE_FILE)
    with open(state, "w") as stream:
        stream.write('{"step": 3, "config": ' + bomb + "}")
    with pytest.raises(UserError, match="trainer_state.json cannot be read"):
        resume.resolve(train_cfg(tmp_path, resume="auto"), SINGLE_PROCESS)
    with pytest.raises(UserError, match="trainer_state.json' cannot be read"):
        checkpoint.load(folder)


# An fp16 GradScaler's state as trainer_state.json holds it (see the save-and-resume test above).
FP16_LOSS_SCALER = {**GPU_LOSS_SCALER, "scale": {"__ndarray__": [4096.0], "dtype": "float32"}}


def saved_run(tmp_path, step=4, total_steps=10):
    """A checkpoint at `step` of a run of `total_steps`, with the trainer state a run writes: (folder, config)."""
    cfg = config.defaults()
    cfg["schedule"]["total_steps"] = total_steps
    state = {
        "data": {"epoch": 0, "batches_in_epoch": step},
        "best": {"step": 3, "split": "test", "top1": 12.5, "top5": 40.0, "cross_entropy": 4.1},
        "loss_scaler": {},
        "config": cfg,
    }
    return checkpoint.save(str(tmp_path), step, *small_states(step), state, keep=1), cfg


def edit_state(folder, edit):
    path = os.path.join(folder, checkpoint.STATE_FILE)
    with open(path) as stream:
        state = json.load(stream)
    with open(path, "w") as stream:
        json.dump(edit(state), stream)  # NaN is written as JSON's NaN, which Python reads back


def setting(*keys, value):
    """An edit that sets state[keys[0]][keys[1]]... to `value`."""

    def edit(state):
        inner = state
        for key in keys[:-1]:
            inner = inner[key]
        inner[keys[-1]] = value
        return state

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (setting("step", value=40.7), "records step 40.7, which is not a whole number in [0, 10]"),
        (setting("step", value=10**30), f"records step {10**30}, which is not a whole number in [0, 10]"),
        (setting("step", value=-5), "records step -5, which is not"),
        (setting("step", value=True), "records step True, which is not"),
        (setting("step", value=7), "records step 7, but its folder is named step_4"),
        (setting("best", "top1", value="x"), "has best.top1 'x', which is not a percentage in [0, 100]"),
        (setting("best", "top1", value=float("nan")), "has best.top1 nan, which is not a percentage"),
        (setting("best", "top1", value=250.0), "has best.top1 250.0, which is not a percentage"),
        (setting("best", "cross_entropy", value=float("nan")), "has best.cross_entropy nan, which is not a finite"),
        (setting("best", "step", value=9), "has best.step 9, which is not a whole number in [0, 4]"),
        (setting("best", "split", value="train"), "has best.split 'train', which is not one of val, test"),
        (setting("best", value=[12.5]), "has 'best' [12.5], which is neither null nor a mapping"),
        (setting("data", value=[0, 4]), "has 'data' [0, 4], which is not the data stream's position"),
        (setting("config", value="vit"), "has 'config' 'vit', which is not a mapping of sections"),
        (setting("loss_scaler", value=7), "has 'loss_scaler' 7, which is not a mapping"),
        (lambda state: [state], "does not hold a mapping of fields"),
        (lambda state: {k: v for k, v in state.items() if k != "best"}, "lacks the field(s) best"),
    ],
    ids=lambda case: case if isinstance(case, str) else None,
)
def test_an_edited_trainer_state_is_refused_with_a_paragraph_naming_the_file(tmp_path, edit, problem):
    folder, cfg = saved_run(tmp_path)
    edit_state(folder, edit)
    with pytest.raises(UserError) as refused:
        RunState.load(folder, cfg)
    assert f"Checkpoint file '{os.path.join(folder, 'trainer_state.json')}' {problem}" in str(refused.value)


def test_an_invalid_best_says_how_to_keep_or_drop_it(tmp_path):
    folder, cfg = saved_run(tmp_path)
    edit_state(folder, setting("best", "top1", value=float("nan")))
    with pytest.raises(UserError, match='copy the values from the run\'s best.json, or set "best": null'):
        RunState.load(folder, cfg)


@pytest.mark.parametrize(
    "scale, problem",
    [
        ([-1.0], "scale [-1.0]"),
        ([float("inf")], "scale [inf]"),
        ([1.0, 2.0], "scale [1.0, 2.0]"),
        ([0.0], "scale [0.0]"),
    ],
)
def test_an_edited_fp16_loss_scaler_state_is_refused(tmp_path, scale, problem):
    """The GPU-shaped GradScaler state (as in the fp16 save-and-resume test above), with a broken scale."""
    folder, cfg = saved_run(tmp_path)
    scaler = dict(FP16_LOSS_SCALER, scale={"__ndarray__": scale, "dtype": "float32"})
    edit_state(folder, setting("loss_scaler", value=scaler))
    with pytest.raises(UserError) as refused:
        RunState.load(folder, cfg)
    assert f"trainer_state.json' has loss_scaler.{problem}, which a GradScaler never holds" in str(refused.value)


@pytest.mark.parametrize(
    "edit",
    [
        setting("best", value=None),
        setting("best", value={"step": 3, "split": "val", "top1": 12.5, "loss": 4.1}),  # before cross_entropy
        setting("loss_scaler", value=FP16_LOSS_SCALER),
        setting("config", value=None),  # checkpoints that stored no config
    ],
    ids=["no best", "an older best", "fp16 loss scaler", "no config"],
)
def test_a_trainer_state_as_runs_write_it_is_accepted(tmp_path, edit):
    folder, cfg = saved_run(tmp_path)
    edit_state(folder, edit)
    assert RunState.load(folder, cfg).step == 4


def test_a_checkpoint_past_the_lowered_total_steps_is_refused(tmp_path):
    folder, cfg = saved_run(tmp_path)
    lowered = copy.deepcopy(cfg)
    lowered["schedule"]["total_steps"] = 3
    lowered["train"]["resume_changes"] = ["schedule.total_steps"]
    with pytest.raises(UserError, match="is at step 4, past schedule.total_steps=3 of this run"):
        RunState.load(folder, lowered)
    lowered["schedule"]["total_steps"] = 4  # a finished run, resumed again: nothing left to train
    assert RunState.load(folder, lowered).step == 4
