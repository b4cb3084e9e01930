"""The config system: inheritance, overrides, validation messages, and the key table in docs/configuration.md."""

import pathlib

from rdrop import config
from rdrop.errors import UserError

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_fill_every_key_of_a_minimal_file(tmp_path):
    loaded = config.load(write(tmp_path / "c.yaml", "optimizer:\n  lr: 0.5\n"))
    assert loaded["optimizer"]["lr"] == 0.5
    assert loaded["optimizer"]["momentum"] == config.SCHEMA["optimizer"]["momentum"].default
    assert set(loaded) == set(config.SCHEMA)
    for section, keys in config.SCHEMA.items():
        assert set(loaded[section]) == set(keys)


def test_base_files_are_deep_merged_relative_to_the_child(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "grand.yaml", "model:\n  name: vit_s16\n  dropout: 0.2\ntrain:\n  seed: 3\n")
    write(tmp_path / "sub" / "base.yaml", "_base_: grand.yaml\nmodel:\n  dropout: 0.3\n")
    child = write(tmp_path / "sub" / "child.yaml", "_base_: base.yaml\ntrain:\n  seed: 4\n")
    loaded = config.load(child)
    assert loaded["model"]["name"] == "vit_s16"
    assert loaded["model"]["dropout"] == 0.3
    assert loaded["train"]["seed"] == 4


def test_a_list_of_bases_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  seed: 1\n  log_every: 7\n")
    write(tmp_path / "b.yaml", "train:\n  seed: 2\n")
    loaded = config.load(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert (loaded["train"]["seed"], loaded["train"]["log_every"]) == (2, 7)


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        config.load(str(tmp_path / "a.yaml"))


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "")
    loaded = config.load(
        path,
        [
            "data.crop_scale=[0.5,1.0]",
            "optimizer.lr=1e-3",
            "model.pretrained=null",
            "train.output_dir=runs/x",
            "rdrop.concat_batch=false",
        ],
    )
    assert loaded["data"]["crop_scale"] == [0.5, 1.0]
    assert loaded["optimizer"]["lr"] == 0.001
    assert loaded["model"]["pretrained"] is None
    assert loaded["train"]["output_dir"] == "runs/x"
    assert loaded["rdrop"]["concat_batch"] is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr", "section.key=value"),
        ("lr=3", "section.key=value"),
        ("optimizer.lr=[1,", "not valid YAML"),
    ],
)
def test_malformed_overrides(tmp_path, override, expected):
    with pytest.raises(UserError, match=expected):
        config.load(write(tmp_path / "c.yaml", ""), [override])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optimizer:\n  learning_rate: 0.1\n", "Unknown key 'optimizer.learning_rate'"),
        ("optimiser:\n  lr: 0.1\n", "Did you mean 'optimizer'"),
        ("model:\n  dropuot: 0.1\n", "Did you mean 'model.dropout'"),
        ("optimizer:\n  lr: -0.1\n", r"Invalid value -0.1 for 'optimizer.lr'.*\(0, inf\)"),
        ("optimizer:\n  lr: '0.1'\n", "Invalid value '0.1' for 'optimizer.lr'"),
        ("data:\n  crop_scale: [0.0, 1.0]\n", "'data.crop_scale'.*0 < min <= max <= 1"),
        ("data:\n  crop_scale: [0.5, 1.5]\n", "'data.crop_scale'"),
        ("train:\n  micro_batch_size: 0\n", r"'train.micro_batch_size'.*integer in \[1, 2\^31-1\]"),
        ("train:\n  global_batch_size: 8.5\n", "'train.global_batch_size'"),
        ("data:\n  num_workers: 100000\n", r"'data.num_workers'.*\[0, 64\]"),
        ("model:\n  img_size: 100000\n", r"'model.img_size'.*\[1, 4096\]"),
        ("train:\n  amp: fp8\n", "'train.amp'.*one of none, bf16, fp16"),
        ("model:\n  dropout: 1.0\n", r"'model.dropout'.*\[0, 1\)"),
        ("rdrop:\n  alpha: .nan\n", "'rdrop.alpha'"),
        ("model: 3\n", "Section 'model'.*must be a mapping"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model:\n  name: [unclosed\n", "not valid YAML"),
        ("model: !!python/object/apply:os.system ['true']\n", "YAML tag"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected):
        config.load(write(tmp_path / "c.yaml", text))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(str(tmp_path / "nope.yaml"))


def test_saved_config_loads_back_identically(tmp_path):
    loaded = config.load(write(tmp_path / "c.yaml", "model:\n  name: vit_s16\n"), ["train.seed=9"])
    config.save(loaded, tmp_path / "resolved.yaml")
    assert config.load(str(tmp_path / "resolved.yaml")) == loaded
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == loaded


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config.load(str(path))


def test_readme_documents_every_key_exactly_as_the_schema():
    assert config.reference_table() in (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("seed", [2**31, 2**63, 2**64, -1])
def test_integers_are_bounded_to_what_the_run_can_store(tmp_path, seed):
    with pytest.raises(UserError, match=r"'train.seed'.*\[0, 2\^31-1\]"):
        config.load(write(tmp_path / "c.yaml", ""), [f"train.seed={seed}"])


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    text = "anchors:\n" + "\n".join(f"  {line}" for line in lines) + "\ndata:\n  crop_scale: *a11\n"
    with pytest.raises(UserError, match="expands to more than 10000 values") as caught:
        config.load(write(tmp_path / "c.yaml", text))
    assert len(str(caught.value)) < 500


def test_a_list_that_contains_itself_is_refused(tmp_path):
    with pytest.raises(UserError, match="nests values more than 16 levels deep"):
        config.load(write(tmp_path / "c.yaml", "data:\n  crop_scale: &loop [*loop]\n"))


def test_long_values_are_cut_in_messages(tmp_path):
    with pytest.raises(UserError) as caught:
        config.load(write(tmp_path / "c.yaml", ""), ["data.crop_scale=[" + ", ".join(["0.5"] * 5000) + "]"])
    message = str(caught.value)
    assert "'data.crop_scale'" in message and "..." in message and len(message) < 500
    with pytest.raises(UserError) as caught:
        config.load(write(tmp_path / "c.yaml", ""), ["train.amp=" + "x" * 100_000])
    assert "'train.amp'" in str(caught.value) and len(str(caught.value)) < 500


def test_a_missing_base_file_names_the_file_that_includes_it(tmp_path):
    child = write(tmp_path / "child.yaml", "_base_: missing_base.yaml\n")
    with pytest.raises(UserError, match=r"child.yaml' inherits from 'missing_base.yaml'"):
        config.load(child)


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = config.load(write(tmp_path / "c.yaml", "train:\n  output_dir: ~/runs/x\n"), ["data.data_file=~/c.tar.gz"])
    assert loaded["train"]["output_dir"] == str(tmp_path / "runs" / "x")
    assert loaded["data"]["data_file"] == str(tmp_path / "c.tar.gz")


def test_resume_changes_must_name_existing_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "")
    assert config.load(path, ["train.resume_changes=[train.seed]"])["train"]["resume_changes"] == ["train.seed"]
    with pytest.raises(UserError, match="'train.resume_changes'"):
        config.load(path, ["train.resume_changes=[train.sead]"])


def test_an_unwritable_config_path_is_a_user_error_and_leaves_no_partial_file(tmp_path):
    (tmp_path / "config.yaml").mkdir()  # as root, a read-only folder is still writable: this fails for anyone
    with pytest.raises(UserError, match="Cannot write the run's config"):
        config.save(config.defaults(), str(tmp_path / "config.yaml"))


# Depth and size bombs: each would otherwise end in a RecursionError (PyYAML and json nest by recursion)
# or Python's ValueError for integers of more than 4300 digits, with a traceback thousands of lines long.
BOMBS = {
    "a deeply nested list": "[" * 5000 + "]" * 5000,
    "a deeply nested mapping": "{a: " * 3000 + "1" + "}" * 3000,
    "an integer of 5000 digits": "7" * 5000,
    "a string of 100000 characters": "x" * 100_000,
}


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_a_depth_or_size_bomb_in_a_file_is_refused_naming_the_file(tmp_path, bomb):
    path = write(tmp_path / "bomb.yaml", f"train:\n  seed: {bomb}\n")
    with pytest.raises(UserError, match=r"Config file '.*bomb.yaml' (nests|holds)") as caught:
        config.load(path)
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_a_depth_or_size_bomb_in_an_override_is_refused_naming_the_key(tmp_path, bomb):
    with pytest.raises(UserError, match=r"override of 'train.seed' (nests|holds)") as caught:
        config.load(write(tmp_path / "c.yaml", ""), [f"train.seed={bomb}"])
    assert len(str(caught.value)) < 500


def test_aliases_cannot_nest_deeper_than_the_text(tmp_path):
    """Each anchor is 10 levels deep as written, but the 40th holds the 39th, so 400 levels."""
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} {'[' * 10}*a{i - 1}{']' * 10}" for i in range(1, 40)]
    with pytest.raises(UserError, match=r"c.yaml' nests values more than 16 levels deep"):
        config.load(write(tmp_path / "c.yaml", "\n".join(lines) + "\n"))


def test_a_long_chain_of_base_files_is_refused(tmp_path):
    for index in range(100):
        write(tmp_path / f"c{index}.yaml", f"_base_: c{index + 1}.yaml\n")
    write(tmp_path / "c100.yaml", "")
    with pytest.raises(UserError, match=r"c0.yaml' inherits through more than 16"):
        config.load(str(tmp_path / "c0.yaml"))


def test_a_bomb_in_a_checkpoints_config_is_refused_naming_the_checkpoint():
    current = config.validate({})
    saved = config.validate({})
    nested = saved["train"]
    for _ in range(5000):
        nested["seed"] = {"seed": None}
        nested = nested["seed"]
    with pytest.raises(UserError, match=r"config in checkpoint 'run/checkpoints/step_3' nests values"):
        config.changes_on_resume(saved, current, "run/checkpoints/step_3")
