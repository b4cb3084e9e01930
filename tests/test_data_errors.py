"""Every way a user can hand the data package bad input ends in one UserError naming the culprit."""

import os
import pickle
import struct
import subprocess
import sys
import tarfile

from rdrop.errors import UserError
from rdrop.step import accumulation_steps

import numpy as np
import paddle.dataset.common
import pytest
from cifar_archive import cifar10_label_names, fine_label_names, write_cifar10_archive, write_cifar100_archive
from data_helpers import make_cfg
from paddle.vision.datasets import Cifar10, Cifar100

import data
from data import datasets


def build_everything(cfg):
    """What the trainer and the evaluator build; any of them may be the one that fails."""
    data.TrainStream(cfg, 0, 1)
    list(data.build_eval_loader(cfg, "test", 0, 1))


def assert_user_error(cfg, *fragments, build=build_everything):
    with pytest.raises(UserError) as caught:
        build(cfg)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message
    return message


def small_archive(path, **knobs):
    return write_cifar100_archive(path, num_train=30, num_test=10, num_classes=10, **knobs)


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nowhere" / "cifar-100-python.tar.gz"
    assert_user_error(make_cfg(missing), missing, "data.data_file", "does not exist")


def test_data_file_is_a_directory(tmp_path):
    assert_user_error(make_cfg(tmp_path), tmp_path, "directory")


def test_missing_cache_file_with_download_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(paddle.dataset.common, "DATA_HOME", str(tmp_path / "cache"))
    expected_location = tmp_path / "cache" / "cifar" / "cifar-100-python.tar.gz"
    assert_user_error(make_cfg(None, download=False), expected_location, "data.download")


def test_cached_file_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(paddle.dataset.common, "DATA_HOME", str(tmp_path))
    (tmp_path / "cifar").mkdir()
    cached = small_archive(tmp_path / "cifar" / "cifar-100-python.tar.gz")
    assert data.prepare_dataset(make_cfg(None, download=False)) == cached
    assert data.TrainStream(make_cfg(None, download=False), 0, 1).num_images == 30


def test_failed_download(tmp_path, monkeypatch):
    def no_network(url, module_name, md5sum, save_name=None):
        raise RuntimeError(f"Cannot download {url} within retry limit 3")

    monkeypatch.setattr(paddle.dataset.common, "DATA_HOME", str(tmp_path))
    monkeypatch.setattr(paddle.dataset.common, "download", no_network)
    message = assert_user_error(make_cfg(None, download=True), tmp_path / "cifar" / "cifar-100-python.tar.gz")
    assert "Cannot download" in message and "data.data_file" in message


@pytest.mark.parametrize("keep_fraction", [0.02, 0.5, 0.97])
def test_truncated_archive(tmp_path, keep_fraction):
    full = small_archive(tmp_path / "full.tar.gz")
    cut = small_archive(tmp_path / "cut.tar.gz", truncate_to_bytes=int(os.path.getsize(full) * keep_fraction))
    assert_user_error(make_cfg(cut), cut, "truncated")


def test_file_that_is_not_an_archive(tmp_path):
    garbage = tmp_path / "cifar-100-python.tar.gz"
    garbage.write_bytes(os.urandom(5000))
    assert_user_error(make_cfg(garbage), garbage)


@pytest.mark.parametrize("member", ["train", "test"])
def test_archive_without_a_split(tmp_path, member):
    path = small_archive(tmp_path / "a.tar.gz", omit_members=(member,))
    assert_user_error(make_cfg(path), path, f"cifar-100-python/{member}")


@pytest.mark.parametrize("split,label", [("train", 10), ("test", -1), ("train", 99)])
def test_labels_outside_num_classes(tmp_path, split, label):
    path = small_archive(tmp_path / "a.tar.gz", label_overrides={split: {3: label}})
    assert_user_error(make_cfg(path), path, "model.num_classes", f"label {label} at index 3")


def test_digits_with_too_few_classes():
    assert_user_error(make_cfg(None, dataset="digits", num_classes=5), "load_digits", "model.num_classes")


def test_validation_split_larger_than_the_training_set(tmp_path):
    path = small_archive(tmp_path / "a.tar.gz")
    assert_user_error(make_cfg(path, val_size=30), path, "data.val_size is 30", "30 images")


def test_validation_split_requested_but_disabled(tmp_path):
    path = small_archive(tmp_path / "a.tar.gz")
    assert_user_error(make_cfg(path), "data.val_size", build=lambda cfg: data.build_eval_loader(cfg, "val", 0, 1))


def test_training_set_smaller_than_one_global_step(tmp_path):
    path = small_archive(tmp_path / "a.tar.gz")
    cfg = make_cfg(path, micro_batch_size=8, val_size=20)
    two_ranks = lambda cfg: data.TrainStream(cfg, 0, 2)  # noqa: E731
    assert_user_error(cfg, path, "train.micro_batch_size", "10 images", build=two_ranks)


def test_global_batch_larger_than_the_training_set(tmp_path):
    path = small_archive(tmp_path / "a.tar.gz")
    cfg = make_cfg(path, micro_batch_size=4, global_batch_size=32, val_size=2)
    message = assert_user_error(cfg, "train.global_batch_size (32)", "training set (28 images)")
    assert "Choose at most 28" in message
    data.TrainStream(make_cfg(path, micro_batch_size=4, global_batch_size=28, val_size=2), 0, 1)


def test_global_batch_that_does_not_divide_into_micro_batches():
    with pytest.raises(UserError, match=r"must be a multiple of train.micro_batch_size x devices \(8 x 3 = 24\)"):
        accumulation_steps({"global_batch_size": 36, "micro_batch_size": 8}, world_size=3)


def test_resume_state_from_another_training_set(tmp_path):
    path = small_archive(tmp_path / "a.tar.gz")
    stream = data.TrainStream(make_cfg(path, val_size=5), 0, 1)
    state = {"epoch": 1, "batches_in_epoch": 2, "images_per_step": 4, "num_images": 30}
    with pytest.raises(UserError, match="30 images.*25"):
        stream.set_state_dict(state)


@pytest.mark.parametrize(
    "state", [{}, {"epoch": -1, "batches_in_epoch": 0}, {"epoch": "x", "batches_in_epoch": 0}, None]
)
def test_malformed_resume_state(tmp_path, state):
    stream = data.TrainStream(make_cfg(small_archive(tmp_path / "a.tar.gz")), 0, 1)
    with pytest.raises(UserError, match="malformed"):
        stream.set_state_dict(state)


class _RunsCode:
    """Unpickling this calls os.system: the shape of a crafted archive member."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("member", ["train", "test", "meta"])
def test_a_member_that_would_run_code_is_refused_unrun(tmp_path, member):
    marker = tmp_path / "code_ran"
    crafted = pickle.dumps({b"data": _RunsCode(marker)}, protocol=2)
    path = small_archive(tmp_path / "a.tar.gz", member_payloads={member: crafted})
    assert_user_error(make_cfg(path), path, f"cifar-100-python/{member}", "system")
    assert not marker.exists()


def test_an_object_array_is_refused(tmp_path):
    crafted = pickle.dumps({b"fine_labels": [0], b"data": np.array([b"x" * 3072], dtype=object)}, protocol=2)
    path = small_archive(tmp_path / "a.tar.gz", member_payloads={"train": crafted})
    assert_user_error(make_cfg(path), path, "dtype object")


@pytest.mark.parametrize("python2_pickles", [True, False])
def test_the_restricted_reader_returns_what_paddles_reader_does(tmp_path, python2_pickles):
    path = small_archive(tmp_path / "a.tar.gz", python2_pickles=python2_pickles)
    for split in ("train", "test"):
        ours = datasets.load_cifar(data.InputSettings.from_config(make_cfg(path)), split)
        paddles = Cifar100(data_file=str(path), mode=split, download=False, backend="cv2")
        expected = np.stack([row for row, _ in paddles.data]).reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(ours.images, expected)
        np.testing.assert_array_equal(ours.labels, [label for _, label in paddles.data])
        assert ours.images.dtype == np.uint8 and ours.labels.dtype == np.int64
    assert ours.class_names == tuple(fine_label_names(10))


@pytest.mark.parametrize("python2_pickles", [True, False])
def test_the_restricted_reader_reads_cifar10_as_paddles_reader_does(tmp_path, python2_pickles):
    path = write_cifar10_archive(tmp_path / "c10.tar.gz", num_train=23, num_test=7, python2_pickles=python2_pickles)
    for split in ("train", "test"):
        ours = datasets.load_cifar(data.InputSettings.from_config(make_cfg(path, dataset="cifar10")), split)
        paddles = Cifar10(data_file=str(path), mode=split, download=False, backend="cv2")
        expected = np.stack([row for row, _ in paddles.data]).reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(ours.images, expected)
        np.testing.assert_array_equal(ours.labels, [label for _, label in paddles.data])
    assert ours.class_names == tuple(cifar10_label_names(10))


def test_cifar10_missing_training_batch(tmp_path):
    path = write_cifar10_archive(tmp_path / "c10.tar.gz", num_train=20, num_test=5, omit_members=("data_batch_4",))
    assert_user_error(make_cfg(path, dataset="cifar10"), path, "cifar-10-batches-py/data_batch_4", "CIFAR-10")


def test_cifar10_missing_cache_file_names_its_own_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(paddle.dataset.common, "DATA_HOME", str(tmp_path / "cache"))
    expected_location = tmp_path / "cache" / "cifar" / "cifar-10-python.tar.gz"
    assert_user_error(make_cfg(None, dataset="cifar10", download=False), expected_location, "CIFAR-10")


def test_cifar10_download_asks_paddle_for_the_official_file_and_checksum(tmp_path, monkeypatch):
    requested = []

    def fake_download(url, module, md5):
        requested.append((url, module, md5))
        return write_cifar10_archive(tmp_path / "c10.tar.gz", num_train=20, num_test=5)

    monkeypatch.setattr(paddle.dataset.common, "download", fake_download)
    data.prepare_dataset(make_cfg(None, dataset="cifar10", download=True))
    assert requested == [
        ("https://dataset.bj.bcebos.com/cifar/cifar-10-python.tar.gz", "cifar", "c58f30108f718f92721af3b95e74349a")
    ]


def test_a_cifar10_member_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = pickle.dumps({b"data": _RunsCode(marker)}, protocol=2)
    path = write_cifar10_archive(
        tmp_path / "c10.tar.gz", num_train=20, num_test=5, member_payloads={"test_batch": crafted}
    )
    assert_user_error(make_cfg(path, dataset="cifar10"), path, "cifar-10-batches-py/test_batch", "system")
    assert not marker.exists()


class _StrideZeroArray:
    """Pickles as numpy.ndarray(shape, dtype, buffer, 0, strides=0...): every element is the buffer's
    one byte, so the array declares any number of images in a few bytes, with allowed names only."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __reduce__(self):
        return (np.ndarray, (self.shape, self.dtype, b"\0" * self.dtype.itemsize, 0, (0,) * len(self.shape)))


@pytest.mark.parametrize("images", [10**8, 20_000])
def test_a_member_declaring_images_it_does_not_hold_is_refused(tmp_path, images):
    crafted = pickle.dumps(
        {b"fine_labels": _StrideZeroArray((images,), np.int64), b"data": _StrideZeroArray((images, 3072), np.uint8)},
        protocol=2,
    )
    assert len(crafted) < 400
    path = small_archive(tmp_path / "a.tar.gz", member_payloads={"test": crafted})
    assert_user_error(make_cfg(path), path, "cifar-100-python/test", "declares more data than its")


def test_a_member_repeating_one_image_list_is_refused(tmp_path):
    """Pickle's memo lets 100,000 images be one list referenced 100,000 times: 300 MB from 200 kB."""
    image = [0] * 3072
    crafted = pickle.dumps({b"fine_labels": [0] * 100_000, b"data": [image] * 100_000}, protocol=2)
    assert len(crafted) < 1_000_000
    path = small_archive(tmp_path / "a.tar.gz", member_payloads={"test": crafted})
    assert_user_error(make_cfg(path), path, "cifar-100-python/test", "declares more data than its")


def test_a_member_with_more_images_than_the_official_one_is_refused(tmp_path):
    images = np.zeros((10_001, 3072), dtype=np.uint8)  # CIFAR-100's test member holds 10,000
    crafted = pickle.dumps({b"fine_labels": [0] * len(images), b"data": images}, protocol=2)
    path = small_archive(tmp_path / "a.tar.gz", member_payloads={"test": crafted})
    assert_user_error(make_cfg(path), path, "cifar-100-python/test", "10,001 images", "10,000")


class _Zeros:
    """A file of `size` bytes: `prefix`, then zeros, read without holding it."""

    def __init__(self, prefix, size):
        self.prefix, self.left = prefix, size

    def read(self, size):
        size = min(size, self.left)
        head, self.prefix = self.prefix[:size], self.prefix[size:]
        self.left -= size
        return head + bytes(size - len(head))


def archive_with_zeros(tmp_path, name, size):
    """The small archive plus (or with `test` replaced by) a member of `size` bytes: a pickle opcode
    asking to read that many bytes, then zeros. Gzip turns it into about size / 1000 bytes."""
    small = small_archive(tmp_path / "small.tar.gz")
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(small) as source, tarfile.open(path, "w:gz", compresslevel=1) as target:
        for info in source.getmembers():
            if info.name != f"cifar-100-python/{name}":
                target.addfile(info, source.extractfile(info))
        info = tarfile.TarInfo(f"cifar-100-python/{name}")
        info.size = size
        target.addfile(info, _Zeros(b"\x80\x04\x8e" + struct.pack("<Q", size - 11), size))
    return path


PEAK_MEMORY = """
import resource, sys
from data import cifar
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    cifar.read_split(cifar.ARCHIVES["cifar100"], sys.argv[1], "test")
    outcome = "read"
except Exception as error:
    outcome = str(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # kilobytes
print(outcome)
"""


def test_a_member_expanding_beyond_the_official_size_is_cut_off_unread(tmp_path):
    path = archive_with_zeros(tmp_path, "test", 120 * 2**20)  # the official member: about 31 MB
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True, text=True, timeout=300)
    growth_kb, message = result.stdout.splitlines()
    assert "cifar-100-python/test holds 125,829,120 bytes, more than a member of 10,000 images" in message
    assert int(growth_kb) < 40 * 1024  # read, the member alone would take 120 MB


def test_an_archive_expanding_beyond_the_official_size_is_cut_off(tmp_path):
    path = archive_with_zeros(tmp_path, "extra", 480 * 2**20)  # a member the reader never asks for
    assert_user_error(make_cfg(path), path, "expands to more than", "cut off")


def test_a_member_that_links_to_a_larger_one_is_refused(tmp_path):
    path = archive_with_zeros(tmp_path, "extra", 1000)
    linked = tmp_path / "linked.tar.gz"
    with tarfile.open(path) as source, tarfile.open(linked, "w:gz") as target:
        for info in source.getmembers():
            if info.name == "cifar-100-python/test":
                info = tarfile.TarInfo(info.name)
                info.type, info.linkname = tarfile.SYMTYPE, "extra"
            target.addfile(info, source.extractfile(info) if info.isfile() else None)
    assert_user_error(make_cfg(linked), linked, "cifar-100-python/test is a link")
