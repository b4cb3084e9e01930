"""Commands as the README writes them: -c for --config, --help that points to the key reference,
and the quickstart config on one or two processes."""

import os
import pathlib
import re
import subprocess
import sys

from rdrop import config
from rdrop.step import accumulation_steps

import pytest
from image_trees import write_file_list, write_folder_tree
from run_helpers import ROOT, assert_same_weights, final_weights, launch_command, load_script

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


def readme_section(title):
    readme = (pathlib.Path(ROOT) / "README.md").read_text()
    return readme.split(f"\n## {title}\n")[1].split("\n## ")[0]


# Cuts the quickstart's 1,000 steps to a few; later overrides win.
FEW_STEPS = ["-o", "schedule.total_steps=4", "-o", "schedule.warmup_steps=1", "-o", "train.eval_every=2"]


@pytest.mark.slow
def test_the_readme_own_data_commands_train_on_folders_and_lists_and_evaluate(tmp_path):
    """The CPU commands of the README's "Your own data" as written, on a generated my_images/ (mixed
    sizes, modes and formats) with the paths moved under tmp_path and the steps cut: the folder and
    the list of the same files train the same weights, and eval.py counts every test image."""
    section = readme_section("Your own data").replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in section.splitlines() if line.startswith("    python ")]
    gpu_commands = [line for line in lines if "--devices" in line]  # illustrative: checked below, not run
    commands = [line for line in lines if line not in gpu_commands]
    assert [command.split()[:2] for command in commands] == [["python", "train.py"]] * 2 + [["python", "eval.py"]]
    images = tmp_path / "my_images"
    classes = [f"class_{label}" for label in range(5)]  # model.num_classes=5 in the commands
    # 45 per class: the quickstart holds out 150 for selection and its global batch is 64.
    train = write_folder_tree(images / "train", {name: 45 for name in classes})
    test = write_folder_tree(images / "val", {name: 3 for name in classes}, seed=1)
    for split, written in (("train", train), ("val", test)):
        entries = [(f"{split}/{path}", classes.index(path.split("/")[0])) for path in sorted(written)]
        write_file_list(images / f"{split}_list.txt", entries)
    outputs = []
    for command in commands:
        arguments = command.replace("my_images", str(images)).replace("output/", f"{tmp_path}/output/").split()[1:]
        if arguments[0] == "train.py":
            arguments += FEW_STEPS
            outputs.append(next(value.split("=", 1)[1] for value in arguments if value.startswith("train.output_dir=")))
        finished = subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
        if arguments[0] == "eval.py":
            assert f"test split of {len(test)} images" in finished.stdout + finished.stderr
    for output in outputs:
        log = (pathlib.Path(output) / "train.log").read_text()
        assert f"training on {len(train) - 150} images of 5 classes" in log
    (folder_step, folder_weights), (list_step, list_weights) = (final_weights(output) for output in outputs)
    assert folder_step == list_step == 4
    assert_same_weights(folder_weights, list_weights)

    # The GPU command selects the data with the same keys as the folder command, on a recipe that reads folders.
    [gpu_command] = gpu_commands
    gpu_arguments = gpu_command.split()
    gpu_overrides = [gpu_arguments[i + 1] for i, value in enumerate(gpu_arguments) if value == "-o"]
    folder_overrides = [value for value in commands[0].split() if "=" in value and "output_dir" not in value]
    assert [value for value in gpu_overrides if "output_dir" not in value] == folder_overrides[1:]
    gpu_cfg = config.load(os.path.join(ROOT, gpu_arguments[gpu_arguments.index("-c") + 1]), gpu_overrides)
    assert gpu_cfg["data"]["dataset"] == "folder" and gpu_cfg["model"]["num_classes"] == 5


def test_the_readme_is_a_front_page_whose_links_resolve():
    """At most 20 KB, and every relative link (README and docs/) names a file that exists and, with a
    #fragment, a heading of that file (GitHub's anchor rule: lower case, spaces to '-', punctuation dropped)."""
    readme = pathlib.Path(ROOT) / "README.md"
    assert readme.stat().st_size <= 20_000
    for page in [readme, *sorted((pathlib.Path(ROOT) / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name} links to missing {target}"
            if fragment and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
                assert fragment in anchors, f"{page.name} links to missing anchor {target}"
