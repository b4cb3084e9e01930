"""rdrop/atomic.py: a result is replaced whole or not at all, and unwritable targets are refused early."""

import os

from rdrop import atomic
from rdrop.errors import UserError

import pytest


def test_a_folder_and_a_file_are_replaced_whole_and_nothing_else_is_left(tmp_path):
    target = tmp_path / "export"
    for version in ("one", "two"):
        with atomic.replacing(str(target)) as partial:
            os.makedirs(partial)
            for name in ("a", version):
                with open(os.path.join(partial, name), "w") as stream:
                    stream.write(version)
    assert sorted(os.listdir(target)) == ["a", "two"] and (target / "a").read_text() == "two"
    for version in ("1", "2"):
        with atomic.replacing(str(tmp_path / "m.json")) as partial, open(partial, "w") as stream:
            stream.write(version)
    assert (tmp_path / "m.json").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["export", "m.json"]


def test_an_error_midway_keeps_the_previous_version_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("previous")
    with pytest.raises(OSError, match="No space left"):
        with atomic.replacing(str(target)) as partial, open(partial, "w") as stream:
            stream.write("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_file_never_replaces_a_folder_of_the_same_name(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep").write_text("")
    with pytest.raises(UserError, match="Cannot write --output .*Is a directory"):
        atomic.check_writable(str(tmp_path / "results"), "--output")
    with pytest.raises(IsADirectoryError):
        with atomic.replacing(str(tmp_path / "results")) as partial, open(partial, "w") as stream:
            stream.write("x")
    assert os.listdir(tmp_path / "results") == ["keep"]


def test_check_writable_creates_missing_folders_and_refuses_paths_below_a_file(tmp_path):
    atomic.check_writable(str(tmp_path / "new" / "deeper" / "m.json"), "--output")
    assert (tmp_path / "new" / "deeper").is_dir() and os.listdir(tmp_path / "new" / "deeper") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="Cannot write --output .*file.m.json"):
        atomic.check_writable(str(tmp_path / "file" / "m.json"), "--output")
